"""Tiny ControlNets and IP-Adapters for the tiny models (tests, the demo).

Built like the tiny pipelines (worker/tiny.py): fixed seeds, random weights, saved as
safetensors, and loaded through the paths real weights take: a ControlNet folder read
by ``ControlNetModel.from_pretrained``, an IP-Adapter folder (``ip-adapter.safetensors``
with ``image_proj.*`` and ``ip_adapter.*`` keys, as h94/IP-Adapter's files, and an
``image_encoder/`` CLIP vision tower) read by ``load_ip_adapter``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from worker.tiny import SEED, _save

#: The file name the tiny IP-Adapters are saved under (the registry's weight_name).
IP_ADAPTER_FILE = "ip-adapter.safetensors"


def build_tiny_controlnet(dest: str | os.PathLike[str], base: str | os.PathLike[str],
                          seed: int = SEED + 200) -> Path:
    """A ControlNet made with ``ControlNetModel.from_unet`` from the tiny model's UNet
    (``FluxControlNetModel.from_transformer`` from tiny-flux's transformer), every
    weight then drawn at random from ``seed`` (both zero-initialize the output
    projections, which would make the control image change nothing)."""
    import torch
    from diffusers import (
        ControlNetModel,
        FluxControlNetModel,
        FluxTransformer2DModel,
        UNet2DConditionModel,
    )

    flux = (Path(base) / "transformer").is_dir()
    if flux:
        transformer = FluxTransformer2DModel.from_pretrained(Path(base) / "transformer",
                                                             use_safetensors=True)
    else:
        unet = UNet2DConditionModel.from_pretrained(Path(base) / "unet", use_safetensors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if flux:
            controlnet = FluxControlNetModel.from_transformer(
                transformer, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2)
        else:
            controlnet = ControlNetModel.from_unet(unet,
                                                   conditioning_embedding_out_channels=(8, 16))
        with torch.no_grad():
            for p in controlnet.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    return _save(controlnet, Path(dest))


def build_tiny_ip_adapter(dest: str | os.PathLike[str], base: str | os.PathLike[str],
                          seed: int = SEED + 300) -> Path:
    """An IP-Adapter for the tiny model's UNet: a tiny CLIPVisionModelWithProjection in
    ``image_encoder/`` and the adapter (an image projection to 4 tokens, and a key and
    value projection per cross-attention layer) in diffusers' layout."""
    import shutil
    import tempfile

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    dest = Path(dest)
    unet = UNet2DConditionModel.from_pretrained(Path(base) / "unet", use_safetensors=True)
    cross = unet.config.cross_attention_dim
    embed_dim = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            image_size=32, patch_size=8, projection_dim=embed_dim))
        state: dict[str, Any] = {
            "image_proj.proj.weight": torch.randn(4 * cross, embed_dim) * 0.2,
            "image_proj.proj.bias": torch.randn(4 * cross) * 0.2,
            "image_proj.norm.weight": torch.ones(cross),
            "image_proj.norm.bias": torch.zeros(cross),
        }
        for key_id, hidden in _cross_attention_layers(unet):
            for proj in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{key_id}.{proj}.weight"] = torch.randn(hidden, cross) * 0.3
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        encoder.save_pretrained(tmp / "image_encoder", safe_serialization=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / IP_ADAPTER_FILE))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _cross_attention_layers(unet: Any) -> list[tuple[int, int]]:
    """(key id, hidden size) of each cross-attention processor, numbered as the original
    IP-Adapter checkpoints are (every attention processor counted, cross ones odd)."""
    cfg = unet.config
    out = []
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name.split(".")[1])]
        else:
            hidden = cfg.block_out_channels[int(name.split(".")[1])]
        out.append((key_id, hidden))
        key_id += 2
    return out


def ensure(name: str, root: Path) -> Path | None:
    """The path of a tiny ControlNet or IP-Adapter builtin (``tiny-sdxl-controlnet``,
    ``tiny-sdxl-controlnet@2`` for another seed, ``tiny-sd15-ip-adapter``, …), built
    first if missing; None for another name."""
    from worker.tiny import ensure_builtin

    stem, _, variant = name.partition("@")
    for suffix, builder, marker, seed in (
        ("-controlnet", build_tiny_controlnet, "config.json", SEED + 200),
        ("-ip-adapter", build_tiny_ip_adapter, IP_ADAPTER_FILE, SEED + 300),
    ):
        bases = ("tiny-sdxl", "tiny-sd15") + (("tiny-flux",) if suffix == "-controlnet" else ())
        if stem.endswith(suffix) and stem.removesuffix(suffix) in bases:
            dest = root / name
            if not (dest / marker).exists():
                base = ensure_builtin(stem.removesuffix(suffix), root)
                builder(dest, base, seed + int(variant or 0))
            return dest
    return None
