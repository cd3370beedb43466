"""The request contract: every bad input is refused, named, and leaves nothing behind.

Requests go through ``producer.Client.submit`` against a real redis-server, in a Redis
database of their own that is emptied before each test, so "nothing was written" is
checked on the whole database, Celery's queue lists included.

This module is the bad-input matrix. What a good request becomes is in
``tests/test_contract_normalization.py``; refusals and records through the client are in
``tests/test_contract_records.py``.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import redis

from producer import Client, InvalidRequest
from producer.core import keys as K
from producer.core.contract import Kind
from producer.requests.generate import validate_request
from tests.helpers import data_uri, png
from tests.records import job_keys, queue_keys

#: This module's Redis database (tests/test_contract_normalization.py names it too, for its
#: settings, and writes nothing there).
DB = 13

#: A small PNG as a data: URI (tests/helpers.py makes every test image).
IMAGE = data_uri(png(size=(16, 16)))


def noise_uri(size: tuple[int, int]) -> str:
    """A PNG of random pixels (it does not compress) as a data: URI."""
    from PIL import Image

    pixels = random.Random(0).randbytes(size[0] * size[1] * 3)
    return data_uri(png(Image.frombytes("RGB", size, pixels)))


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
