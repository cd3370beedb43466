"""The request contract: every bad input is refused, named, and leaves nothing behind.

Requests go through ``producer.Client.submit`` against a real redis-server, in a Redis
database of their own that is emptied before each test, so "nothing was written" is
checked on the whole database, Celery's queue lists included.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, InvalidRequest, Settings, UnknownModel
from producer.core import keys as K
from producer.core.contract import MAX_SEED, Kind
from producer.core.registry import Registry
from producer.requests.generate import validate_request
from tests.helpers import data_uri, png
from tests.records import request_of

#: A database no other test file uses, so its contents are ours alone.
DB = 13
QUEUE = K.queue_name("tiny-sdxl")  # "atelier.tiny-sdxl"


#: A small PNG as a data: URI (tests/helpers.py makes every test image).
IMAGE = data_uri(png(size=(16, 16)))


def noise_uri(size: tuple[int, int]) -> str:
    """A PNG of random pixels (it does not compress) as a data: URI."""
    from PIL import Image

    pixels = random.Random(0).randbytes(size[0] * size[1] * 3)
    return data_uri(png(Image.frombytes("RGB", size, pixels)))


@pytest.fixture
def db_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{DB}"


@pytest.fixture
def rdb(db_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(db_url)
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


@pytest.fixture
def make_settings(db_url: str, models_file: str, tmp_path: Path) -> Any:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": db_url,
            "default_model": "tiny-sdxl",
            "models_file": models_file,
            "models_dir": str(tmp_path),
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def client(make_settings: Any) -> Iterator[Client]:
    c = Client(make_settings())
    yield c
    c.close()


def job_keys(r: redis.Redis) -> list[bytes]:
    return list(r.scan_iter(match=K.JOB + "*"))


def queue_keys(r: redis.Redis) -> list[bytes]:
    return [k for k in r.scan_iter(match="*") if k.decode().startswith(QUEUE)]


def queued_messages(r: redis.Redis) -> int:
    return sum(r.llen(k) for k in queue_keys(r) if r.type(k) == b"list")


P = "a red fox in the snow"

BAD: list[tuple[str, Any, str, dict[str, Any]]] = [
    # (case id, body, field expected in exc.fields, settings overrides)
    ("missing-prompt", {"steps": 4}, "prompt", {}),
    ("blank-prompt", {"prompt": " \t\n "}, "prompt", {}),
    ("empty-prompt", {"prompt": ""}, "prompt", {}),
    ("prompt-too-long", {"prompt": "x" * 4001}, "prompt", {}),
    ("prompt-not-str", {"prompt": 42}, "prompt", {}),
    (
        "negative-prompt-too-long",
        {"prompt": P, "negative_prompt": "y" * 4001},
        "negative_prompt",
        {},
    ),
    ("unknown-field", {"prompt": P, "sampler": "euler"}, "sampler", {}),
    ("unknown-model", {"prompt": P, "model": "sd-9000"}, "model", {}),
    ("width-not-multiple-of-8", {"prompt": P, "width": 100}, "width", {}),
    ("height-not-multiple-of-8", {"prompt": P, "height": 68}, "height", {}),
    ("width-below-64", {"prompt": P, "width": 56}, "width", {}),
    ("width-above-max-side", {"prompt": P, "width": 520}, "width", {}),
    ("height-above-max-side", {"prompt": P, "height": 1024}, "height", {}),
    (
        "pixels-above-max",
        {"prompt": P, "model": "playground-v2.5", "width": 2048, "height": 2048},
        "width",
        {},
    ),
    ("steps-0", {"prompt": P, "steps": 0}, "steps", {}),
    ("steps-151", {"prompt": P, "steps": 151}, "steps", {}),
    ("guidance-negative", {"prompt": P, "guidance_scale": -1}, "guidance_scale", {}),
    ("guidance-31", {"prompt": P, "guidance_scale": 31}, "guidance_scale", {}),
    ("guidance-nan", {"prompt": P, "guidance_scale": math.nan}, "guidance_scale", {}),
    ("guidance-inf", {"prompt": P, "guidance_scale": math.inf}, "guidance_scale", {}),
    ("guidance-string", {"prompt": P, "guidance_scale": "3"}, "guidance_scale", {}),
    ("scheduler-not-allowed", {"prompt": P, "scheduler": "edm_euler"}, "scheduler", {}),
    ("scheduler-unknown", {"prompt": P, "scheduler": "magic"}, "scheduler", {}),
    (
        "scheduler-of-other-model",
        {"prompt": P, "model": "tiny-idle", "scheduler": "unipc"},
        "scheduler",
        {},
    ),
    ("seed-negative", {"prompt": P, "seed": -1}, "seed", {}),
    ("seed-2**32", {"prompt": P, "seed": 2**32}, "seed", {}),
    ("seed-fraction", {"prompt": P, "seed": 1.5}, "seed", {}),
    ("num-images-0", {"prompt": P, "num_images": 0}, "num_images", {}),
    ("num-images-9", {"prompt": P, "num_images": 9}, "num_images", {}),
    ("image-http", {"prompt": P, "image": "http://example.com/a.png"}, "image", {}),
    ("image-ftp", {"prompt": P, "image": "ftp://example.com/a.png"}, "image", {}),
    ("image-bare-path", {"prompt": P, "image": "/etc/passwd"}, "image", {}),
    ("image-file-url", {"prompt": P, "image": "file:///etc/passwd"}, "image", {}),
    (
        "image-https-with-credentials",
        {"prompt": P, "image": "https://u:p@example.com/a.png"},
        "image",
        {},
    ),
    (
        "image-data-not-image",
        {
            "prompt": P,
            "image": data_uri(b"hello, not a png"),
        },
        "image",
        {},
    ),
    ("image-data-not-base64", {"prompt": P, "image": "data:image/png;base64,@@@!"}, "image", {}),
    (
        "image-data-not-base64-encoded",
        {"prompt": P, "image": "data:image/png,rawbytes"},
        "image",
        {},
    ),
    (
        "image-data-gif",
        {
            "prompt": P,
            "image": data_uri(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif"),
        },
        "image",
        {},
    ),
    (
        "image-data-too-large",
        {"prompt": P, "image": noise_uri((64, 64))},
        "image",
        {"max_image_bytes": 4096},
    ),
    (
        "image-data-not-image-type",
        {"prompt": P, "image": data_uri(png(size=(16, 16)), "text/plain")},
        "image",
        {},
    ),
    ("image-not-str", {"prompt": P, "image": 7}, "image", {}),
    ("strength-without-image", {"prompt": P, "strength": 0.5}, "strength", {}),
    ("strength-1.5", {"prompt": P, "image": IMAGE, "strength": 1.5}, "strength", {}),
    ("strength-negative", {"prompt": P, "image": IMAGE, "strength": -0.1}, "strength", {}),
    ("output-format-gif", {"prompt": P, "output_format": "gif"}, "output_format", {}),
    ("quality-0", {"prompt": P, "quality": 0}, "quality", {}),
    ("quality-101", {"prompt": P, "quality": 101}, "quality", {}),
    (
        "webhook-http",
        {"prompt": P, "webhook": "http://hooks.example.com/x"},
        "webhook",
        {"allow_http": False},
    ),
    (
        "webhook-ftp",
        {"prompt": P, "webhook": "ftp://hooks.example.com/x"},
        "webhook",
        {"allow_http": True},
    ),
    ("webhook-no-host", {"prompt": P, "webhook": "https:///x"}, "webhook", {}),
    (
        "webhook-events-unknown",
        {"prompt": P, "webhook_events": ["completed", "finished"]},
        "webhook_events",
        {},
    ),
    (
        "webhook-events-duplicate",
        {"prompt": P, "webhook_events": ["started", "started"]},
        "webhook_events",
        {},
    ),
    ("webhook-events-not-list", {"prompt": P, "webhook_events": "completed"}, "webhook_events", {}),
    ("metadata-too-large", {"prompt": P, "metadata": {"blob": "z" * 4096}}, "metadata", {}),
    ("metadata-not-object", {"prompt": P, "metadata": ["a"]}, "metadata", {}),
    ("metadata-nan", {"prompt": P, "metadata": {"x": math.nan}}, "metadata", {}),
    ("priority-10", {"prompt": P, "priority": 10}, "priority", {}),
    ("priority-negative", {"prompt": P, "priority": -1}, "priority", {}),
    ("timeout-0", {"prompt": P, "timeout_s": 0}, "timeout_s", {}),
    ("timeout-above-setting", {"prompt": P, "timeout_s": 601}, "timeout_s", {"job_timeout_s": 600}),
    ("expires-in-0", {"prompt": P, "expires_in_s": 0}, "expires_in_s", {}),
    ("bool-for-int-steps", {"prompt": P, "steps": True}, "steps", {}),
    ("bool-for-int-width", {"prompt": P, "width": True}, "width", {}),
    ("bool-for-int-priority", {"prompt": P, "priority": False}, "priority", {}),
    ("bool-for-float", {"prompt": P, "guidance_scale": True}, "guidance_scale", {}),
    ("string-for-int", {"prompt": P, "steps": "20"}, "steps", {}),
    (
        "strength-leaves-no-step",
        {"prompt": P, "image": IMAGE, "strength": 0.2, "steps": 4},
        "strength",
        {},
    ),
    (
        "default-strength-leaves-no-step",
        {"prompt": P, "image": IMAGE, "steps": 1},
        "strength",
        {},
    ),
    ("seed-plus-images-overflows", {"prompt": P, "seed": 2**32 - 2, "num_images": 3}, "seed", {}),
    ("expires-in-too-far", {"prompt": P, "expires_in_s": 10**12}, "expires_in_s", {}),
    ("model-empty", {"prompt": P, "model": ""}, "model", {}),
    ("body-list", ["a red fox"], "body", {}),
    ("body-string", "a red fox", "body", {}),
    ("body-none", None, "body", {}),
]

# Issue 7's fields: inpainting, LoRAs, sweeps, model families.
BAD += [
    ("mask-without-image", {"prompt": P, "mask": IMAGE}, "mask", {}),
    (
        "mask-other-size",
        {"prompt": P, "image": IMAGE, "mask": data_uri(png(size=(24, 16)))},
        "mask",
        {},
    ),
    (
        "mask-not-image",
        {
            "prompt": P,
            "image": IMAGE,
            "mask": data_uri(b"not a png"),
        },
        "mask",
        {},
    ),
    (
        "mask-ftp",
        {"prompt": P, "image": IMAGE, "mask": "ftp://example.com/m.png"},
        "mask",
        {},
    ),
    ("mask-not-str", {"prompt": P, "image": IMAGE, "mask": 1}, "mask", {}),
    ("lora-unknown", {"prompt": P, "loras": [{"name": "nope"}]}, "loras", {}),
    ("lora-no-name", {"prompt": P, "loras": [{"scale": 1.0}]}, "loras", {}),
    (
        "lora-extra-key",
        {"prompt": P, "loras": [{"name": "tiny-sdxl-lora", "weight": 1}]},
        "loras",
        {},
    ),
    (
        "lora-scale-5",
        {"prompt": P, "loras": [{"name": "tiny-sdxl-lora", "scale": 5.0}]},
        "loras",
        {},
    ),
    (
        "lora-scale-nan",
        {"prompt": P, "loras": [{"name": "tiny-sdxl-lora", "scale": math.nan}]},
        "loras",
        {},
    ),
    ("lora-repeated", {"prompt": P, "loras": [{"name": "tiny-sdxl-lora"}] * 2}, "loras", {}),
    (
        "lora-five",
        {"prompt": P, "loras": [{"name": f"storage:{i}.safetensors"} for i in range(5)]},
        "loras",
        {},
    ),
    (
        "lora-storage-not-safetensors",
        {"prompt": P, "loras": [{"name": "storage:a.ckpt"}]},
        "loras",
        {},
    ),
    (
        "lora-storage-dotdot",
        {"prompt": P, "loras": [{"name": "storage:../x.safetensors"}]},
        "loras",
        {},
    ),
    (
        "lora-storage-absolute",
        {"prompt": P, "loras": [{"name": "storage:/x.safetensors"}]},
        "loras",
        {},
    ),
    ("loras-not-list", {"prompt": P, "loras": "tiny-sdxl-lora"}, "loras", {}),
    (
        "lora-of-other-family",
        {"prompt": P, "model": "tiny-sd15", "loras": [{"name": "tiny-sdxl-lora"}]},
        "loras",
        {},
    ),
    (
        "flux-negative-prompt",
        {"prompt": P, "model": "tiny-flux", "negative_prompt": "fog"},
        "negative_prompt",
        {},
    ),
    (
        "flux-guidance",
        {"prompt": P, "model": "tiny-flux", "guidance_scale": 3.5},
        "guidance_scale",
        {},
    ),
    ("flux-width-not-16", {"prompt": P, "model": "tiny-flux", "width": 72}, "width", {}),
    ("flux-weighting", {"prompt": "a (red:1.3) fox", "model": "tiny-flux"}, "prompt", {}),
    (
        "turbo-negative-without-guidance",
        {"prompt": P, "model": "tiny-sdxl-turbo", "negative_prompt": "fog"},
        "negative_prompt",
        {},
    ),
    ("sweep-no-axis", {"prompt": P, "sweep": {}}, "sweep", {}),
    (
        "sweep-three-axes",
        {"prompt": P, "sweep": {"seeds": [1], "steps": [2], "guidance_scale": [3.0]}},
        "sweep",
        {},
    ),
    (
        "sweep-too-many",
        {"prompt": P, "sweep": {"seeds": [1, 2, 3, 4, 5], "steps": [1, 2, 3, 4]}},
        "sweep",
        {},
    ),
    ("sweep-axis-too-long", {"prompt": P, "sweep": {"seeds": list(range(17))}}, "sweep", {}),
    ("sweep-repeated", {"prompt": P, "sweep": {"seeds": [1, 1]}}, "sweep", {}),
    ("sweep-unknown-axis", {"prompt": P, "sweep": {"sampler": ["euler"]}}, "sweep", {}),
    ("sweep-bad-seed", {"prompt": P, "sweep": {"seeds": [-1]}}, "sweep", {}),
    ("sweep-bad-steps", {"prompt": P, "sweep": {"steps": [0, 4]}}, "sweep", {}),
    ("sweep-bad-guidance", {"prompt": P, "sweep": {"guidance_scale": [math.inf]}}, "sweep", {}),
    ("sweep-empty-axis", {"prompt": P, "sweep": {"seeds": []}}, "sweep", {}),
    ("sweep-not-object", {"prompt": P, "sweep": [1, 2]}, "sweep", {}),
    (
        "sweep-with-num-images",
        {"prompt": P, "num_images": 2, "sweep": {"seeds": [1, 2]}},
        "num_images",
        {},
    ),
    ("sweep-seeds-with-seed", {"prompt": P, "seed": 3, "sweep": {"seeds": [1, 2]}}, "seed", {}),
    ("sweep-steps-with-steps", {"prompt": P, "steps": 3, "sweep": {"steps": [1, 2]}}, "steps", {}),
    (
        "sweep-guidance-of-flux",
        {"prompt": P, "model": "tiny-flux", "sweep": {"guidance_scale": [0.0, 1.0]}},
        "sweep",
        {},
    ),
    (
        "sweep-steps-leave-no-step",
        {"prompt": P, "image": IMAGE, "strength": 0.5, "sweep": {"steps": [1, 4]}},
        "sweep",
        {},
    ),
    (
        "negative-at-guidance-1",
        {"prompt": P, "negative_prompt": "fog", "guidance_scale": 1.0},
        "negative_prompt",
        {},
    ),
    ("preview-not-bool", {"prompt": P, "preview": "yes"}, "preview", {}),
    ("preview-number", {"prompt": P, "preview": 1}, "preview", {}),
]


def submit_raw(client: Client, body: Any) -> str:
    # ``submit(request)`` merges into a dict, so a non-dict body goes through the same
    # validation ``submit`` runs, then would be enqueued the same way.
    if isinstance(body, dict):
        return client.submit(body)
    normalized = validate_request(body, client.registry, client.settings)
    return client.intake.take(normalized, Kind.GENERATE).job_id


@pytest.mark.parametrize(
    ("body", "field", "overrides"), [pytest.param(b, f, o, id=i) for i, b, f, o in BAD]
)
def test_bad_request_is_refused_named_and_not_enqueued(
    rdb: redis.Redis, make_settings: Any, body: Any, field: str, overrides: dict[str, Any]
) -> None:
    before = set(rdb.keys("*"))
    assert before == set()  # a fresh database
    client = Client(make_settings(**overrides))
    try:
        with pytest.raises(InvalidRequest) as info:
            submit_raw(client, body)
    finally:
        client.close()
    exc = info.value
    named = {f["field"].split(".")[0] for f in exc.fields}
    assert field in named, exc.fields
    assert str(exc).strip()
    assert all(f["message"].strip() for f in exc.fields)
    assert exc.code in ("invalid_request", "unknown_model")
    # Nothing written: no record, no event, no Celery message or binding.
    assert set(rdb.keys("*")) == before
    assert job_keys(rdb) == []
    assert queue_keys(rdb) == []
    assert rdb.exists(K.GLOBAL_EVENTS) == 0


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


def test_lora_refusals_name_the_entry(client: Client) -> None:
    with pytest.raises(InvalidRequest) as info:
        client.submit(
            prompt=P,
            loras=[{"name": "tiny-sdxl-lora", "scale": 0.5}, {"name": "nope", "scale": 1.0}],
        )
    assert [f["field"] for f in info.value.fields] == ["loras.1.name"]
    assert "unknown LoRA 'nope'" in info.value.fields[0]["message"]


def test_unknown_model_has_its_own_code(client: Client, rdb: redis.Redis) -> None:
    with pytest.raises(UnknownModel) as info:
        client.submit(prompt=P, model="sd-9000")
    assert info.value.code == "unknown_model"
    msg = info.value.fields[0]["message"]
    assert "sd-9000" in msg and "tiny-sdxl" in msg  # says what exists
    assert rdb.keys("*") == []


def test_every_bad_field_is_named(client: Client, rdb: redis.Redis) -> None:
    body = {
        "prompt": "   ",
        "width": 63,
        "height": 1024,
        "steps": 0,
        "guidance_scale": math.nan,
        "scheduler": "edm_euler",
        "seed": -5,
        "num_images": 9,
        "strength": 0.3,
        "output_format": "gif",
        "quality": 0,
        "webhook": "ftp://x.example.com/",
        "webhook_events": ["completed", "completed"],
        "priority": 10,
        "timeout_s": 10**6,
        "expires_in_s": 0,
        "colour": "red",
    }
    with pytest.raises(InvalidRequest) as info:
        client.submit(body)
    named = {f["field"].split(".")[0] for f in info.value.fields}
    assert named == set(body)
    assert all(f["message"] for f in info.value.fields)
    for name in body:  # the message names each field too
        assert name in str(info.value)
    assert rdb.keys("*") == []


def test_model_dependent_checks_use_the_requested_model(client: Client, rdb: redis.Redis) -> None:
    # 1024 is fine for playground-v2.5 but above tiny-sdxl's max_side (512).
    with pytest.raises(InvalidRequest) as info:
        client.submit(prompt=P, width=1024, height=1024, scheduler="edm_euler")
    assert {f["field"] for f in info.value.fields} == {"width", "height", "scheduler"}
    job_id = client.submit(
        prompt=P, model="playground-v2.5", width=1024, height=1024, scheduler="edm_euler"
    )
    assert request_of(client.get(job_id))["scheduler"] == "edm_euler"


def test_valid_request_is_recorded_and_enqueued(client: Client, rdb: redis.Redis) -> None:
    """The positive control of the matrix: a good request does write what a bad one must not."""
    job_id = client.submit(prompt=P)
    assert job_keys(rdb) == [K.job_key(job_id).encode()]
    assert queued_messages(rdb) == 1
    assert all(k.decode().startswith(QUEUE) for k in queue_keys(rdb))
    rec = client.get(job_id)
    assert rec["status"] == "queued" and rec["id"] == job_id


def test_valid_request_is_normalized(client: Client, rdb: redis.Redis) -> None:
    spec = client.registry["tiny-sdxl"]
    job_id = client.submit(prompt=P, metadata={"user": "u1"})
    req = request_of(client.get(job_id))
    assert req["model"] == "tiny-sdxl"
    assert (req["width"], req["height"]) == (spec.width, spec.height)
    assert req["steps"] == spec.steps
    assert req["guidance_scale"] == spec.guidance_scale
    assert isinstance(req["guidance_scale"], float)
    assert req["scheduler"] == spec.scheduler
    assert isinstance(req["seed"], int) and 0 <= req["seed"] <= MAX_SEED - 8
    assert req["timeout_s"] == client.settings.job_timeout_s
    assert req["strength"] is None and req["image"] is None
    assert req["num_images"] == 1 and req["priority"] == 5
    assert req["output_format"] == "png" and req["quality"] == 90
    assert req["webhook_events"] == ["completed"]
    assert req["negative_prompt"] == ""
    assert req["metadata"] == {"user": "u1"}
    assert req["expires_in_s"] is None


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


def test_img2img_request_through_client(client: Client, rdb: redis.Redis) -> None:
    job_id = client.submit(
        prompt=P,
        image=IMAGE,
        strength=0.8,
        webhook="https://hooks.example.com/in",
        webhook_events=["started", "completed"],
    )
    req = request_of(client.get(job_id))
    assert req["strength"] == 0.8
    assert req["webhook"] == "https://hooks.example.com/in"
    assert req["webhook_events"] == ["started", "completed"]


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
