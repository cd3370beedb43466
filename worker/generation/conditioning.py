"""Conditioning on images: ControlNets (``control``: SDXL, SD 1.5, FLUX) and IP-Adapter
references (``references``: SDXL, SD 1.5, FLUX).

- A job with control images runs diffusers' ControlNet pipeline of its task (text-to-
  image, img2img, inpainting), made with ``from_pipe`` from the loaded model: every
  module of the base model is shared, only the ControlNet is added. Two entries make a
  ``MultiControlNetModel``. ControlNet models load once per worker and stay, least
  recently used out first, within ``ATELIER_CONTROLNET_CACHE_MB``.
- A model's IP-Adapter is loaded once per worker, on its first job with references
  (``load_ip_adapter``), then detached: the UNet's own attention processors are put
  back and the image projection taken off, so a job without references runs the very
  modules it ran before. A job with references attaches it, sets its scales
  (``set_ip_adapter_scale``: one float for ``full``, InstantStyle's per-layer dicts for
  ``style`` and ``subject``) and detaches it again, whatever happens.
- Several references are one adapter's several images, each with its own scale and
  mode: diffusers' masked multi-image path with full masks, where every image attends
  on its own and is added with its own per-layer scale (what one adapter per image
  would compute, without a copy of the adapter per image).
- Flux (XLabs' adapter, diffusers' ``FluxIPAdapterMixin``) works the same way on the
  transformer's double blocks, mode ``full`` only. Its attention processor loops over
  adapters, not images: N references are N adapters that share the one loaded set of
  weights (each processor's key and value projections listed N times, the image
  projection N times), each with its scale; no weight is copied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.core.adapters import ControlNetSpec
from producer.core.errors import InternalError
from producer.core.normalized import GenerateRequest
from producer.core.registry import Registry
from producer.core.settings import Settings
from worker.diffusion.cache import ByteBudgetCache

log = logging.getLogger(__name__)

#: Family → diffusers' ControlNet pipelines for text-to-image, img2img, inpainting.
CONTROLNET_PIPELINES: dict[str, tuple[str, str, str]] = {
    "sdxl": (
        "StableDiffusionXLControlNetPipeline",
        "StableDiffusionXLControlNetImg2ImgPipeline",
        "StableDiffusionXLControlNetInpaintPipeline",
    ),
    "sd15": (
        "StableDiffusionControlNetPipeline",
        "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline",
    ),
    "flux": (
        "FluxControlNetPipeline",
        "FluxControlNetImg2ImgPipeline",
        "FluxControlNetInpaintPipeline",
    ),
}
#: Family → its ControlNet model class, and the class that combines several.
CONTROLNET_MODELS: dict[str, tuple[str, str]] = {
    "sdxl": ("ControlNetModel", "MultiControlNetModel"),
    "sd15": ("ControlNetModel", "MultiControlNetModel"),
    "flux": ("FluxControlNetModel", "FluxMultiControlNetModel"),
}
#: Canny hysteresis thresholds (those of diffusers' and ControlNet's canny examples).
CANNY_LOW, CANNY_HIGH = 100, 200


def canny(image: Any) -> Any:
    """The edge map of an RGB PIL image: OpenCV's Canny, white edges on black, RGB."""
    import cv2
    import numpy as np
    from PIL import Image

    edges = cv2.Canny(np.asarray(image.convert("L")), CANNY_LOW, CANNY_HIGH)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _nbytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class ControlNets:
    """ControlNet models loaded once per worker and kept within a memory budget."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.cache: ByteBudgetCache[Any] = ByteBudgetCache(
            settings.controlnet_cache_mb * 1024 * 1024, "ControlNet"
        )
        self.loads = 0

    def cached_names(self) -> list[str]:
        return self.cache.names()

    def get(self, name: str, device: str, dtype: Any, field: str) -> Any:
        key = f"{name}|{device}|{dtype}"
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        spec = self.registry.controlnet(name)
        if spec is None:  # the producer checked; a registry changed in between
            raise InternalError(f"{field}: unknown ControlNet {name!r} on this worker")
        try:
            model = self._load(spec, device, dtype)
        except (OSError, ValueError) as exc:
            raise InternalError(
                f"{field}: ControlNet {name!r} did not load from {spec.source!r}: {exc}"
            ) from None
        self.loads += 1
        self.cache.put(key, model, _nbytes(model))  # one that does not fit is not kept
        return model

    def _load(self, spec: ControlNetSpec, device: str, dtype: Any) -> Any:
        import diffusers

        from worker.diffusion.pipelines import dtype_kwarg

        model_cls = getattr(diffusers, CONTROLNET_MODELS[spec.family][0])
        kwargs: dict[str, Any] = {**dtype_kwarg(dtype), "use_safetensors": True}
        local = _builtin(spec.source, self.settings)
        if local is None:
            if spec.revision:
                kwargs["revision"] = spec.revision
            if spec.variant:
                kwargs["variant"] = spec.variant
        model = model_cls.from_pretrained(str(local or spec.source), **kwargs)
        log.info("loaded ControlNet %s from %s", spec.name, local or spec.source)
        return model.to(device)


def _builtin(source: str, settings: Settings) -> Path | None:
    if source.startswith("builtin:"):
        from worker.builtin.tiny import ensure_builtin

        return ensure_builtin(source.removeprefix("builtin:"), settings.models_dir)
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def control_pipe(model: Any, nets: list[Any], task: int) -> Any:
    """The family's ControlNet pipeline for ``task`` (0 text-to-image, 1 img2img,
    2 inpainting), sharing every module of ``model.pipe``."""
    import diffusers
    import diffusers.models.controlnets as controlnets

    from worker.diffusion.pipelines import dtype_kwarg

    family = model.spec.pipeline
    cls = getattr(diffusers, CONTROLNET_PIPELINES[family][task])
    multi = getattr(controlnets, CONTROLNET_MODELS[family][1])
    controlnet = nets[0] if len(nets) == 1 else multi(nets)
    pipe = cls.from_pipe(model.pipe, controlnet=controlnet, **dtype_kwarg(model.dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_kwargs(
    entries: Sequence[Mapping[str, Any]], images: list[Any], task: int, family: str = "sdxl"
) -> dict[str, Any]:
    """The ControlNet pipeline's arguments: the control images, scales and the part of
    the denoising each one steers (lists for a multi-ControlNet, floats for one). SD's
    text-to-image ControlNet pipelines take the control image as ``image``; their
    img2img and inpainting ones, and all of Flux's, as ``control_image``."""
    one = len(entries) == 1

    def pick(key: str) -> Any:
        values = [float(e[key]) for e in entries]
        return values[0] if one else values

    return {
        "image" if task == 0 and family != "flux" else "control_image": images[0]
        if one
        else images,
        "controlnet_conditioning_scale": pick("scale"),
        "control_guidance_start": pick("start"),
        "control_guidance_end": pick("end"),
    }


def mode_scale(unet_config: Any, mode: str, scale: float) -> float | dict[str, Any]:
    """``set_ip_adapter_scale``'s config for one reference. ``full``: every layer.
    ``style``: InstantStyle's style layer, the second attention of the first up block
    with cross-attention (SDXL's ``up.block_0 [0, s, 0]``). ``subject``: its layout
    layer, the second attention of the last down block with cross-attention (SDXL's
    ``down.block_2 [0, s]``). The same rule places both on SD 1.5 and the tiny UNets."""
    if mode == "full":
        return scale
    lpb = unet_config.layers_per_block
    if mode == "style":
        types, direction = list(unet_config.up_block_types), "up"
        index = next(i for i, t in enumerate(types) if "CrossAttn" in t)
        layers = (lpb if isinstance(lpb, int) else list(reversed(lpb))[index]) + 1
    else:
        types, direction = list(unet_config.down_block_types), "down"
        index = max(i for i, t in enumerate(types) if "CrossAttn" in t)
        layers = lpb if isinstance(lpb, int) else lpb[index]
    values = [scale if k == 1 else 0.0 for k in range(layers)]
    return {direction: {f"block_{index}": values}}


@dataclass
class _Adapter:
    """A model's IP-Adapter modules, loaded once, and the denoiser's own processors."""

    base_processors: dict[str, Any]
    ip_processors: dict[str, Any]
    projection: Any
    image_encoder: Any
    feature_extractor: Any
    #: The pipeline's own (None, or a checkpoint's feature extractor), put back after.
    base_modules: dict[str, Any]


def _denoiser(pipe: Any) -> Any:
    """The module the adapter goes in: a Flux pipeline's transformer, else the UNet."""
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


class IpAdapters:
    """Each model's IP-Adapter: loaded on first use, attached for a job, detached after."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loaded: dict[str, _Adapter] = {}
        self.loads = 0

    def _load(self, model: Any) -> _Adapter:
        spec = model.spec.ip_adapter
        if spec is None:  # the producer checked
            raise InternalError(f"references: {model.spec.name} has no ip_adapter")
        pipe = model.pipe
        net = _denoiser(pipe)
        base = dict(net.attn_processors)
        own = {"image_encoder": pipe.image_encoder, "feature_extractor": pipe.feature_extractor}
        local = _builtin(spec.source, self.settings)
        kwargs = self._load_kwargs(spec, local, model)
        try:
            pipe.load_ip_adapter(
                str(local or spec.source),
                subfolder=spec.subfolder,
                weight_name=spec.weight_name,
                **kwargs,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            # Nothing half-loaded stays: the denoiser's own processors, no projection.
            _detach(pipe, _Adapter(base, {}, None, None, None, own))
            raise InternalError(
                f"references: the IP-Adapter of {model.spec.name} did not "
                f"load from {spec.source!r}: {exc}"
            ) from None
        adapter = _Adapter(
            base,
            dict(net.attn_processors),
            net.encoder_hid_proj,
            pipe.image_encoder,
            pipe.feature_extractor,
            own,
        )
        self.loads += 1
        log.info("loaded IP-Adapter of %s from %s", model.spec.name, local or spec.source)
        _detach(pipe, adapter)
        return adapter

    def _load_kwargs(self, spec: Any, local: Path | None, model: Any) -> dict[str, Any]:
        """``load_ip_adapter``'s image encoder (and revision) arguments. SD's loader reads
        the encoder from the adapter's repo; Flux's takes a repo or folder of its own
        (``image_encoder_source``, else ``image_encoder`` in the adapter's, placed as SD's
        loader places it) and its dtype, which is fp16 unless told."""
        kwargs: dict[str, Any] = {}
        if local is None and spec.revision:
            kwargs["revision"] = spec.revision
        if model.spec.pipeline != "flux":
            return {**kwargs, "image_encoder_folder": spec.image_encoder}
        if spec.image_encoder_source is not None:
            encoder = _builtin(spec.image_encoder_source, self.settings)
            where, sub = str(encoder or spec.image_encoder_source), ""
        else:
            where = str(local or spec.source)
            sub = (
                spec.image_encoder
                if "/" in spec.image_encoder
                else Path(spec.subfolder, spec.image_encoder).as_posix()
            )
        return {
            **kwargs,
            "image_encoder_pretrained_model_name_or_path": where,
            "image_encoder_subfolder": sub,
            "image_encoder_dtype": model.dtype,
        }

    def attach(
        self, model: Any, pipe: Any, refs: Sequence[Mapping[str, Any]], images: list[Any]
    ) -> dict[str, Any]:
        """Put the adapter in ``pipe`` (its denoiser is the model's), set the references'
        scales, and return the pipeline arguments that pass the images."""
        _check_takes(model, pipe, refs)
        adapter = self._loaded.get(model.spec.name)
        if adapter is None:
            adapter = self._loaded[model.spec.name] = self._load(model)
        net = _denoiser(pipe)
        net.set_attn_processor(dict(adapter.ip_processors))
        net.encoder_hid_proj = adapter.projection
        net.config.encoder_hid_dim_type = "ip_image_proj"
        pipe.register_modules(
            image_encoder=adapter.image_encoder, feature_extractor=adapter.feature_extractor
        )
        if model.spec.pipeline == "flux":
            return _flux_adapters(net, adapter, refs, images)
        configs = [mode_scale(net.config, r["mode"], float(r["scale"])) for r in refs]
        if len(refs) == 1:
            pipe.set_ip_adapter_scale(configs[0])
            return {"ip_adapter_image": images[0]}
        return _per_image(pipe, configs, images)

    def detach(self, model: Any, pipe: Any) -> None:
        adapter = self._loaded.get(model.spec.name)
        if adapter is not None and hasattr(pipe, "set_ip_adapter_scale"):  # (else refused)
            _detach(pipe, adapter)


def _per_image(pipe: Any, configs: list[Any], images: list[Any]) -> dict[str, Any]:
    """Several images of one adapter, each with its own per-layer scales: each config
    resolved to layers by ``set_ip_adapter_scale``, then every processor given the
    per-image list that diffusers' masked path reads (full masks: each image everywhere)."""
    import torch

    processors = {n: p for n, p in pipe.unet.attn_processors.items() if hasattr(p, "to_k_ip")}
    per_layer: dict[str, list[float]] = {n: [] for n in processors}
    for config in configs:
        pipe.set_ip_adapter_scale(config)
        for name, proc in processors.items():
            per_layer[name].append(float(proc.scale[0]))
    for name, proc in processors.items():
        proc.scale = [per_layer[name]]
    width, height = images[0].size
    masks = [torch.ones(1, len(images), height, width)]
    return {
        "ip_adapter_image": [list(images)],
        "cross_attention_kwargs": {"ip_adapter_masks": masks},
    }


def _check_takes(model: Any, pipe: Any, refs: Sequence[Mapping[str, Any]]) -> None:
    """What the producer refuses at submit, refused here too rather than run otherwise."""
    if not hasattr(pipe, "set_ip_adapter_scale"):
        raise InternalError(f"references: {type(pipe).__name__} takes no reference images")
    for i, r in enumerate(refs):
        if model.spec.pipeline == "flux" and r["mode"] != "full":
            raise InternalError(f"references.{i}.mode: Flux takes mode full only")


def _flux_adapters(
    transformer: Any, adapter: _Adapter, refs: Sequence[Mapping[str, Any]], images: list[Any]
) -> dict[str, Any]:
    """One Flux adapter per reference, all made of the loaded one's modules: every IP
    processor (the double blocks') gets its key and value projections once per
    reference and the references' scales, the transformer the image projection once per
    reference; the pipeline encodes one image per adapter."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    n = len(refs)
    _share(adapter, n, [float(r["scale"]) for r in refs])
    if n > 1:
        layer = adapter.projection.image_projection_layers[0]
        transformer.encoder_hid_proj = MultiIPAdapterImageProjection([layer] * n)
    return {"ip_adapter_image": list(images)}


def _share(adapter: _Adapter, n: int, scales: list[float]) -> None:
    """The loaded Flux processors' projections listed ``n`` times (the same modules)."""
    from torch import nn

    for proc in adapter.ip_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.to_k_ip = nn.ModuleList([proc.to_k_ip[0]] * n)
            proc.to_v_ip = nn.ModuleList([proc.to_v_ip[0]] * n)
            proc.scale = list(scales)


def _detach(pipe: Any, adapter: _Adapter) -> None:
    net = _denoiser(pipe)
    net.set_attn_processor(dict(adapter.base_processors))
    net.encoder_hid_proj = None
    net.config.encoder_hid_dim_type = None
    if hasattr(pipe, "transformer"):
        _share(adapter, 1, [1.0])  # back to the one adapter that was loaded
    pipe.register_modules(**adapter.base_modules)


class Conditioning:
    """What a worker keeps for conditioned jobs: its ControlNets and IP-Adapters, and the
    ControlNet pipelines made of them (``from_pipe`` costs tens of milliseconds with the
    GPU held: made once per model, task and ControlNets, and dropped with a ControlNet
    the cache lets go, so none keeps one alive past the budget)."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.controlnets = ControlNets(settings, registry)
        self.ip_adapters = IpAdapters(settings)
        self._pipes: dict[tuple[str, int, tuple[str, ...]], tuple[Any, list[Any]]] = {}

    def pipeline(
        self, model: Any, req: GenerateRequest, inputs: Any, task: int
    ) -> tuple[Any, dict[str, Any]]:
        """The ControlNet pipeline for the job and its arguments."""
        entries = req["control"]
        nets = [
            self.controlnets.get(e["name"], model.device, model.dtype, f"control.{i}.name")
            for i, e in enumerate(entries)
        ]
        cached = set(self.controlnets.cached_names())
        for k in [k for k in self._pipes if not cached.issuperset(k[2])]:
            del self._pipes[k]  # a ControlNet the cache dropped (or never kept)
        key = (
            model.spec.name,
            task,
            tuple(f"{e['name']}|{model.device}|{model.dtype}" for e in entries),
        )
        hit = self._pipes.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[1], nets, strict=True)):
            pipe = hit[0]
        else:
            pipe = control_pipe(model, nets, task)
            if cached.issuperset(key[2]):
                self._pipes[key] = (pipe, nets)
        return pipe, control_kwargs(entries, inputs.control, task, model.spec.pipeline)
