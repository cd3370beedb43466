"""The tiny models loaded in this process as the worker loads them, with the worker's
conditioning (worker/generation/conditioning.py), and the inputs the conditioning tests
give them: what tests/test_conditioning.py and tests/test_conditioning_flux.py share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from producer.core.registry import Registry
from producer.core.settings import Settings

PROMPT = "a lighthouse"
SEED = 11


def control_image() -> Image.Image:
    """Noise with a bright square: something for Canny to find, and for a ControlNet."""
    img = Image.effect_noise((64, 64), 60).convert("RGB")
    img.paste((255, 255, 255), (16, 16, 48, 48))
    return img


def reference_image() -> Image.Image:
    return Image.linear_gradient("L").resize((64, 64)).convert("RGB")


class Loaded:
    """A tiny model loaded as the worker loads it, with the worker's conditioning."""

    def __init__(self, name: str, models_dir: Path) -> None:
        from worker.diffusion.pipelines import load_model
        from worker.generation.conditioning import Conditioning

        settings = Settings(models_dir=str(models_dir), device="cpu")
        registry = Registry.load()
        self.model = load_model(registry[name], settings, "cpu")
        self.cond = Conditioning(settings, registry)

    def run(
        self,
        task: int = 0,
        control: list[dict[str, Any]] | None = None,
        control_images: list[Any] | None = None,
        refs: list[dict[str, Any]] | None = None,
        ref_images: list[Any] | None = None,
        **extra: Any,
    ) -> np.ndarray:
        """One generation the way worker/generation/generate.py orders it: the task's
        pipeline (the ControlNet one with control), the adapter attached and detached."""
        from worker.generation.conditioning import control_kwargs

        model = self.model
        pipe = (model.pipe, model.img2img, model.inpaint)[task]
        kwargs: dict[str, Any] = dict(extra)
        if control:
            req: Any = {"control": control}
            inputs = type("I", (), {"control": control_images})
            pipe, ckw = self.cond.pipeline(model, req, inputs, task)
            assert ckw == control_kwargs(control, control_images or [], task, model.spec.pipeline)
            kwargs.update(ckw)
        pipe.scheduler = model.scheduler(model.spec.scheduler)
        try:
            if refs:
                kwargs.update(self.cond.ip_adapters.attach(model, pipe, refs, ref_images or []))
            self.last_pipe = pipe
            return generate(pipe, guidance_scale=model.spec.guidance_scale, **kwargs)
        finally:
            if refs:
                self.cond.ip_adapters.detach(model, pipe)


def generate(pipe: Any, **kwargs: Any) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = pipe(
            prompt=PROMPT,
            num_inference_steps=2,
            width=64,
            height=64,
            generator=[torch.Generator("cpu").manual_seed(SEED)],
            **kwargs,
        )
    return np.asarray(out.images[0])


def entry(name: str = "tiny-sdxl-canny", **values: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": "-",
        "scale": 1.0,
        "start": 0.0,
        "end": 1.0,
        "preprocess": "none",
        **values,
    }
