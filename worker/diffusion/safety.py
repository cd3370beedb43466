"""The optional safety checker: flags images, which are then blurred or withheld.

Off unless ``ATELIER_SAFETY_CHECKER`` names a checker. Pluggable: anything with
``check(images) -> list[bool]`` will do (:class:`SafetyChecker`). The one built in wraps
diffusers' ``StableDiffusionSafetyChecker`` (a CLIP vision model compared with concept
embeddings), loaded from a folder or hub repo holding its safetensors weights and its
CLIP image-processor config, e.g. ``CompVis/stable-diffusion-safety-checker``; tests use
``builtin:tiny-safety-checker`` (random weights, a threshold they choose).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from producer.core.settings import Settings

log = logging.getLogger(__name__)


class SafetyChecker(Protocol):
    def check(self, images: list[Any]) -> list[bool]:
        """One flag per image: True means the image should not be shown as it is."""
        ...


class ClipSafetyChecker:
    def __init__(self, source: str, device: str = "cpu") -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        self.model = StableDiffusionSafetyChecker.from_pretrained(source, use_safetensors=True)
        self.model.to(device).eval()  # type: ignore[arg-type]
        self.processor = CLIPImageProcessor.from_pretrained(source)
        self.device = device

    def _clip_input(self, images: list[Any]) -> Any:
        pixel_values = self.processor(
            [im.convert("RGB") for im in images], return_tensors="pt"
        ).pixel_values
        return pixel_values.to(self.device, dtype=self.model.dtype)

    def scores(self, images: list[Any]) -> list[float]:
        """Each image's highest cosine similarity to a concept, before the thresholds."""
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        with torch.inference_mode():
            pooled = self.model.vision_model(self._clip_input(images))[1]
            embeds = self.model.visual_projection(pooled)
            cos = cosine_distance(embeds, self.model.concept_embeds)
        return [float(row.max()) for row in cos.float().cpu()]

    def check(self, images: list[Any]) -> list[bool]:
        import numpy as np
        import torch

        with torch.inference_mode():
            placeholders = [np.zeros((1, 1, 3)) for _ in images]
            _, flags = self.model(clip_input=self._clip_input(images), images=placeholders)
        return [bool(f) for f in flags]


def load_checker(settings: Settings, device: str) -> SafetyChecker | None:
    source = settings.safety_checker
    if not source:
        return None
    if source.startswith("builtin:"):
        from worker.builtin.tiny import ensure_builtin

        source = str(ensure_builtin(source.removeprefix("builtin:"), settings.models_dir))
    elif Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser())
    checker = ClipSafetyChecker(source, device)
    log.info(
        "safety checker %s loaded; flagged images are %s",
        settings.safety_checker,
        "withheld" if settings.safety_action == "withhold" else "blurred",
    )
    return checker


def blur(image: Any) -> Any:
    """Blurred past recognition, same size."""
    from PIL import ImageFilter

    radius = max(8, max(image.size) // 12)
    return image.filter(ImageFilter.GaussianBlur(radius))


def placeholder(size: tuple[int, int]) -> Any:
    """What a contact sheet shows in place of a withheld image."""
    from PIL import Image

    return Image.new("RGB", size, (128, 128, 128))
