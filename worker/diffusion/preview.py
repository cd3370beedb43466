"""Live previews (``preview: true``): the predicted clean image of the step just run, as
a small WebP, made without the VAE.

Two halves, on two threads:

- on the denoising loop, :func:`watch_scheduler` wraps the job's scheduler's ``step``
  to keep a *reference* to what it already computed (no copy, no device sync): the
  predicted clean latents x0, or what x0 is made from;
- on the monitor thread (``worker/run.py``), :meth:`Previewer.render` turns the latest
  one into a ``data:image/webp;base64,…`` URI: the first image of the batch, copied to
  the CPU, through the family's latent-to-RGB linear map, resized and encoded. The
  monitor throttles it to one per ``PREVIEW_INTERVAL_S``, riding on a progress event.

Where x0 comes from, by scheduler (diffusers 0.3x-0.4x):

- Euler, Euler ancestral, EDM Euler, DDIM: ``step`` returns ``pred_original_sample``
  second (``return_dict=False``, as every pipeline calls it);
- DPM++ (``dpmsolver++``), EDM DPM++, UniPC (``predict_x0``): the solver keeps this
  step's x0 as ``model_outputs[-1]``;
- flow matching (Flux): ``x0 = sample − σ · v``, computed on the monitor thread from
  the step's input, the model's velocity and σ;
- anything else: the noisy latents the step returned (still a recognisable picture
  near the end).

The maps are the ``latent_rgb_factors`` (and ``latent_rgb_factors_bias``) ComfyUI
publishes for its latent previews, in ``comfy/latent_formats.py`` (comfyanonymous/
ComfyUI, commit 040a3243468ecefd1f2802592d90458f1ce4d65f): a 3×C matrix from the
model-space latents (what the denoiser sees: already scaled, and for Flux shifted) to
RGB in −1…1. diffusers' pipeline latents are in that same space. Playground v2.5
normalizes its latents by per-channel ``latents_mean``/``latents_std`` (EDM) before
scaling by 0.5; ComfyUI fits a table of its own in that normalized space, used here
when the VAE config carries ``latents_mean``.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
from typing import Any

log = logging.getLogger(__name__)

#: family → (rows: one [R, G, B] per latent channel, bias [R, G, B] or None).
#: From ComfyUI's comfy/latent_formats.py (see the module docstring).
FACTORS: dict[str, tuple[list[list[float]], list[float] | None]] = {
    "sd15": (
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        None,
    ),
    "sdxl": (
        [
            [0.3651, 0.4232, 0.4341],
            [-0.2533, -0.0042, 0.1068],
            [0.1076, 0.1111, -0.0362],
            [-0.3165, -0.2492, -0.2188],
        ],
        [0.1084, -0.0175, -0.0011],
    ),
    "playground-v2.5": (
        [
            [0.3920, 0.4054, 0.4549],
            [-0.2634, -0.0196, 0.0653],
            [0.0568, 0.1687, -0.0755],
            [-0.3112, -0.2359, -0.2076],
        ],
        None,
    ),
    "flux": (
        [
            [-0.0346, 0.0244, 0.0681],
            [0.0034, 0.0210, 0.0687],
            [0.0275, -0.0668, -0.0433],
            [-0.0174, 0.0160, 0.0617],
            [0.0859, 0.0721, 0.0329],
            [0.0004, 0.0383, 0.0115],
            [0.0405, 0.0861, 0.0915],
            [-0.0236, -0.0185, -0.0259],
            [-0.0245, 0.0250, 0.1180],
            [0.1008, 0.0755, -0.0421],
            [-0.0515, 0.0201, 0.0011],
            [0.0428, -0.0012, -0.0036],
            [0.0817, 0.0765, 0.0749],
            [-0.1264, -0.0522, -0.1103],
            [-0.0280, -0.0881, -0.0499],
            [-0.1262, -0.0982, -0.0778],
        ],
        [-0.0329, -0.0718, -0.0851],
    ),
}

#: Schedulers whose ``step(..., return_dict=False)`` returns ``(prev, x0)``.
_RETURNS_X0 = frozenset(
    {
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "EDMEulerScheduler",
        "DDIMScheduler",
    }
)
#: Multistep solvers that keep each step's x0 as ``model_outputs[-1]`` (when they
#: predict x0: DPM++'s ``algorithm_type``, UniPC's ``predict_x0``).
_KEEPS_X0 = frozenset(
    {"DPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler", "UniPCMultistepScheduler"}
)
_FLOW = frozenset({"FlowMatchEulerDiscreteScheduler"})

WEBP_QUALITY = 70


def map_family(pipeline: str, pipe: Any) -> str | None:
    """Which table of :data:`FACTORS` a loaded pipeline's latents take (None: none)."""
    if pipeline == "sdxl":
        mean = getattr(getattr(getattr(pipe, "vae", None), "config", None), "latents_mean", None)
        return "playground-v2.5" if mean is not None else "sdxl"
    return pipeline if pipeline in FACTORS else None


class Latest:
    """The newest x0 the loop handed over: written by the loop (one attribute store),
    read by the monitor thread. ``seq`` counts hand-overs, so the monitor renders each
    one at most once."""

    def __init__(self) -> None:
        #: (seq, how, tensors…): ``x0`` (x0), ``flow`` (sample, velocity, σ), ``noisy``.
        self.value: tuple[Any, ...] | None = None
        self._seq = 0

    def put(self, how: str, *tensors: Any) -> None:
        self._seq += 1
        self.value = (self._seq, how, *tensors)


def watch_scheduler(scheduler: Any, latest: Latest) -> Any:
    """``scheduler`` (a fresh one per job), its ``step`` handing each step's x0 over to
    ``latest`` by reference. The wrapper keeps ``step``'s signature (pipelines inspect
    it for ``eta`` and ``generator``)."""
    name = type(scheduler).__name__
    step = scheduler.step
    keeps_x0 = name in _KEEPS_X0 and (
        getattr(scheduler.config, "algorithm_type", "dpmsolver++").endswith("dpmsolver++")
        and getattr(scheduler.config, "predict_x0", True)
    )

    @functools.wraps(step)
    def watched_step(
        model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any
    ) -> Any:
        out = step(model_output, timestep, sample, *args, **kwargs)
        if name in _RETURNS_X0 and isinstance(out, tuple) and len(out) > 1:
            latest.put("x0", out[1])
        elif keeps_x0 and scheduler.model_outputs and scheduler.model_outputs[-1] is not None:
            latest.put("x0", scheduler.model_outputs[-1])
        elif name in _FLOW and scheduler.step_index is not None:
            latest.put("flow", sample, model_output, scheduler.sigmas[scheduler.step_index - 1])
        else:
            latest.put("noisy", out[0] if isinstance(out, tuple) else out.prev_sample)
        return out

    scheduler.step = watched_step
    return scheduler


class Previewer:
    """One job's previews: its family's map, its image size, and the latest x0."""

    def __init__(self, family: str, width: int, height: int, max_side: int) -> None:
        import torch

        rows, bias = FACTORS[family]
        self.family = family
        self.weight = torch.tensor(rows, dtype=torch.float32).T.contiguous()  # 3 × C
        self.bias = None if bias is None else torch.tensor(bias, dtype=torch.float32)
        self.width, self.height = width, height
        scale = min(1.0, max_side / max(width, height))
        self.size = (max(1, round(width * scale)), max(1, round(height * scale)))
        self.latest = Latest()
        self._rendered = 0
        self._warned = False

    def render(self) -> str | None:
        """The newest x0 not yet rendered, as a WebP data URI; None when there is none
        (or it cannot be mapped: logged once)."""
        value = self.latest.value
        if value is None or value[0] == self._rendered:
            return None
        self._rendered = value[0]
        import torch

        with torch.inference_mode():
            latents = self._first_x0(value[1], value[2:])
            if latents is None:
                return None
            picture = self.to_image(latents)
        buf = io.BytesIO()
        picture.save(buf, format="WEBP", quality=WEBP_QUALITY, method=0)
        return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()

    def _first_x0(self, how: str, tensors: tuple[Any, ...]) -> Any:
        """The batch's first x0, on the CPU in fp32, as C × h × w (Flux's packed tokens
        unpacked)."""
        import torch

        def first(t: Any) -> Any:
            return t[:1].to("cpu", torch.float32)

        if how == "flow":
            sample, velocity, sigma = tensors
            x0 = first(sample) - float(sigma) * first(velocity)
        else:
            x0 = first(tensors[0])
        if x0.dim() == 3:  # Flux: (1, h/2 · w/2, 4C) tokens of 2 × 2 latent pixels
            x0 = unpack(x0, self.height, self.width)
        channels = x0.shape[1]
        if x0.dim() != 4 or channels != self.weight.shape[1]:
            if not self._warned:
                self._warned = True
                log.warning(
                    "no preview: %s latents of shape %s, the %s map takes %d channels",
                    how,
                    tuple(x0.shape),
                    self.family,
                    self.weight.shape[1],
                )
            return None
        return x0[0]

    def to_image(self, latents: Any) -> Any:
        """C × h × w model-space latents → an RGB PIL image of the preview's size."""
        import torch
        from PIL import Image

        rgb = torch.einsum("chw,rc->hwr", latents, self.weight)
        if self.bias is not None:
            rgb = rgb + self.bias
        pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels, "RGB")
        if image.size != self.size:
            image = image.resize(self.size, Image.Resampling.BILINEAR)
        return image


def unpack(tokens: Any, height: int, width: int) -> Any:
    """Flux's packed latents (B, h/2 · w/2, 4C) → (B, C, h, w), as diffusers'
    ``FluxPipeline._unpack_latents`` does (h, w: the image's size / 8, made even)."""
    batch, patches, packed = tokens.shape
    h, w = 2 * (height // 16), 2 * (width // 16)
    if patches != (h // 2) * (w // 2) or packed % 4:
        return tokens  # not the expected layout: refused by the channel check
    x = tokens.view(batch, h // 2, w // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, packed // 4, h, w)
