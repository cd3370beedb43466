"""How the worker sets a model's pipeline up (``[models.NAME.options]`` in the registry):
the typed options and the checks of their table.

Pure data, as the rest of the registry: the worker applies them
(``worker.diffusion.pipelines``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

#: torch.compile modes a worker may use. The CUDA-graph modes (``reduce-overhead``,
#: ``max-autotune``) are left out: CUDA graphs are recorded per thread, and the worker
#: warms up on its main thread and runs jobs on its pool's threads.
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")
ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class PipelineOptions:
    """How the worker sets a pipeline up for speed or for a small card
    (``[models.NAME.options]``). Every option defaults to stock diffusers behaviour."""

    #: Attention kernel: ``sdpa`` (torch's scaled_dot_product_attention, flash or
    #: memory-efficient kernels on CUDA) or ``eager`` (plain matmul + softmax).
    attention: str = "sdpa"
    #: UNet and VAE weights and activations in channels-last memory format.
    channels_last: bool = False
    #: Fuse the q, k, v projections of every attention block into one matmul.
    fuse_qkv: bool = False
    #: torch.compile the UNet with this mode; the warm-up compiles it before the
    #: worker takes a job.
    compile: str = "off"
    #: torch.compile backend: ``inductor`` on a GPU; ``eager`` / ``aot_eager`` trace
    #: the model without generating kernels (tests, debugging graph breaks).
    compile_backend: str = "inductor"
    #: Refuse graph breaks in the compiled UNet.
    compile_fullgraph: bool = False
    #: Decode with the VAE upcast to fp32 when the model runs in fp16 (the stock SDXL
    #: VAE overflows in fp16). None: the VAE config's ``force_upcast``. ``false`` with
    #: a fp16-fixed VAE (``vae_source``) decodes in fp16.
    vae_upcast: bool | None = None
    #: Keep each model on the CPU until it runs (accelerate hooks): less GPU memory,
    #: slower. CUDA only.
    cpu_offload: bool = False
    #: Decode the VAE in tiles (large images on small cards).
    vae_tiling: bool = False
    #: Decode the VAE one image at a time.
    vae_slicing: bool = False
    #: Attention in slices: ``off``, ``auto`` (half a head), ``max`` (one slice per
    #: step), or a slice size. Replaces SDPA: for small cards only.
    attention_slicing: str | int = "off"

    def active(self) -> dict[str, Any]:
        """The options that differ from stock diffusers (for logs and manifests)."""
        default = PipelineOptions()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }


_OPTION_KINDS: dict[str, type | tuple[type, ...]] = {
    "attention": str,
    "channels_last": bool,
    "fuse_qkv": bool,
    "compile": str,
    "compile_backend": str,
    "compile_fullgraph": bool,
    "vae_upcast": bool,
    "cpu_offload": bool,
    "vae_tiling": bool,
    "vae_slicing": bool,
    "attention_slicing": (str, int),
}


def parse_options(name: str, raw: Any, origin: str) -> PipelineOptions:
    """Model ``name``'s options table, typed and checked; ValueError names what is wrong."""
    where = f"{origin}: model {name!r}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: options must be a table")
    unknown = sorted(set(raw) - set(_OPTION_KINDS))
    if unknown:
        raise ValueError(f"{where}: unknown options {unknown}; known: {sorted(_OPTION_KINDS)}")
    problems = []
    for key, value in raw.items():
        kind = _OPTION_KINDS[key]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            problems.append(f"options.{key} must be a {names}, not {value!r}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    opts = PipelineOptions(**raw)
    if opts.attention not in ATTENTION:
        problems.append(f"options.attention must be one of {ATTENTION}")
    if opts.compile not in COMPILE_MODES:
        problems.append(f"options.compile must be one of {COMPILE_MODES}")
    if not opts.compile_backend:
        problems.append("options.compile_backend must not be empty")
    slicing = opts.attention_slicing
    if isinstance(slicing, str) and slicing not in ("off", "auto", "max"):
        problems.append("options.attention_slicing must be off, auto, max or a positive int")
    if isinstance(slicing, int) and slicing < 1:
        problems.append("options.attention_slicing must be off, auto, max or a positive int")
    if opts.fuse_qkv and opts.attention != "sdpa":
        problems.append('options.fuse_qkv needs attention = "sdpa" (its fused processor uses SDPA)')
    if opts.fuse_qkv and slicing != "off":
        problems.append(
            "options.fuse_qkv and options.attention_slicing exclude each other "
            "(slicing replaces the fused attention processors)"
        )
    if opts.cpu_offload and opts.compile != "off":
        problems.append(
            "options.cpu_offload and options.compile exclude each other "
            "(offload hooks move weights between devices under the compiled graph)"
        )
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return opts
