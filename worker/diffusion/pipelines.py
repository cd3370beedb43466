"""Loading diffusers pipelines from the registry, once per process.

Everything that touches torch or CUDA runs here, inside the worker process, after
the process has started: never at import time and never in a parent that forks
(the worker uses Celery's threads pool, so nothing forks after this).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.core.families import OPTION_PIPELINES
from producer.core.pipeline_options import PipelineOptions
from producer.core.registry import ModelSpec
from producer.core.settings import Settings

log = logging.getLogger(__name__)

#: Where initial noise is drawn. On the CPU it is the same for every device, so a
#: seed means one image wherever it runs.
GENERATOR_DEVICE = "cpu"

#: Registry scheduler names → (diffusers class, config overrides).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "edm_dpmpp_2m": ("EDMDPMSolverMultistepScheduler", {}),
    "edm_euler": ("EDMEulerScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"ATELIER_DEVICE={setting} but torch sees no CUDA device")
    return setting


def resolve_dtype(setting: str, spec: ModelSpec, device: str) -> Any:
    import torch

    name = setting
    if name == "auto":
        # Half precision on the CPU is slow or unsupported for many ops: fp32 there.
        name = spec.dtype if device.startswith("cuda") else "fp32"
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("atelier", "torch", "diffusers", "transformers", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def weight_hashes(root: Path) -> dict[str, str]:
    """sha256 of every safetensors file under ``root``, by relative path.

    In a Hugging Face cache the files are symlinks to blobs named by their sha256:
    use the name instead of reading gigabytes.
    """
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*.safetensors")):
        rel = path.relative_to(root).as_posix()
        target = path.resolve()
        if path.is_symlink() and len(target.name) == 64 and target.parent.name == "blobs":
            out[rel] = target.name
            continue
        h = hashlib.sha256()
        with open(target, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[rel] = h.hexdigest()
    return out


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns, and goes in
    1.0); older releases know only ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


#: Registry pipeline family → diffusers classes: text-to-image, img2img, inpainting.
#: img2img and inpainting are built with ``from_pipe``: they share every module.
FAMILIES: dict[str, tuple[str, str, str]] = {
    "sdxl": (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
    "sd15": (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    ),
    "flux": ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
}


@dataclass
class LoadedModel:
    spec: ModelSpec
    device: str
    dtype: Any
    pipe: Any  # StableDiffusionXLPipeline
    img2img: Any  # StableDiffusionXLImg2ImgPipeline sharing pipe's modules
    base_scheduler_config: Any
    source: dict[str, Any] = field(default_factory=dict)
    inpaint: Any = None  # the inpainting pipeline, sharing pipe's modules too
    _prototypes: dict[str, Any] = field(default_factory=dict, repr=False)

    def scheduler(self, name: str) -> Any:
        """A fresh scheduler per job: schedulers keep per-run state.

        Built once per name from the config, then copied: ``from_config`` inspects
        signatures and costs milliseconds, a copy a fraction of one, and this runs
        while the job holds the GPU.
        """
        import copy

        proto = self._prototypes.get(name)
        if proto is None:
            import diffusers

            cls_name, overrides = SCHEDULERS[name]
            cls = getattr(diffusers, cls_name)
            proto = self._prototypes[name] = cls.from_config(
                self.base_scheduler_config, **overrides
            )
        return copy.deepcopy(proto)


def _local_path(spec: ModelSpec, settings: Settings) -> Path | None:
    if spec.source.startswith("builtin:"):
        from worker.builtin.tiny import ensure_builtin

        try:
            return ensure_builtin(spec.source.removeprefix("builtin:"), settings.models_dir)
        except ValueError:
            raise ValueError(f"model {spec.name}: unknown builtin source {spec.source!r}") from None
    path = Path(spec.source).expanduser()
    return path if path.is_dir() else None


def load_model(spec: ModelSpec, settings: Settings, device: str) -> LoadedModel:
    if spec.pipeline == "simulated":
        return _load_simulated(spec, device)
    import diffusers
    import torch

    pipe_cls, img2img_cls, inpaint_cls = (getattr(diffusers, c) for c in FAMILIES[spec.pipeline])
    opts = spec.options
    # Options are validated for OPTION_PIPELINES only; other families load stock.
    tuned = spec.pipeline in OPTION_PIPELINES
    if opts.cpu_offload and not device.startswith("cuda"):
        raise ValueError(
            f"model {spec.name}: options.cpu_offload needs a CUDA device; "
            f"this worker runs on {device}"
        )
    dtype = resolve_dtype(settings.dtype, spec, device)
    local = _local_path(spec, settings)
    t0 = time.perf_counter()
    pipe = pipe_cls.from_pretrained(
        str(local or spec.source), **_pretrained_kwargs(spec, local, dtype)
    )
    if tuned:
        apply_options(pipe, opts)
    place(pipe, opts, device)
    pipe.set_progress_bar_config(disable=True)
    # img2img shares every module with the text-to-image pipeline: no second copy.
    # from_pipe casts the shared modules to fp32 unless told the dtype: pass it, or an
    # fp16 model would silently double its memory and slow down.
    img2img = img2img_cls.from_pipe(pipe, **dtype_kwarg(dtype))
    img2img.set_progress_bar_config(disable=True)
    inpaint = inpaint_cls.from_pipe(pipe, **dtype_kwarg(dtype))
    inpaint.set_progress_bar_config(disable=True)
    if opts.cpu_offload:
        # Their own hooks on the same modules, so their calls end by offloading as well.
        place(img2img, opts, device)
        place(inpaint, opts, device)
    if tuned:
        compile_unet(pipe, opts)  # in place: img2img and inpaint share the compiled module
    source = _model_source(spec, local, dtype, device)
    log.info(
        "loaded %s from %s in %.1f s (options %s)",
        spec.name,
        local or spec.source,
        time.perf_counter() - t0,
        opts.active() or "stock",
    )
    del torch
    return LoadedModel(
        spec, device, dtype, pipe, img2img, pipe.scheduler.config, source, inpaint=inpaint
    )


def _pretrained_kwargs(spec: ModelSpec, local: Path | None, dtype: Any) -> dict[str, Any]:
    """``from_pretrained``'s arguments: dtype, safetensors only, exact hub files."""
    from diffusers import AutoencoderKL

    kwargs: dict[str, Any] = {**dtype_kwarg(dtype), "use_safetensors": True}
    if local is None:
        # A hub model: the revision and variant select exact files.
        if spec.revision:
            kwargs["revision"] = spec.revision
        if spec.variant:
            kwargs["variant"] = spec.variant
    if spec.pipeline == "sd15":
        # The checkpoint's own NSFW checker is not loaded: atelier's optional one
        # (ATELIER_SAFETY_CHECKER) works for every family.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if spec.vae_source:
        kwargs["vae"] = AutoencoderKL.from_pretrained(
            spec.vae_source, use_safetensors=True, **dtype_kwarg(dtype)
        )
    return kwargs


def _model_source(spec: ModelSpec, local: Path | None, dtype: Any, device: str) -> dict[str, Any]:
    """What the manifest records of the loaded model, with its weight files' hashes."""
    root = local
    if root is None:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(spec.source, revision=spec.revision, local_files_only=True))
    return {
        "name": spec.name,
        "source": spec.source,
        "revision": spec.revision,
        "variant": spec.variant,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "options": spec.options.active(),
        "weights": weight_hashes(root),
    }


def apply_options(pipe: Any, opts: PipelineOptions) -> None:
    """The options that change modules in place, whatever the device."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if opts.vae_upcast is not None:
        pipe.vae.register_to_config(force_upcast=opts.vae_upcast)
    processor = AttnProcessor2_0 if opts.attention == "sdpa" else AttnProcessor
    pipe.unet.set_attn_processor(processor())
    pipe.vae.set_attn_processor(processor())
    if opts.fuse_qkv:
        pipe.fuse_qkv_projections()  # UNet and VAE; FusedAttnProcessor2_0
    if opts.attention_slicing != "off":
        pipe.enable_attention_slicing(opts.attention_slicing)
    if opts.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if opts.vae_tiling:
        pipe.vae.enable_tiling()
    if opts.vae_slicing:
        pipe.vae.enable_slicing()


def place(pipe: Any, opts: PipelineOptions, device: str) -> None:
    """Move the pipeline to ``device``, or install model CPU offload hooks for it."""
    if opts.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)


def compile_unet(pipe: Any, opts: PipelineOptions) -> None:
    """torch.compile the UNet in place (``Module.compile``): every pipeline sharing it
    runs the compiled graph. Compilation itself happens at the warm-up's first call."""
    if opts.compile == "off":
        return
    kwargs: dict[str, Any] = {"backend": opts.compile_backend, "fullgraph": opts.compile_fullgraph}
    if opts.compile_backend == "inductor" and opts.compile != "default":
        kwargs["mode"] = opts.compile
    pipe.unet.compile(**kwargs)


def _load_simulated(spec: ModelSpec, device: str) -> LoadedModel:
    import diffusers

    from worker.builtin.simulated import SimulatedPipeline

    pipe = SimulatedPipeline(spec.gpu_ms, spec.width, spec.height)
    source = {
        "name": spec.name,
        "source": spec.source,
        "simulated": True,
        "gpu_ms": spec.gpu_ms,
        "device": device,
    }
    log.info("loaded %s: simulated GPU, %.0f ms per image", spec.name, spec.gpu_ms)
    config: Any = diffusers.EulerDiscreteScheduler().config  # type: ignore[attr-defined]
    return LoadedModel(spec, device, None, pipe, pipe, config, source)


def warm_up(model: LoadedModel) -> float:
    """One small generation, so the first job pays no lazy initialization."""
    import torch

    t0 = time.perf_counter()
    if model.spec.pipeline == "simulated":
        model.pipe.prepare(model.spec.width, model.spec.height)
    with torch.inference_mode():
        model.pipe(
            prompt="warm-up",
            num_inference_steps=2,
            width=model.spec.width,
            height=model.spec.height,
            guidance_scale=model.spec.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(0),
        )
    took = time.perf_counter() - t0
    log.info("warmed %s in %.2f s", model.spec.name, took)
    return took
