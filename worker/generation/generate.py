"""Step 2 of a generation: the pipeline call, holding the GPU.

The step callback only reads flags and the clock (``run.report``, ``run.check``): the
monitor thread does the I/O, so nothing waits on Redis inside the denoising loop. With
``preview: true`` the scheduler's ``step`` also keeps a reference to its x0 for the
monitor thread to render (``worker/diffusion/preview.py``); nothing else changes in the loop.
"""

from __future__ import annotations

import inspect
from typing import Any, cast

from producer.core.contract import sweep_cells
from producer.core.errors import OutOfMemory
from producer.core.normalized import GenerateRequest
from worker.diffusion.loras import LoraCache, apply_loras, unload_loras
from worker.diffusion.pipelines import GENERATOR_DEVICE, LoadedModel
from worker.diffusion.preview import Previewer, map_family, watch_scheduler
from worker.diffusion.prompts import conditioning
from worker.generation.conditioning import Conditioning
from worker.run import Run


def generate(
    run: Run,
    model: LoadedModel,
    inputs: Any,
    loras: LoraCache | None,
    preview_max_side: int = 256,
    refs: Conditioning | None = None,
) -> list[Any]:
    """The job's images (a sweep's cells one after the other), as PIL images."""
    import torch

    req = cast(GenerateRequest, run.request)
    task = 0 if inputs.image is None else 1 if inputs.mask is None else 2
    pipe = (model.pipe, model.img2img, model.inpaint)[task]
    control: dict[str, Any] = {}
    if inputs.control and refs is not None:  # the family's ControlNet pipeline
        pipe, control = refs.pipeline(model, req, inputs, task)
    previewer = previews(run, model, req, preview_max_side)
    pipe.scheduler = watched(model.scheduler(req["scheduler"]), previewer)
    cells = sweep_cells(req)
    done = [0]  # steps of the sweep's cells already run

    def on_step_end(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        # A sweep's total is fixed at the start; a job's is what the scheduler runs.
        run.report(done[0] + i + 1, None if cells else getattr(p, "num_timesteps", None))
        run.check()
        return kwargs

    kwargs = {**pipeline_kwargs(req, pipe, inputs, on_step_end), **control}
    # Loaded into the shared modules for this job only; unloaded below, whatever
    # happens, before the GPU lock is released.
    adapters = apply_loras(model.pipe, loras, req["loras"]) if loras is not None else []
    referenced = bool(inputs.references) and refs is not None
    try:
        if referenced:
            assert refs is not None
            kwargs.update(
                refs.ip_adapters.attach(model, pipe, req["references"], inputs.references)
            )
        with run.watched(), torch.inference_mode():
            # Long or weighted prompts become embeddings; plain ones stay text.
            cond = conditioning(
                model.spec.pipeline, model.pipe, req["prompt"], req["negative_prompt"]
            )
            if cond is not None:
                del kwargs["prompt"], kwargs["negative_prompt"]
                kwargs.update(cond)
            return _run_cells(pipe, model, req, kwargs, cells, done, previewer)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise OutOfMemory(f"out of GPU memory: {exc}") from None
    except MemoryError:
        raise OutOfMemory("out of host memory") from None
    finally:
        if referenced:
            assert refs is not None
            refs.ip_adapters.detach(model, pipe)
        if adapters:
            unload_loras(model.pipe, adapters)


def _run_cells(
    pipe: Any,
    model: LoadedModel,
    req: GenerateRequest,
    kwargs: dict[str, Any],
    cells: list[dict[str, Any]],
    done: list[int],
    previewer: Previewer | None,
) -> list[Any]:
    """One pipeline call, or one per sweep cell."""
    import torch

    if not cells:
        return list(pipe(**kwargs).images)
    images: list[Any] = []
    for cell in cells:
        # Each cell exactly as a job of its own parameters would run.
        pipe.scheduler = watched(model.scheduler(req["scheduler"]), previewer)
        gen = torch.Generator(GENERATOR_DEVICE).manual_seed(cell["seed"])
        images += pipe(
            **dict(
                kwargs,
                num_inference_steps=cell["steps"],
                generator=[gen],
                guidance_scale=cell["guidance_scale"],
                num_images_per_prompt=1,
            )
        ).images
        done[0] += pipe.num_timesteps
    return images


def previews(run: Run, model: LoadedModel, req: GenerateRequest, max_side: int) -> Previewer | None:
    """The job's previewer, given to the run for its monitor thread; None without
    ``preview: true`` or for a family without a latent-to-RGB map (simulated)."""
    if not req.get("preview"):
        return None
    family = map_family(model.spec.pipeline, model.pipe)
    if family is None:
        return None
    run.preview = Previewer(family, req["width"], req["height"], max_side)
    return run.preview


def watched(scheduler: Any, previewer: Previewer | None) -> Any:
    return scheduler if previewer is None else watch_scheduler(scheduler, previewer.latest)


def pipeline_kwargs(
    req: GenerateRequest, pipe: Any, inputs: Any, on_step_end: Any
) -> dict[str, Any]:
    """The pipeline's arguments for the job (before prompt conditioning)."""
    import torch

    n = req["num_images"]
    kwargs: dict[str, Any] = {
        "prompt": req["prompt"],
        "negative_prompt": req["negative_prompt"] or None,
        "num_inference_steps": req["steps"],
        "guidance_scale": req["guidance_scale"],
        "num_images_per_prompt": n,
        "generator": [
            torch.Generator(GENERATOR_DEVICE).manual_seed(req["seed"] + i) for i in range(n)
        ],
        "callback_on_step_end": on_step_end,
        "output_type": "pil",
    }
    if kwargs["negative_prompt"] is None and "negative_prompt" not in parameters(pipe):
        del kwargs["negative_prompt"]  # (Flux's ControlNet img2img and inpainting pipelines)
    if inputs.image is None:
        kwargs.update(width=req["width"], height=req["height"])
        return kwargs
    kwargs.update(image=inputs.image, strength=req["strength"])
    if inputs.mask is not None:
        kwargs.update(mask_image=inputs.mask)
    if inputs.mask is not None or {"width", "height"} <= parameters(pipe):
        # (Flux's img2img would otherwise work at its default 1024², whatever the
        # image; SD img2img pipelines take the image's size and no such argument.)
        kwargs.update(width=req["width"], height=req["height"])
    return kwargs


def parameters(pipe: Any) -> frozenset[str]:
    """The names the pipeline's call takes."""
    cls = type(pipe)
    known = _PARAMETERS.get(cls)
    if known is None:
        # Once per pipeline class: inspect.signature costs a millisecond, with the GPU held.
        known = _PARAMETERS[cls] = frozenset(inspect.signature(cls.__call__).parameters)
    return known


_PARAMETERS: dict[type, frozenset[str]] = {}
