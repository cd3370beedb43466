"""LoRA adapters per job: read (registry file or storage key), cached, applied, removed.

An adapter is loaded into the pipeline's modules before a job's generation and unloaded
right after it, under the GPU lock, so nothing carries over into the next job: after
``unload_lora_weights`` the modules are the base modules again (peft wraps the layers it
adapts and unwrapping restores the originals, whose weights it never changed).

State dicts (not modules) of recently used adapters stay in host memory, least recently
used first out, within ``ATELIER_LORA_CACHE_MB``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from producer.core.errors import InvalidLora, StorageUnavailable
from producer.core.registry import Registry
from producer.core.settings import Settings
from worker.diffusion.cache import ByteBudgetCache

log = logging.getLogger(__name__)


def _nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class LoraCache:
    def __init__(self, settings: Settings, registry: Registry, storage: Any) -> None:
        self.settings = settings
        self.registry = registry
        self.storage = storage
        self.cache: ByteBudgetCache[dict[str, Any]] = ByteBudgetCache(
            settings.lora_cache_mb * 1024 * 1024, "LoRA"
        )
        self.loads = 0  # reads from disk or storage (the cache missed)

    @property
    def cached_bytes(self) -> int:
        return self.cache.cached_bytes

    def cached_names(self) -> list[str]:
        return self.cache.names()

    def get(self, name: str, field: str = "loras") -> dict[str, Any]:
        """The adapter's state dict (shared: callers copy the dict, never the tensors)."""
        hit = self.cache.get(name)
        if hit is not None:
            return hit
        state = self._read(name, field)
        self.loads += 1
        self.cache.put(name, state, _nbytes(state))
        return state

    def _read(self, name: str, field: str) -> dict[str, Any]:
        from safetensors import SafetensorError
        from safetensors.torch import load, load_file

        try:
            if name.startswith("job:"):  # a training's adapter
                key = self.storage.key(name.removeprefix("job:"), "adapter.safetensors")
                return load(self._get_object(key, field))
            if name.startswith("storage:"):
                key = name.removeprefix("storage:")
                raw = self._get_object(key, field)
                return load(raw)
            spec = self.registry.lora(name)
            if spec is None:  # the producer checked; a registry changed in between
                raise InvalidLora(f"{field}: unknown LoRA {name!r} on this worker")
            if spec.source.startswith("builtin:"):
                from worker.builtin.tiny import ensure_builtin

                path = ensure_builtin(
                    spec.source.removeprefix("builtin:"), self.settings.models_dir
                )
            else:
                path = Path(spec.source).expanduser()
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidLora(
                f"{field}: {name!r} is not a readable safetensors file ({exc})"
            ) from None

    def _get_object(self, key: str, field: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            raw: bytes = self.storage.get(key)
            return raw
        except FileNotFoundError:
            raise InvalidLora(f"{field}: no object at storage key {key!r}") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise InvalidLora(f"{field}: no object at storage key {key!r}") from None
            raise StorageUnavailable(f"{field}: reading {key!r}: {exc}") from None
        except BotoCoreError as exc:
            raise StorageUnavailable(f"{field}: reading {key!r}: {exc}") from None


def apply_loras(pipe: Any, cache: LoraCache, loras: Sequence[Mapping[str, Any]]) -> list[str]:
    """Load the job's adapters into ``pipe`` (shared modules: its from_pipe siblings see
    them too) and set their scales; returns the adapter names. On failure nothing stays
    loaded."""
    names: list[str] = []
    try:
        for i, ref in enumerate(loras):
            field = f"loras.{i}.name"
            state = cache.get(ref["name"], field)
            adapter = f"job_lora_{i}"
            try:
                # A copy of the dict: diffusers pops the keys it consumes.
                pipe.load_lora_weights(dict(state), adapter_name=adapter)
            except (ValueError, RuntimeError, KeyError) as exc:
                raise InvalidLora(
                    f"{field}: {ref['name']!r} does not fit this model ({exc})"
                ) from None
            loaded = {a for group in pipe.get_list_adapters().values() for a in group}
            if adapter not in loaded:
                names.append(adapter)
                raise InvalidLora(f"{field}: {ref['name']!r} matches no layer of this model")
            names.append(adapter)
        if names:
            pipe.set_adapters(names, [float(r["scale"]) for r in loras])
    except BaseException:
        unload_loras(pipe, names)
        raise
    return names


def unload_loras(pipe: Any, names: list[str]) -> None:
    if names or pipe.get_list_adapters():
        pipe.unload_lora_weights()
