"""The request contract through ``producer.Client.submit`` against a real redis-server,
in a Redis database of this module's own (emptied around each test): a good request is
recorded and enqueued, its record holds the normalised request; a refused one names every
bad field and writes nothing.
"""

from __future__ import annotations

import math

import pytest
import redis

from producer import Client, InvalidRequest, UnknownModel
from producer.core import keys as K
from producer.core.contract import MAX_SEED
from tests.helpers import data_uri, png
from tests.records import QUEUE, job_keys, queue_keys, queued_messages, request_of

#: A database no other test file uses, so its contents are ours alone.
DB = 8

P = "a red fox in the snow"
IMAGE = data_uri(png(size=(16, 16)))


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
