"""Trainings refused at submit, by field, nothing enqueued: the request's own fields, and
the images (zips that leave their archive, hold other files, a bomb; addresses)."""

from __future__ import annotations

from typing import Any

import pytest

from producer.core.errors import InvalidRequest
from producer.core.registry import Registry
from producer.core.settings import Settings
from producer.requests.train import validate_training
from tests.training_inputs import PROMPT, SUBJECT, photo, zip_uri


def refused(data: dict[str, Any], settings: Settings | None = None) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as info:
        validate_training(data, Registry.load(), settings or Settings(default_model="tiny-sdxl"))
    return {f["field"]: f["message"] for f in info.value.fields}


def test_bad_trainings_are_refused_by_field() -> None:
    ok = {"images": SUBJECT, "instance_prompt": PROMPT}
    validate_training(ok, Registry.load(), Settings(default_model="tiny-sdxl"))
    assert "images" in refused({**ok, "images": []})
    assert "class_prompt" in refused({**ok, "prior_preservation": True})
    assert "captions" in refused({**ok, "captions": ["one"]})
    assert "model" in refused({**ok, "model": "tiny-flux"})
    assert "lr_scheduler" in refused({**ok, "lr_scheduler": "step"})
    assert "resolution" in refused({**ok, "resolution": 1024})
    assert "learning_rate" in refused({**ok, "learning_rate": 0.5})
    bad = refused({**ok, "images": [zip_uri({"../evil.png": photo((1, 2, 3))})]})
    assert "leaves the archive" in bad["images.0"]
    bad = refused({**ok, "images": [zip_uri({"a.png": photo((1, 2, 3)), "notes.txt": b"hi"})]})
    assert "notes.txt" in bad["images.0"]
    bad = refused({**ok, "images": [zip_uri({"a.png": b"not a png"})]})
    assert "a.png" in bad["images.0"]
    # A bomb: entries past the cap, and a small zip that inflates past the size cap.
    bad = refused(
        {**ok, "images": [zip_uri({f"{i}.png": b"x" for i in range(20)})]},
        Settings(default_model="tiny-sdxl", train_zip_max_entries=10),
    )
    assert "20 entries" in bad["images.0"]
    bad = refused(
        {**ok, "images": [zip_uri({"big.png": b"\0" * 4_000_000})]},
        Settings(default_model="tiny-sdxl", train_zip_max_bytes=1_000_000),
    )
    assert "bytes uncompressed" in bad["images.0"]
    bad = refused({**ok, "images": [*SUBJECT, zip_uri({"a.png": photo((1, 2, 3))})]})
    assert "only entry" in bad["images.2"]
    bad = refused({**ok, "images": ["http://10.0.0.1/x.png", "storage:../x.png"]})
    assert set(bad) == {"images.0", "images.1"}
