"""The model registry: which models exist and the limits and defaults of each.

Pure data, read from ``producer/models.toml`` plus the file ``ATELIER_MODELS_FILE``
names. The producer validates requests against it; the worker loads pipelines from it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

PIPELINES = ("sdxl", "sd15", "flux")
SCHEDULERS = (
    "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "edm_dpmpp_2m",
    "edm_euler", "flow_euler",
)
#: Flow-matching models take flow-matching schedulers only, and only they do.
FLOW_SCHEDULERS = ("flow_euler",)
FLOW_PIPELINES = ("flux",)
#: Families whose CLIP prompts take (word:1.3) weighting and more than 77 tokens here.
WEIGHTING_PIPELINES = ("sdxl", "sd15")
DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    pipeline: str = "sdxl"
    revision: str | None = None
    variant: str | None = None
    dtype: str = "fp16"
    scheduler: str = "euler"
    schedulers: tuple[str, ...] = ("euler",)
    steps: int = 30
    guidance_scale: float = 5.0
    width: int = 1024
    height: int = 1024
    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    vae_source: str | None = None
    #: Classifier-free guidance: false for guidance-distilled models (FLUX.1-schnell),
    #: which then refuse negative_prompt and any guidance_scale but 0.
    cfg: bool = True
    #: Width and height must be multiples of this (16 for Flux: 8× VAE, 2×2 patches).
    size_multiple: int = 8
    #: When the worker runs a safety checker: ``blur``, ``withhold`` or ``off`` for this
    #: model; unset follows ATELIER_SAFETY_ACTION.
    safety_action: str | None = None

    def public(self) -> dict[str, Any]:
        """What ``GET /v1/models`` and ``atelier models`` show."""
        return {
            "name": self.name,
            "pipeline": self.pipeline,
            "source": self.source,
            "revision": self.revision,
            "defaults": {
                "width": self.width,
                "height": self.height,
                "steps": self.steps,
                "guidance_scale": self.guidance_scale,
                "scheduler": self.scheduler,
            },
            "limits": {"max_side": self.max_side, "max_pixels": self.max_pixels},
            "schedulers": list(self.schedulers),
            "cfg": self.cfg,
            "size_multiple": self.size_multiple,
        }


#: The TOML type each key must have (TOML has no null: optional keys are left out).
_KINDS: dict[str, type | tuple[type, ...]] = {
    "source": str, "pipeline": str, "revision": str, "variant": str, "dtype": str,
    "scheduler": str, "schedulers": list, "steps": int, "guidance_scale": (int, float),
    "width": int, "height": int, "max_side": int, "max_pixels": int, "vae_source": str,
    "cfg": bool, "size_multiple": int, "safety_action": str,
}


def _typed(key: str, value: Any) -> bool:
    """Whether ``value`` has the type ``key`` needs (a bool is not a number here)."""
    if key == "schedulers":
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    if key == "cfg":
        return isinstance(value, bool)
    return not isinstance(value, bool) and isinstance(value, _KINDS.get(key, object))


def _spec(name: str, raw: dict[str, Any], origin: str) -> ModelSpec:
    known = {f.name for f in fields(ModelSpec)} - {"name"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{origin}: model {name!r} has unknown keys {sorted(unknown)}")
    if "source" not in raw:
        raise ValueError(f"{origin}: model {name!r} needs a source")
    wrong = sorted(k for k, v in raw.items() if not _typed(k, v))
    if wrong:
        raise ValueError(f"{origin}: model {name!r} has values of the wrong type for {wrong}")
    if "guidance_scale" in raw:
        raw = {**raw, "guidance_scale": float(raw["guidance_scale"])}
    spec = ModelSpec(name=name, **{**raw, "schedulers": tuple(raw.get("schedulers", ()))
                                   or (raw.get("scheduler", "euler"),)})
    problems = []
    if spec.pipeline not in PIPELINES:
        problems.append(f"pipeline must be one of {PIPELINES}")
    if spec.dtype not in DTYPES:
        problems.append(f"dtype must be one of {DTYPES}")
    for s in spec.schedulers:
        if s not in SCHEDULERS:
            problems.append(f"scheduler {s!r} is not one of {SCHEDULERS}")
    if spec.scheduler not in spec.schedulers:
        problems.append("scheduler must be among schedulers")
    flow = spec.pipeline in FLOW_PIPELINES
    for s in spec.schedulers:
        if (s in FLOW_SCHEDULERS) != flow:
            problems.append(f"scheduler {s!r} does not fit a {spec.pipeline} model")
    if spec.safety_action not in (None, "blur", "withhold", "off"):
        problems.append("safety_action must be blur, withhold or off")
    if spec.size_multiple not in (8, 16, 32, 64):
        problems.append("size_multiple must be 8, 16, 32 or 64")
    for side in (spec.width, spec.height):
        if side % spec.size_multiple or not 64 <= side <= spec.max_side:
            problems.append(f"width and height must be multiples of {spec.size_multiple} "
                            "within 64..max_side")
    if spec.width * spec.height > spec.max_pixels:
        problems.append("width × height exceeds max_pixels")
    if not 1 <= spec.steps <= 150:
        problems.append("steps must be 1..150")
    if not 0 <= spec.guidance_scale <= 30:
        problems.append("guidance_scale must be 0..30")
    if not spec.cfg and spec.guidance_scale != 0:
        problems.append("guidance_scale must be 0 when cfg is false")
    if problems:
        raise ValueError(f"{origin}: model {name!r}: " + "; ".join(problems))
    return spec


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter a request may name in ``loras``: a safetensors file made for one
    pipeline family."""

    name: str
    source: str  # a .safetensors file, or builtin:NAME (built locally for tests)
    family: str  # the pipeline family it was trained for: "sdxl", …

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family}


def _lora(name: str, raw: dict[str, Any], origin: str) -> LoraSpec:
    unknown = set(raw) - {"source", "family"}
    if unknown:
        raise ValueError(f"{origin}: lora {name!r} has unknown keys {sorted(unknown)}")
    for key in ("source", "family"):
        if not isinstance(raw.get(key), str):
            raise ValueError(f"{origin}: lora {name!r} needs a string {key}")
    if raw["family"] not in PIPELINES:
        raise ValueError(f"{origin}: lora {name!r}: family must be one of {PIPELINES}")
    src = raw["source"]
    if not (src.startswith("builtin:") or src.endswith(".safetensors")):
        raise ValueError(f"{origin}: lora {name!r}: source must be a .safetensors file")
    if name.startswith("storage:"):
        raise ValueError(f"{origin}: lora {name!r}: names starting storage: are storage keys")
    return LoraSpec(name=name, source=src, family=raw["family"])


class Registry:
    def __init__(self, specs: dict[str, ModelSpec],
                 loras: dict[str, LoraSpec] | None = None) -> None:
        self._specs = specs
        self._loras = loras or {}

    @classmethod
    def load(cls, models_file: str | None = None) -> Registry:
        text = resources.files("producer").joinpath("models.toml").read_text()
        base = tomllib.loads(text)
        raw: dict[str, dict[str, Any]] = dict(base.get("models", {}))
        raw_loras: dict[str, dict[str, Any]] = dict(base.get("loras", {}))
        if models_file:
            doc = tomllib.loads(Path(models_file).read_text())
            for name, entry in doc.get("models", {}).items():
                raw[name] = {**raw.get(name, {}), **entry}
            for name, entry in doc.get("loras", {}).items():
                raw_loras[name] = {**raw_loras.get(name, {}), **entry}
        origin = models_file or "models.toml"
        return cls({n: _spec(n, r, origin) for n, r in raw.items()},
                   {n: _lora(n, r, origin) for n, r in raw_loras.items()})

    def lora(self, name: str) -> LoraSpec | None:
        return self._loras.get(name)

    def lora_names(self) -> list[str]:
        return sorted(self._loras)

    def get(self, name: str) -> ModelSpec | None:
        return self._specs.get(name)

    def __getitem__(self, name: str) -> ModelSpec:
        return self._specs[name]

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._specs.values())
