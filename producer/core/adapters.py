"""The adapters a model entry or a request may name, as the registry reads them: a
model's IP-Adapter (``[models.NAME.ip_adapter]``), LoRAs (``[loras.NAME]``) and
ControlNets (``[controlnets.NAME]``), each checked as it is read."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

from producer.core.families import CONTROLNET_PIPELINES, IP_ADAPTER_PIPELINES, MODEL_FAMILIES


class Model(Protocol):
    """What an adapter asks of a model to say whether it fits (a ``ModelSpec``)."""

    @property
    def pipeline(self) -> str: ...


@dataclass(frozen=True)
class IpAdapterSpec:
    """A model's IP-Adapter (``[models.NAME.ip_adapter]``): what ``load_ip_adapter``
    reads. ``source`` a hub repo, a local folder, or ``builtin:NAME``; ``weight_name``
    a .safetensors file in ``subfolder``; ``image_encoder`` the CLIP vision tower's
    folder in ``source`` (relative to ``subfolder`` unless it holds a ``/``, as
    diffusers reads it). ``image_encoder_source`` (Flux models only, whose adapters
    ship without an encoder): the tower's own hub repo or folder instead."""

    source: str
    weight_name: str
    subfolder: str = ""
    image_encoder: str = "image_encoder"
    revision: str | None = None
    image_encoder_source: str | None = None


def ip_adapter_spec(name: str, raw: Any, origin: str, family: str) -> IpAdapterSpec:
    where = f"{origin}: model {name!r}: ip_adapter"
    if family not in IP_ADAPTER_PIPELINES:
        raise ValueError(f"{where} applies to {', '.join(IP_ADAPTER_PIPELINES)} only")
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a table")
    known = {f.name for f in fields(IpAdapterSpec)}
    if set(raw) - known:
        raise ValueError(f"{where} has unknown keys {sorted(set(raw) - known)}")
    if any(not isinstance(v, str) for v in raw.values()) or not {"source", "weight_name"} <= set(
        raw
    ):
        raise ValueError(
            f"{where} needs string source and weight_name (and string "
            "subfolder, image_encoder, image_encoder_source, revision if given)"
        )
    if not raw["weight_name"].endswith(".safetensors"):
        raise ValueError(f"{where}: weight_name must be a .safetensors file")
    if "image_encoder_source" in raw and (family != "flux" or "image_encoder" in raw):
        raise ValueError(
            f"{where}: image_encoder_source is for flux models, in place of "
            "image_encoder (a folder of source)"
        )
    return IpAdapterSpec(**raw)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter a request may name in ``loras``: a safetensors file made for one
    pipeline family."""

    name: str
    source: str  # a .safetensors file, or builtin:NAME (built locally for tests)
    family: str  # the pipeline family it was trained for: "sdxl", …

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family}

    def fits(self, spec: Model) -> bool:
        """Whether a request for ``spec`` may name it: it was made for the model's family."""
        return self.family == spec.pipeline


def lora_spec(name: str, raw: dict[str, Any], origin: str) -> LoraSpec:
    unknown = set(raw) - {"source", "family"}
    if unknown:
        raise ValueError(f"{origin}: lora {name!r} has unknown keys {sorted(unknown)}")
    for key in ("source", "family"):
        if not isinstance(raw.get(key), str):
            raise ValueError(f"{origin}: lora {name!r} needs a string {key}")
    if raw["family"] not in MODEL_FAMILIES:
        raise ValueError(f"{origin}: lora {name!r}: family must be one of {MODEL_FAMILIES}")
    src = raw["source"]
    if not (src.startswith("builtin:") or src.endswith(".safetensors")):
        raise ValueError(f"{origin}: lora {name!r}: source must be a .safetensors file")
    if name.startswith("storage:"):
        raise ValueError(f"{origin}: lora {name!r}: names starting storage: are storage keys")
    return LoraSpec(name=name, source=src, family=raw["family"])


@dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet a request may name in ``control`` (``[controlnets.NAME]``)."""

    name: str
    source: str  # a hub repo id, a local folder, or builtin:NAME (built for tests)
    family: str  # the pipeline family it was trained for
    kind: str  # what its control image is: canny, depth, pose, …
    revision: str | None = None
    variant: str | None = None

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "kind": self.kind}

    def fits(self, spec: Model) -> bool:
        """Whether a request for ``spec`` may name it: it was made for the model's family."""
        return self.family == spec.pipeline


def controlnet_spec(name: str, raw: dict[str, Any], origin: str) -> ControlNetSpec:
    where = f"{origin}: controlnet {name!r}"
    known = {"source", "family", "kind", "revision", "variant"}
    if set(raw) - known:
        raise ValueError(f"{where} has unknown keys {sorted(set(raw) - known)}")
    if any(not isinstance(raw.get(k), str) for k in ("source", "family", "kind")):
        raise ValueError(f"{where} needs a string source, family and kind")
    if raw["family"] not in CONTROLNET_PIPELINES:
        raise ValueError(f"{where}: family must be one of {CONTROLNET_PIPELINES}")
    return ControlNetSpec(name=name, **raw)
