"""The typed normalised requests (producer/core/normalized.py) say what validation really
returns: every key, with its type, checked strictly by pydantic on real normalisations;
a key a feature adds only when used is ``NotRequired``. No server: validation only."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter

from producer.core.contract import JobRequest
from producer.core.normalized import GenerateRequest, TrainingRequest
from producer.core.registry import Registry
from producer.core.settings import Settings
from producer.core.train_contract import TrainRequest
from producer.requests.generate import validate_request
from producer.requests.train import validate_training
from tests.helpers import data_uri, png

IMG = data_uri(png((200, 30, 60)))
P = "a red fox in the snow"


@pytest.fixture(scope="module")
def settings(models_file: str) -> Settings:
    return Settings(models_file=models_file, default_model="tiny-sdxl")


@pytest.fixture(scope="module")
def registry(settings: Settings) -> Registry:
    return Registry.load(settings.models_file)


def keys(td: Any) -> tuple[set[str], set[str]]:
    return set(td.__required_keys__), set(td.__optional_keys__)


GENERATIONS: list[tuple[str, dict[str, Any]]] = [
    ("plain", {"prompt": P}),
    ("img2img-inpaint", {"prompt": P, "image": IMG, "mask": IMG, "preview": True}),
    (
        "loras-sweep",
        {
            "prompt": P,
            "loras": [{"name": "storage:loras/a.safetensors", "scale": 0.5}],
            "sweep": {"seeds": [1, 2], "guidance_scale": [3, 7.5]},
        },
    ),
    (
        "control-references",
        {
            "prompt": P,
            "control": [{"name": "tiny-sdxl-canny", "image": IMG, "preprocess": "canny"}],
            "references": [{"image": IMG, "mode": "style"}],
            "expires_in_s": 60,
            "webhook": "https://example.com/hook",
        },
    ),
]


@pytest.mark.parametrize("body", [pytest.param(b, id=i) for i, b in GENERATIONS])
def test_a_generation_normalizes_to_its_typed_form(
    body: dict[str, Any], registry: Registry, settings: Settings
) -> None:
    out = validate_request(body, registry, settings)
    required, optional = keys(GenerateRequest)
    assert required <= set(out) <= required | optional
    # Strict: a str where an int is typed, or a None where a str is, fails.
    assert TypeAdapter(GenerateRequest).validate_python(out, strict=True) == out


def test_the_generation_keys_are_the_shape_s_fields() -> None:
    required, optional = keys(GenerateRequest)
    assert required | optional == set(JobRequest.model_fields)
    # The keys a request that does not use the feature leaves out.
    assert optional == {"mask", "loras", "sweep", "preview", "control", "references"}


def test_a_training_normalizes_to_its_typed_form(registry: Registry, settings: Settings) -> None:
    required, optional = keys(TrainingRequest)
    assert required | optional == set(TrainRequest.model_fields)
    for body in (
        {"images": [IMG], "instance_prompt": "a photo of sks fox"},
        {
            "images": [IMG, IMG],
            "instance_prompt": "a photo of sks fox",
            "captions": ["one", "two"],
            "prior_preservation": True,
            "class_prompt": "a photo of a fox",
            "train_text_encoder": True,
        },
    ):
        out = validate_training(body, registry, settings)
        assert required <= set(out) <= required | optional
        assert TypeAdapter(TrainingRequest).validate_python(out, strict=True) == out
    assert optional <= set(out)  # the second uses every optional knob
