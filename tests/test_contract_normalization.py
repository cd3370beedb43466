"""The request contract's normalisation: what validation makes of a good request (the
defaults it fills in, the values it keeps, what a family takes), and the settings that
allow more. Validation only: nothing is submitted, so nothing is written to Redis.
"""

from __future__ import annotations

from typing import Any

import pytest

from producer import Client, InvalidRequest
from producer.core.contract import MAX_SEED
from producer.core.registry import Registry
from producer.requests.generate import validate_request
from tests.helpers import data_uri, png

#: The database the settings name. Validation never writes to it and this module flushes
#: nothing, so it shares tests/test_contract.py's.
DB = 13

P = "a red fox in the snow"
IMAGE = data_uri(png(size=(16, 16)))


def test_family_features_that_apply_are_accepted(client: Client) -> None:

    reg, st = client.registry, client.settings
    flux = validate_request(
        {"prompt": "a (red) fox", "model": "tiny-flux", "width": 80, "guidance_scale": 0}, reg, st
    )
    assert flux["guidance_scale"] == 0.0 and flux["steps"] == 4
    turbo = validate_request(
        {"prompt": P, "model": "tiny-sdxl-turbo", "negative_prompt": "fog", "guidance_scale": 1.5},
        reg,
        st,
    )
    assert turbo["scheduler"] == "euler_a" and turbo["steps"] == 1
    sd15 = validate_request({"prompt": "a (red:1.3) fox", "model": "tiny-sd15"}, reg, st)
    assert sd15["guidance_scale"] == 7.5


def test_unused_new_fields_leave_no_key(client: Client) -> None:

    req = validate_request({"prompt": P}, client.registry, client.settings)
    assert not {"mask", "loras", "sweep", "preview"} & set(req)
    off = validate_request({"prompt": P, "preview": False}, client.registry, client.settings)
    assert "preview" not in off
    assert (
        validate_request({"prompt": P, "preview": True}, client.registry, client.settings)[
            "preview"
        ]
        is True
    )
    swept = validate_request(
        {
            "prompt": P,
            "model": "tiny-sdxl-turbo",
            "negative_prompt": "fog",
            "sweep": {"guidance_scale": [0.0, 2.0]},
        },
        client.registry,
        client.settings,
    )
    assert swept["sweep"] == {"guidance_scale": [0.0, 2.0]}


def test_sweep_is_normalized(client: Client) -> None:
    from producer.core.contract import denoise_steps, sweep_cells

    req = validate_request(
        {"prompt": P, "steps": 3, "sweep": {"guidance_scale": [2, 4.5], "seeds": [7, 8, 9]}},
        client.registry,
        client.settings,
    )
    assert req["sweep"] == {"seeds": [7, 8, 9], "guidance_scale": [2.0, 4.5]}
    assert req["seed"] == 7
    cells = sweep_cells(req)
    assert len(cells) == 6 and denoise_steps(req) == 18
    assert cells[4] == {
        "seed": 8,
        "steps": 3,
        "guidance_scale": 4.5,
        "label": {"seeds": 8, "guidance_scale": 4.5},
    }


def test_an_integer_sent_as_a_whole_float_is_that_integer(
    make_settings: Any, models_file: str
) -> None:
    """JSON Schema's integers are numbers without a fraction: 4.0 is one (a fraction is
    refused: seed-fraction above), read and kept as the int."""
    out = validate_request(
        {"prompt": P, "seed": 7.0, "num_images": 1.0, "sweep": {"steps": [2.0, 3]}},
        Registry.load(models_file),
        make_settings(),
    )
    assert (out["seed"], out["num_images"], out["sweep"]) == (7, 1, {"steps": [2, 3]})
    assert all(type(v) is int for v in (out["seed"], out["num_images"], *out["sweep"]["steps"]))


def test_normalization_keeps_given_values(make_settings: Any, models_file: str) -> None:
    settings = make_settings(job_timeout_s=300)
    registry = Registry.load(models_file)
    out = validate_request(
        {
            "prompt": P,
            "model": "tiny-idle",
            "width": 128,
            "height": 96,
            "steps": 7,
            "guidance_scale": 0,
            "scheduler": "ddim",
            "seed": 0,
            "timeout_s": 300,
            "num_images": 8,
        },
        registry,
        settings,
    )
    assert out["model"] == "tiny-idle"
    assert (out["width"], out["height"], out["steps"]) == (128, 96, 7)
    assert out["guidance_scale"] == 0.0  # zero is a value, not "unset"
    assert out["scheduler"] == "ddim"
    assert out["seed"] == 0  # zero is a seed, not "draw one"
    assert out["timeout_s"] == 300
    # The largest seed is accepted.
    assert validate_request({"prompt": P, "seed": MAX_SEED}, registry, settings)["seed"] == MAX_SEED


def test_seeds_are_drawn_independently(make_settings: Any, models_file: str) -> None:
    settings, registry = make_settings(), Registry.load(models_file)
    seeds = {validate_request({"prompt": P}, registry, settings)["seed"] for _ in range(20)}
    assert len(seeds) > 1
    assert all(0 <= s <= MAX_SEED - 8 for s in seeds)  # seed + 7 stays within 32 bits


def test_strength_defaults_only_with_an_image(make_settings: Any, models_file: str) -> None:
    settings, registry = make_settings(), Registry.load(models_file)
    uri = IMAGE
    with_image = validate_request({"prompt": P, "image": uri}, registry, settings)
    assert with_image["strength"] == 0.6
    assert with_image["image"] == uri
    chosen = validate_request({"prompt": P, "image": uri, "strength": 0.25}, registry, settings)
    assert chosen["strength"] == 0.25
    without = validate_request({"prompt": P}, registry, settings)
    assert without["strength"] is None
    # JPEG and WEBP data URIs and https URLs are accepted as well.
    for fmt in ("JPEG", "WEBP"):
        uri = data_uri(png(size=(16, 16), fmt=fmt), f"image/{fmt.lower()}")
        assert validate_request({"prompt": P, "image": uri}, registry, settings)["strength"] == 0.6
    url = "https://images.example.com/cat.png"
    assert validate_request({"prompt": P, "image": url}, registry, settings)["image"] == url


def test_http_webhook_and_image_allowed_by_setting(make_settings: Any, models_file: str) -> None:
    registry = Registry.load(models_file)
    body = {"prompt": P, "webhook": "http://127.0.0.1:9/hook", "image": "http://h.example/i.png"}
    with pytest.raises(InvalidRequest) as info:
        validate_request(body, registry, make_settings(allow_http=False))
    assert {f["field"] for f in info.value.fields} == {"webhook", "image"}
    out = validate_request(
        body, registry, make_settings(allow_http=True, egress_allowlist="127.0.0.1")
    )
    assert out["webhook"] == body["webhook"]


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest",
        "https://[::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://[fd00::1]/hook",
        "https://192.168.0.10:8443/hook",
    ],
)
def test_literal_private_addresses_are_refused_at_submit(
    make_settings: Any, models_file: str, url: str
) -> None:
    registry = Registry.load(models_file)
    for field in ("webhook", "image"):
        with pytest.raises(InvalidRequest) as info:
            validate_request({"prompt": P, field: url}, registry, make_settings())
        assert info.value.fields == [{"field": field, "message": info.value.fields[0]["message"]}]
        assert "not a public address" in info.value.fields[0]["message"]
    # A host name is checked when it is called (its address can change): accepted here.
    assert validate_request(
        {"prompt": P, "webhook": "https://hooks.example.com/x"}, registry, make_settings()
    )["webhook"]


def test_metadata_at_the_limit_is_accepted(make_settings: Any, models_file: str) -> None:
    registry, settings = Registry.load(models_file), make_settings()
    # {"k":"…"} is 8 bytes of JSON around the value.
    ok = {"k": "v" * (4096 - 8)}
    assert validate_request({"prompt": P, "metadata": ok}, registry, settings)["metadata"] == ok
    with pytest.raises(InvalidRequest):
        validate_request({"prompt": P, "metadata": {"k": "v" * (4096 - 7)}}, registry, settings)


def test_timeout_at_the_setting_is_accepted(make_settings: Any, models_file: str) -> None:
    settings = make_settings(job_timeout_s=120)
    out = validate_request({"prompt": P, "timeout_s": 120}, Registry.load(models_file), settings)
    assert out["timeout_s"] == 120
