"""A stand-in for a GPU pipeline, for the benchmarks (``pipeline = "simulated"``).

It has the call signature of a diffusers SDXL pipeline, so a job goes through the
worker's real code (lifecycle, step callback, monitor, encoding, upload, events), but it
computes nothing: each image costs ``gpu_ms`` of ``time.sleep``, split over the steps.
Sleeping releases the GIL, as a CUDA kernel launch and synchronize do, so the other
threads of the worker (post-processing of the previous job) run meanwhile, exactly as
they would beside a real GPU. ``gpu_ms = 0`` is the zero-cost pipeline.

The picture it returns is made to cost what a real one costs to encode: a smooth
colour gradient with Gaussian noise (sigma 4) on top. A 1024² one is a ~1.8 MB PNG at
compress level 6 and takes ~0.3 s to encode here, like a real SDXL output (0.25-0.6 s,
1.5-2 MB). An all-black or flat image would compress to a few KiB in a fraction of
that time and flatter the worker; pure noise would not compress at all. Four pictures
per size are made once (the seed picks one), so making them is not part of ``gpu_ms``
and the same seed gives the same bytes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

VARIANTS = 4
NOISE_SIGMA = 4.0


def picture(width: int, height: int, variant: int) -> Any:
    """Gradient + noise, deterministic in (size, variant)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1000 + variant)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    phase = variant / VARIANTS
    base = np.stack([(x + phase) % 1.0, y, 1.0 - (x + y) / 2], axis=-1) * 255.0
    noisy = base + rng.normal(0.0, NOISE_SIGMA, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


@dataclass
class _Output:
    images: list[Any]


class SimulatedPipeline:
    """Sleeps ``gpu_ms`` per image, calls the step callback at every step, returns
    fixed pictures. Also serves as its own img2img pipeline (``image`` is ignored)."""

    def __init__(self, gpu_ms: float, width: int, height: int) -> None:
        self.gpu_ms = gpu_ms
        self.default_size = (width, height)
        self.scheduler: Any = None  # the generation sets one per job; unused here
        self.num_timesteps = 0
        self._pictures: dict[tuple[int, int, int], Any] = {}
        self._lock = threading.Lock()
        self.calls = 0

    def set_progress_bar_config(self, **_: Any) -> None:
        pass

    def prepare(self, width: int, height: int) -> None:
        """Make the pictures of one size ahead of time (the warm-up does the default)."""
        for v in range(VARIANTS):
            self._picture(width, height, v)

    def _picture(self, width: int, height: int, variant: int) -> Any:
        key = (width, height, variant)
        with self._lock:
            if key not in self._pictures:
                self._pictures[key] = picture(width, height, variant)
            return self._pictures[key]

    def __call__(
        self,
        prompt: str = "",
        num_inference_steps: int = 1,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        callback_on_step_end: Any = None,
        width: int | None = None,
        height: int | None = None,
        image: Any = None,
        strength: float = 1.0,
        **_: Any,
    ) -> _Output:
        self.calls += 1
        if image is not None:
            width, height = image.size
        w, h = width or self.default_size[0], height or self.default_size[1]
        steps = max(1, num_inference_steps)
        if image is not None:
            steps = max(1, int(steps * strength))
        self.num_timesteps = steps
        n = max(1, num_images_per_prompt)
        per_step = self.gpu_ms * n / 1000.0 / steps
        start = time.perf_counter()
        for i in range(steps):
            # Sleep to a deadline from the start: no drift from oversleeping.
            delay = start + per_step * (i + 1) - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, i, {})
        gens = generator if isinstance(generator, list) else [generator] * n
        seeds = [g.initial_seed() if g is not None else 0 for g in gens]
        return _Output([self._picture(w, h, s % VARIANTS) for s in seeds[:n]])
