"""The checks of what steers a generation besides its prompt: ``loras`` (registry names,
storage keys, ``job:`` trainings), ``control`` (ControlNets of the model's family) and
``references`` (the model's IP-Adapter). Each refusal names its field."""

from __future__ import annotations

import re
from typing import Any

from producer.core.families import (
    CONTROLNET_PIPELINES,
    IP_ADAPTER_PIPELINES,
    REFERENCE_MODE_PIPELINES,
)
from producer.core.registry import ModelSpec, Registry
from producer.core.settings import Settings
from producer.requests.fields import FieldError, Fields, check_source

__all__ = ["check_conditioning", "check_loras"]

_JOB_ID = re.compile(r"[0-9a-f]{32}")


def check_loras(
    loras: list[dict[str, Any]], registry: Registry, spec: ModelSpec | None
) -> list[FieldError]:
    """Each LoRA must exist (registry) or name a plausible storage key, and fit the model."""
    errors = []
    seen: set[str] = set()
    for i, ref in enumerate(loras):
        name, field = ref["name"], f"loras.{i}.name"
        if name in seen:
            errors.append({"field": field, "message": f"{name!r} is repeated"})
        seen.add(name)
        if name.startswith("job:"):
            if not _JOB_ID.fullmatch(name.removeprefix("job:")):
                errors.append(
                    {
                        "field": field,
                        "message": "job:<id> must name a training by its id (32 hex characters)",
                    }
                )
            continue
        if name.startswith("storage:"):
            key = name.removeprefix("storage:")
            if (
                not key.endswith(".safetensors")
                or key.startswith("/")
                or ".." in key.split("/")
                or "\\" in key
            ):
                errors.append(
                    {
                        "field": field,
                        "message": "storage:<key> must name a "
                        ".safetensors object by a relative key (no '..')",
                    }
                )
            continue
        lora = registry.lora(name)
        if lora is None:
            known = ", ".join(registry.lora_names()) or "none"
            errors.append(
                {
                    "field": field,
                    "message": f"unknown LoRA {name!r}; known: {known}; "
                    "or storage:<key> for an uploaded .safetensors file",
                }
            )
        elif spec is not None and not lora.fits(spec):
            errors.append(
                {
                    "field": field,
                    "message": f"{name!r} is for {lora.family} models; "
                    f"{spec.name} is {spec.pipeline}",
                }
            )
    return errors


def check_conditioning(
    fields: Fields, registry: Registry, spec: ModelSpec | None, settings: Settings
) -> list[FieldError]:
    """``control`` (ControlNets of the model's family) and ``references`` (the model's
    IP-Adapter): names, ranges and images."""
    errors: list[FieldError] = []
    control = fields.valid("control") or []
    refs = fields.valid("references") or []
    if spec is not None:
        for name, given, families in (
            ("control", control, CONTROLNET_PIPELINES),
            ("references", refs, IP_ADAPTER_PIPELINES),
        ):
            if given and spec.pipeline not in families:
                errors.append(
                    {
                        "field": name,
                        "message": f"{spec.name} ({spec.pipeline}) takes "
                        f"none; only {', '.join(families)} models do",
                    }
                )
        if spec.pipeline not in CONTROLNET_PIPELINES:
            return errors
    for i, entry in enumerate(control):
        field = f"control.{i}"
        cn = registry.controlnet(entry["name"])
        if cn is None:
            known = ", ".join(registry.controlnet_names()) or "none"
            errors.append(
                {
                    "field": f"{field}.name",
                    "message": f"unknown ControlNet {entry['name']!r}; known: {known}",
                }
            )
        elif spec is not None and not cn.fits(spec):
            errors.append(
                {
                    "field": f"{field}.name",
                    "message": f"{cn.name!r} is for "
                    f"{cn.family} models; {spec.name} is {spec.pipeline}",
                }
            )
        if entry.get("end", 1.0) <= entry.get("start", 0.0):
            errors.append({"field": f"{field}.end", "message": "must be greater than start"})
        check_source(f"{field}.image", entry["image"], settings, errors)
    if refs and spec is not None and spec.pipeline in IP_ADAPTER_PIPELINES:
        errors += _check_references(fields, spec, refs, control)
    for i, entry in enumerate(refs):
        check_source(f"references.{i}.image", entry["image"], settings, errors)
    return errors


def _check_references(
    fields: Fields, spec: ModelSpec, refs: list[dict[str, Any]], control: list[dict[str, Any]]
) -> list[FieldError]:
    """What the model's family and adapter allow of ``references``."""
    if spec.ip_adapter is None:
        return [
            {
                "field": "references",
                "message": f"{spec.name} has no ip_adapter in the "
                "registry: it takes no reference images",
            }
        ]
    errors: list[FieldError] = []
    if spec.pipeline not in REFERENCE_MODE_PIPELINES:
        for i, entry in enumerate(refs):
            if entry.get("mode", "full") != "full":
                errors.append(
                    {
                        "field": f"references.{i}.mode",
                        "message": f"{spec.name} "
                        f"({spec.pipeline}) takes mode full only: {entry['mode']} is "
                        "InstantStyle's choice of UNet attention layers, which a "
                        "Flux transformer does not have",
                    }
                )
    if spec.pipeline == "flux" and control and fields.given("image"):
        task = "inpainting" if fields.given("mask") else "img2img"
        errors.append(
            {
                "field": "references",
                "message": f"Flux's ControlNet {task} pipeline "
                "takes no reference images: leave out references, control or image",
            }
        )
    return errors
