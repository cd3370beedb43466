"""LoRA adapters per job: applied, scaled, read from storage, cached, and never leaked."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import boto3
import pytest

from producer.core.contract import Status
from producer.core.errors import InvalidLora
from producer.core.registry import Registry
from producer.core.settings import Settings
from producer.core.storage import LocalStorage
from tests.helpers import BUCKET, Stack, pixels, run_job, s3_get

P: dict[str, Any] = {"prompt": "a copper kettle", "seed": 31, "steps": 3}
LORA = "tiny-sdxl-lora"


def sha(record: dict[str, Any]) -> str:
    assert record["status"] == Status.SUCCEEDED, record
    return str(record["outputs"][0]["sha256"])


def image_pixels(stack: Stack, record: dict[str, Any]) -> bytes:
    from PIL import Image

    return pixels(Image.open(io.BytesIO(s3_get(stack, record["outputs"][0]["key"]))))


@pytest.mark.slow
def test_lora_changes_the_image_scale_zero_does_not_and_nothing_leaks(stack: Stack) -> None:
    before, _ = run_job(stack, **P)
    with_lora, _ = run_job(stack, **P, loras=[{"name": LORA, "scale": 1.0}])
    half, _ = run_job(stack, **P, loras=[{"name": LORA, "scale": 0.5}])
    zero, _ = run_job(stack, **P, loras=[{"name": LORA, "scale": 0.0}])
    after, _ = run_job(stack, **P)
    assert with_lora["request"]["loras"] == [{"name": LORA, "scale": 1.0}]
    assert len({sha(before), sha(with_lora), sha(half)}) == 3
    # scale 0 adds exactly nothing (the files differ only in the request in their text)
    assert sha(zero) != sha(before)
    assert image_pixels(stack, zero) == image_pixels(stack, before)
    assert sha(after) == sha(before)  # unloaded: the next job sees the base weights


@pytest.mark.slow
def test_lora_from_a_storage_key(stack: Stack, models_dir: Path) -> None:
    from worker.builtin.tiny import ensure_builtin

    data = ensure_builtin(LORA, models_dir).read_bytes()
    s3 = boto3.client("s3", endpoint_url=stack.settings.s3_endpoint_url)
    s3.put_object(Bucket=BUCKET, Key="adapters/style.safetensors", Body=data)
    by_name, _ = run_job(stack, **P, loras=[{"name": LORA, "scale": 0.8}])
    by_key, _ = run_job(
        stack, **P, loras=[{"name": "storage:adapters/style.safetensors", "scale": 0.8}]
    )
    assert image_pixels(stack, by_key) == image_pixels(stack, by_name)
    missing, _ = run_job(stack, **P, loras=[{"name": "storage:adapters/none.safetensors"}])
    assert missing["status"] == Status.FAILED
    assert missing["error"]["code"] == "invalid_request"
    assert missing["error"]["message"].startswith("loras.0.name: no object at storage key")
    s3.put_object(Bucket=BUCKET, Key="adapters/junk.safetensors", Body=b"not safetensors")
    junk, _ = run_job(stack, **P, loras=[{"name": "storage:adapters/junk.safetensors"}])
    assert junk["error"]["code"] == "invalid_request"
    assert "not a readable safetensors file" in junk["error"]["message"]
    # and the worker goes on, without a trace of either
    again, _ = run_job(stack, **P)
    assert sha(again) == sha(run_job(stack, **P)[0])


def lora_files(tmp_path: Path, models_dir: Path) -> tuple[LocalStorage, int]:
    from worker.builtin.tiny import build_tiny_lora

    for i in range(3):
        build_tiny_lora(tmp_path / f"l{i}.safetensors", models_dir / "tiny-sdxl", seed=i)
    return LocalStorage(tmp_path), (tmp_path / "l0.safetensors").stat().st_size


def test_cache_keeps_recent_adapters_within_its_bound(tmp_path: Path, models_dir: Path) -> None:
    from worker.diffusion.loras import LoraCache

    storage, size = lora_files(tmp_path, models_dir)
    cache = LoraCache(Settings(models_dir=str(models_dir)), Registry.load(), storage)
    cache.cache.max_bytes = 2 * size  # room for two (the file is a little larger than its tensors)
    names = [f"storage:l{i}.safetensors" for i in range(3)]
    cache.get(names[0])
    cache.get(names[1])
    assert cache.get(names[0]) is cache.get(names[0])  # a hit, the same state dict
    assert cache.loads == 2
    cache.get(names[2])  # evicts names[1], the least recently used
    assert cache.cached_names() == [names[0], names[2]]
    assert cache.cached_bytes <= cache.cache.max_bytes
    cache.get(names[1])
    assert cache.loads == 4
    cache.cache.max_bytes = 0  # nothing fits: read every time, cache nothing
    cache.get(names[1])
    assert cache.loads == 4  # still cached from before
    cache.get("storage:l0.safetensors")
    assert cache.loads == 5


def test_tiny_lora_builds_to_the_same_bytes(tmp_path: Path, models_dir: Path) -> None:
    from worker.builtin.tiny import build_tiny_lora, ensure_builtin

    again = build_tiny_lora(tmp_path / "again.safetensors", models_dir / "tiny-sdxl")
    assert again.read_bytes() == ensure_builtin(LORA, models_dir).read_bytes()


def test_an_adapter_that_fits_nothing_is_refused_and_leaves_nothing(
    tmp_path: Path, models_dir: Path
) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from worker.diffusion.loras import LoraCache, apply_loras

    save_file(
        {
            "no_such_block.lora_A.weight": torch.zeros(4, 8),
            "no_such_block.lora_B.weight": torch.zeros(8, 4),
        },
        str(tmp_path / "alien.safetensors"),
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(models_dir / "tiny-sdxl"), use_safetensors=True
    )
    cache = LoraCache(Settings(models_dir=str(models_dir)), Registry.load(), LocalStorage(tmp_path))
    with pytest.raises(InvalidLora) as info:
        apply_loras(
            pipe,
            cache,
            [{"name": LORA, "scale": 1.0}, {"name": "storage:alien.safetensors", "scale": 1.0}],
        )
    assert str(info.value).startswith("loras.1.name: ")
    assert pipe.get_list_adapters() == {}  # the first one was unloaded again
