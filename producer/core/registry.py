"""The model registry: which models exist and the limits and defaults of each.

Pure data, read from ``producer/core/models.toml`` plus the file ``ATELIER_MODELS_FILE``
names. The producer validates requests against it; the worker loads pipelines from it.
A model's ``options`` table is typed in :mod:`producer.core.pipeline_options`;
:meth:`Registry.view` says which ControlNets, reference modes and LoRAs a model takes.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_args

from producer.core import keys as K
from producer.core.adapters import (
    ControlNetSpec,
    IpAdapterSpec,
    LoraSpec,
    controlnet_spec,
    ip_adapter_spec,
    lora_spec,
)
from producer.core.contract import (
    MAX_CONTROLS,
    MAX_REFERENCES,
    MAX_STEPS,
    ControlRef,
    Kind,
    ReferenceRef,
)
from producer.core.families import (
    CONTROLNET_PIPELINES,
    DTYPES,
    FLOW_PIPELINES,
    FLOW_SCHEDULERS,
    IP_ADAPTER_PIPELINES,
    OPTION_PIPELINES,
    PIPELINES,
    REFERENCE_MODE_PIPELINES,
    SCHEDULERS,
    TRAINABLE_PIPELINES,
)
from producer.core.pipeline_options import PipelineOptions, parse_options


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
    #: Speed and memory options of the pipeline (``sdxl`` pipelines).
    options: PipelineOptions = field(default_factory=PipelineOptions)
    #: ``simulated`` only: milliseconds the stand-in GPU spends per image.
    gpu_ms: float = 0.0
    #: The IP-Adapter a request's ``references`` use; None: the model takes none.
    ip_adapter: IpAdapterSpec | None = None

    def public(self) -> dict[str, Any]:
        """The model's own part of what ``GET /v1/models`` shows (:meth:`Registry.view`
        adds what its requests may name)."""
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
            "limits": {
                "max_side": self.max_side,
                "max_pixels": self.max_pixels,
                "max_steps": MAX_STEPS,
            },
            "schedulers": list(self.schedulers),
            "cfg": self.cfg,
            "size_multiple": self.size_multiple,
            "references": self.ip_adapter is not None,
        }


#: The TOML type each key must have (TOML has no null: optional keys are left out).
_KINDS: dict[str, type | tuple[type, ...]] = {
    "source": str,
    "pipeline": str,
    "revision": str,
    "variant": str,
    "dtype": str,
    "scheduler": str,
    "schedulers": list,
    "steps": int,
    "guidance_scale": (int, float),
    "width": int,
    "height": int,
    "max_side": int,
    "max_pixels": int,
    "vae_source": str,
    "cfg": bool,
    "size_multiple": int,
    "safety_action": str,
    "options": dict,
    "gpu_ms": (int, float),
    "ip_adapter": dict,
}


def _typed(key: str, value: Any) -> bool:
    """Whether ``value`` has the type ``key`` needs (a bool is not a number here)."""
    if key == "schedulers":
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    if key == "cfg":
        return isinstance(value, bool)
    return not isinstance(value, bool) and isinstance(value, _KINDS.get(key, object))


def _converted(name: str, raw: dict[str, Any], origin: str) -> dict[str, Any]:
    """The typed values of a model's raw table: floats as floats, the nested tables as
    their dataclasses."""
    if "guidance_scale" in raw:
        raw = {**raw, "guidance_scale": float(raw["guidance_scale"])}
    if "gpu_ms" in raw:
        raw = {**raw, "gpu_ms": float(raw["gpu_ms"])}
    if "options" in raw:
        raw = {**raw, "options": parse_options(name, raw["options"], origin)}
    if "ip_adapter" in raw:
        raw = {
            **raw,
            "ip_adapter": ip_adapter_spec(
                name, raw["ip_adapter"], origin, raw.get("pipeline", "sdxl")
            ),
        }
    return raw


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
    raw = _converted(name, raw, origin)
    spec = ModelSpec(
        name=name,
        **{
            **raw,
            "schedulers": tuple(raw.get("schedulers", ())) or (raw.get("scheduler", "euler"),),
        },
    )
    problems = _problems(spec, raw)
    if problems:
        raise ValueError(f"{origin}: model {name!r}: " + "; ".join(problems))
    return spec


def _problems(spec: ModelSpec, raw: dict[str, Any]) -> list[str]:
    """What is wrong with a model's values, each in their own words (none: it is fine)."""
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
            problems.append(
                f"width and height must be multiples of {spec.size_multiple} within 64..max_side"
            )
    if spec.width * spec.height > spec.max_pixels:
        problems.append("width × height exceeds max_pixels")
    if not 1 <= spec.steps <= MAX_STEPS:
        problems.append(f"steps must be 1..{MAX_STEPS}")
    if not 0 <= spec.guidance_scale <= 30:
        problems.append("guidance_scale must be 0..30")
    if not spec.cfg and spec.guidance_scale != 0:
        problems.append("guidance_scale must be 0 when cfg is false")
    if spec.pipeline == "simulated":
        if not spec.source.startswith("builtin:simulated"):
            problems.append('a simulated pipeline needs source = "builtin:simulated"')
        if not 0 <= spec.gpu_ms <= 600_000:
            problems.append("gpu_ms must be 0..600000")
    elif "gpu_ms" in raw:
        problems.append("gpu_ms applies to simulated pipelines only")
    if "options" in raw and spec.pipeline not in OPTION_PIPELINES:
        problems.append(f"options apply to {', '.join(OPTION_PIPELINES)} pipelines only")
    return problems


def _builtin_text() -> str:
    return resources.files("producer.core").joinpath("models.toml").read_text()


class Registry:
    def __init__(
        self,
        specs: dict[str, ModelSpec],
        loras: dict[str, LoraSpec] | None = None,
        controlnets: dict[str, ControlNetSpec] | None = None,
    ) -> None:
        self._specs = specs
        self._loras = loras or {}
        self._controlnets = controlnets or {}

    @classmethod
    def load(cls, models_file: str | None = None) -> Registry:
        base = tomllib.loads(_builtin_text())
        raw: dict[str, dict[str, Any]] = dict(base.get("models", {}))
        raw_loras: dict[str, dict[str, Any]] = dict(base.get("loras", {}))
        raw_cn: dict[str, dict[str, Any]] = dict(base.get("controlnets", {}))
        if models_file:
            parsed = tomllib.loads(Path(models_file).read_text())
            for name, entry in parsed.get("models", {}).items():
                merged = {**raw.get(name, {}), **entry}
                if isinstance(entry.get("options"), dict):  # options too, key by key
                    merged["options"] = {**raw.get(name, {}).get("options", {}), **entry["options"]}
                raw[name] = merged
            for name, entry in parsed.get("loras", {}).items():
                raw_loras[name] = {**raw_loras.get(name, {}), **entry}
            for name, entry in parsed.get("controlnets", {}).items():
                raw_cn[name] = {**raw_cn.get(name, {}), **entry}
        origin = models_file or "models.toml"
        return cls(
            {n: _spec(n, r, origin) for n, r in raw.items()},
            {n: lora_spec(n, r, origin) for n, r in raw_loras.items()},
            {n: controlnet_spec(n, r, origin) for n, r in raw_cn.items()},
        )

    def controlnets_for(self, spec: ModelSpec) -> list[ControlNetSpec]:
        """The ControlNets a request for ``spec`` may name in ``control``: those of its
        family, where the family takes ControlNets at all (as the validator checks)."""
        if spec.pipeline not in CONTROLNET_PIPELINES:
            return []
        return [cn for n in self.controlnet_names() if (cn := self._controlnets[n]).fits(spec)]

    def loras_for(self, spec: ModelSpec) -> list[LoraSpec]:
        """The registry LoRAs a request for ``spec`` may name in ``loras``: those made for
        its family. (``storage:<key>`` and ``job:<id>`` adapters are not listed.)"""
        return [lora for n in self.lora_names() if (lora := self._loras[n]).fits(spec)]

    def view(self, spec: ModelSpec) -> dict[str, Any]:
        """What ``GET /v1/models`` and ``atelier models`` show of a model: its public
        view, and the names and modes its requests' ``control``, ``references`` and
        ``loras`` may use."""
        preprocess = list(get_args(ControlRef.model_fields["preprocess"].annotation))
        ip_adapter = None
        if spec.ip_adapter is not None and spec.pipeline in IP_ADAPTER_PIPELINES:
            modes = get_args(ReferenceRef.model_fields["mode"].annotation)
            ip_adapter = {
                "source": spec.ip_adapter.source,
                "modes": list(modes) if spec.pipeline in REFERENCE_MODE_PIPELINES else ["full"],
                "max_images": MAX_REFERENCES,
            }
        return {
            **spec.public(),
            "controlnets": [
                {**cn.public(), "preprocess": preprocess} for cn in self.controlnets_for(spec)
            ],
            "max_controls": MAX_CONTROLS,
            "ip_adapter": ip_adapter,
            "loras": [lora.public() for lora in self.loras_for(spec)],
        }

    def controlnet(self, name: str) -> ControlNetSpec | None:
        return self._controlnets.get(name)

    def controlnet_names(self) -> list[str]:
        return sorted(self._controlnets)

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

    def lanes(self) -> list[str]:
        """Every queue's lane: each model's, then the trainings' of each model that can
        train (``train.<model>``, :func:`producer.core.keys.lane`)."""
        return [
            *self.names(),
            *(K.lane(s.name, Kind.TRAIN) for s in self if s.pipeline in TRAINABLE_PIPELINES),
        ]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._specs.values())
