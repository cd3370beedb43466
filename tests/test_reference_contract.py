"""``control`` and ``references`` at submit: each bad entry refused by its field path,
nothing written; inline control and reference images stashed like ``image``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, InvalidRequest, Settings
from producer.core.params import generation_params
from tests.helpers import data_uri, png
from tests.records import request_of

P = "a red fox in the snow"
DB = 12  # a database of this file's own


@pytest.fixture
def client(redis_url: str, models_file: str, tmp_path: Any) -> Iterator[Client]:
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    c = Client(
        Settings(
            redis_url=url,
            default_model="tiny-sdxl",
            models_file=models_file,
            models_dir=str(tmp_path),
        )
    )
    yield c
    c.close()
    r.flushdb()
    r.close()


IMG = data_uri(png((200, 30, 60)))
CN = "tiny-sdxl-canny"
BAD: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "scale",
        {"control": [{"name": CN, "image": IMG}, {"name": CN, "image": IMG, "scale": 2.5}]},
        ["control.1.scale"],
    ),
    (
        "start-end",
        {"control": [{"name": CN, "image": IMG, "start": 0.6, "end": 0.4}]},
        ["control.0.end"],
    ),
    ("too-many", {"control": [{"name": CN, "image": IMG}] * 3}, ["control"]),
    ("unknown", {"control": [{"name": "nope", "image": IMG}]}, ["control.0.name"]),
    ("other-family", {"control": [{"name": "tiny-sd15-canny", "image": IMG}]}, ["control.0.name"]),
    (
        "preprocess",
        {"control": [{"name": CN, "image": IMG, "preprocess": "depth"}]},
        ["control.0.preprocess"],
    ),
    (
        "private-url",
        {"control": [{"name": CN, "image": "http://10.1.2.3/a.png"}]},
        ["control.0.image"],
    ),
    (
        "bad-data",
        {"control": [{"name": CN, "image": "data:image/png;base64,AAAA"}]},
        ["control.0.image"],
    ),
    (
        "flux-sdxl-net",
        {"model": "tiny-flux", "control": [{"name": CN, "image": IMG}]},
        ["control.0.name"],
    ),
    (
        "flux-ref-style",
        {"model": "tiny-flux", "references": [{"image": IMG}, {"image": IMG, "mode": "style"}]},
        ["references.1.mode"],
    ),
    (
        "flux-ref-subject",
        {"model": "tiny-flux", "references": [{"image": IMG, "mode": "subject"}]},
        ["references.0.mode"],
    ),
    (
        "flux-ref-control-img2img",
        {
            "model": "tiny-flux",
            "image": IMG,
            "control": [{"name": "tiny-flux-canny", "image": IMG}],
            "references": [{"image": IMG}],
        },
        ["references"],
    ),
    (
        "flux-ref-control-inpaint",
        {
            "model": "tiny-flux",
            "image": IMG,
            "mask": IMG,
            "control": [{"name": "tiny-flux-canny", "image": IMG}],
            "references": [{"image": IMG}],
        },
        ["references"],
    ),
    ("ref-scale", {"references": [{"image": IMG, "scale": -0.1}]}, ["references.0.scale"]),
    ("ref-mode", {"references": [{"image": IMG, "mode": "layout"}]}, ["references.0.mode"]),
    ("ref-too-many", {"references": [{"image": IMG}] * 5}, ["references"]),
    (
        "ref-no-adapter",
        {"model": "tiny-sdxl-turbo", "references": [{"image": IMG}]},
        ["references"],
    ),
    (
        "ref-image",
        {"references": [{"image": IMG}, {"image": "ftp://example.com/a.png"}]},
        ["references.1.image"],
    ),
    ("ref-unknown-key", {"references": [{"image": IMG, "weight": 1}]}, ["references.0.weight"]),
]


@pytest.mark.parametrize(("body", "fields"), [pytest.param(b, f, id=i) for i, b, f in BAD])
def test_bad_entries_are_refused_by_path(
    client: Client, body: dict[str, Any], fields: list[str]
) -> None:
    with pytest.raises(InvalidRequest) as info:
        client.submit(prompt=P, **body)
    assert [f["field"] for f in info.value.fields] == fields, info.value.fields
    assert client.store.redis.dbsize() == 0  # nothing written


def test_entries_are_normalized_and_their_images_stashed(client: Client) -> None:
    job = client.submit(
        prompt=P,
        control=[{"name": CN, "image": IMG, "preprocess": "canny"}],
        references=[{"image": IMG, "mode": "style"}],
    )
    req = request_of(client.get(job))
    assert req["control"] == [
        {
            "name": CN,
            "image": req["control"][0]["image"],
            "scale": 1.0,
            "start": 0.0,
            "end": 1.0,
            "preprocess": "canny",
        }
    ]
    assert req["control"][0]["image"].startswith("sha256:")
    assert req["references"][0]["image"] == req["control"][0]["image"]  # the same bytes
    assert req["references"][0]["scale"] == 0.6
    params = generation_params(req)
    assert params["references"] == [{"scale": 0.6, "mode": "style"}]  # no input image
    plain = request_of(client.get(client.submit(prompt=P)))
    assert not {"control", "references"} & set(plain)


def test_flux_takes_full_references_with_control_and_with_img2img(client: Client) -> None:
    net = [{"name": "tiny-flux-canny", "image": IMG}]
    refs = [{"image": IMG}, {"image": IMG, "mode": "full", "scale": 1.2}]
    with_control = request_of(
        client.get(client.submit(prompt=P, model="tiny-flux", control=net, references=refs))
    )
    assert [(r["mode"], r["scale"]) for r in with_control["references"]] == [
        ("full", 0.6),
        ("full", 1.2),
    ]
    img2img = request_of(
        client.get(client.submit(prompt=P, model="tiny-flux", image=IMG, references=refs[:1]))
    )
    assert img2img["references"][0]["mode"] == "full" and img2img["strength"] is not None


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        (
            '[controlnets.x]\nsource = "a/b"\nfamily = "simulated"\nkind = "canny"',
            "family must be one of",
        ),
        (
            '[controlnets.x]\nsource = "a/b"\nfamily = "sdxl"',
            "needs a string source, family and kind",
        ),
        (
            '[controlnets.x]\nsource = "a/b"\nfamily = "sdxl"\nkind = "canny"\nscale = 1',
            "unknown keys ['scale']",
        ),
        (
            '[models."tiny-sdxl".ip_adapter]\nsource = "h94/IP-Adapter"\nweight_name = "a.bin"',
            "weight_name must be a .safetensors file",
        ),
        (
            '[models.s]\npipeline = "simulated"\nsource = "builtin:simulated"\n'
            '[models.s.ip_adapter]\nsource = "x"\nweight_name = "a.safetensors"',
            "ip_adapter applies to sdxl, sd15, flux only",
        ),
        (
            '[models."tiny-sdxl".ip_adapter]\nsource = "x"\nweight_name = "a.safetensors"\n'
            'image_encoder_source = "openai/clip-vit-large-patch14"',
            "image_encoder_source is for flux models, in place of image_encoder",
        ),
        (
            '[models."tiny-flux".ip_adapter]\nsource = "x"\nweight_name = "a.safetensors"\n'
            'image_encoder = "enc"\nimage_encoder_source = "openai/clip-vit-large-patch14"',
            "image_encoder_source is for flux models, in place of image_encoder",
        ),
    ],
)
def test_registry_entries_are_checked(tmp_path: Path, toml: str, says: str) -> None:
    from producer.core.registry import Registry

    path = tmp_path / "models.toml"
    path.write_text(toml)
    with pytest.raises(ValueError, match=re.escape(says)):
        Registry.load(str(path))


def test_tiny_controlnet_and_ip_adapter_build_to_the_same_bytes(
    tmp_path: Path, models_dir: Path
) -> None:
    from safetensors import safe_open

    from worker.builtin.refs import (
        FLUX_IP_ADAPTER_FILE,
        IP_ADAPTER_FILE,
        build_tiny_controlnet,
        build_tiny_ip_adapter,
    )
    from worker.builtin.tiny import ensure_builtin

    base = models_dir / "tiny-sdxl"
    net = build_tiny_controlnet(tmp_path / "cn", base) / "diffusion_pytorch_model.safetensors"
    adapter = build_tiny_ip_adapter(tmp_path / "ip", base)
    built = ensure_builtin("tiny-sdxl-controlnet", models_dir)
    assert net.read_bytes() == (built / net.name).read_bytes()
    assert (adapter / IP_ADAPTER_FILE).read_bytes() == (
        ensure_builtin("tiny-sdxl-ip-adapter", models_dir) / IP_ADAPTER_FILE
    ).read_bytes()
    encoder = "image_encoder/model.safetensors"
    assert (adapter / encoder).read_bytes() == (
        models_dir / "tiny-sdxl-ip-adapter" / encoder
    ).read_bytes()
    flux = build_tiny_ip_adapter(tmp_path / "flux-ip", ensure_builtin("tiny-flux", models_dir))
    built = ensure_builtin("tiny-flux-ip-adapter", models_dir)
    assert (flux / FLUX_IP_ADAPTER_FILE).read_bytes() == (built / FLUX_IP_ADAPTER_FILE).read_bytes()
    with safe_open(str(built / FLUX_IP_ADAPTER_FILE), framework="pt") as f:
        keys = set(f.keys())  # XLabs' layout: tiny-flux has one double block
    assert keys == {
        f"ip_adapter_proj_model.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")
    } | {
        f"double_blocks.0.processor.ip_adapter_double_stream_{kv}_proj.{p}"
        for kv in ("k", "v")
        for p in ("weight", "bias")
    }
