"""Tiny ControlNets and IP-Adapters for the tiny models (tests, the demo).

Built like the tiny pipelines (:mod:`worker.builtin.tiny`): fixed seeds, random weights, saved as
safetensors, and loaded through the paths real weights take: a ControlNet folder read
by ``ControlNetModel.from_pretrained``, an IP-Adapter folder (``ip-adapter.safetensors``
with ``image_proj.*`` and ``ip_adapter.*`` keys, as h94/IP-Adapter's files; for
tiny-flux ``ip_adapter.safetensors`` in XLabs' layout; and an ``image_encoder/`` CLIP
vision tower) read by ``load_ip_adapter``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.builtin.common import SEED, save_pretrained, write_folder

#: The file names the tiny IP-Adapters are saved under (the registry's weight_name):
#: h94's style for the UNets, XLabs' for tiny-flux.
IP_ADAPTER_FILE = "ip-adapter.safetensors"
FLUX_IP_ADAPTER_FILE = "ip_adapter.safetensors"
#: The tiny image encoders' embedding size (what the image projections read).
IMAGE_EMBED_DIM = 16


def build_tiny_controlnet(
    dest: str | os.PathLike[str], base: str | os.PathLike[str], seed: int = SEED + 200
) -> Path:
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
        transformer = FluxTransformer2DModel.from_pretrained(
            Path(base) / "transformer", use_safetensors=True
        )
    else:
        unet = UNet2DConditionModel.from_pretrained(Path(base) / "unet", use_safetensors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if flux:
            controlnet = FluxControlNetModel.from_transformer(
                transformer,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
            )
        else:
            controlnet = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=(8, 16)
            )
        with torch.no_grad():
            for p in controlnet.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    return save_pretrained(controlnet, Path(dest))


def build_tiny_ip_adapter(
    dest: str | os.PathLike[str], base: str | os.PathLike[str], seed: int = SEED + 300
) -> Path:
    """An IP-Adapter for the tiny model: a tiny CLIPVisionModelWithProjection in
    ``image_encoder/`` and the adapter weights. For a UNet, diffusers' layout (an image
    projection to 4 tokens, a key and value projection per cross-attention layer, no
    bias) in ``ip-adapter.safetensors``; for tiny-flux's transformer, XLabs' Flux layout
    (``ip_adapter_proj_model.*`` and a biased key and value projection per double block,
    ``double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj``) in
    ``ip_adapter.safetensors``, as XLabs-AI/flux-ip-adapter ships it."""
    import torch

    if (Path(base) / "transformer").is_dir():
        return _build_tiny_flux_ip_adapter(Path(dest), Path(base), seed)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(base) / "unet", use_safetensors=True)
    cross = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = _tiny_image_encoder()
        state = _image_projection("image_proj", cross)
        for key_id, hidden in _cross_attention_layers(unet):
            for proj in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{key_id}.{proj}.weight"] = torch.randn(hidden, cross) * 0.3
    return _save_adapter(Path(dest), encoder, state, IP_ADAPTER_FILE)


def _build_tiny_flux_ip_adapter(dest: Path, base: Path, seed: int) -> Path:
    import torch
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer", use_safetensors=True)
    joint = transformer.config.joint_attention_dim
    inner = transformer.inner_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = _tiny_image_encoder()
        state = _image_projection("ip_adapter_proj_model", joint)
        for i in range(transformer.config.num_layers):  # the double (joint) blocks
            for proj in ("k", "v"):
                key = f"double_blocks.{i}.processor.ip_adapter_double_stream_{proj}_proj"
                state[f"{key}.weight"] = torch.randn(inner, joint) * 0.3
                state[f"{key}.bias"] = torch.randn(inner) * 0.1
    return _save_adapter(dest, encoder, state, FLUX_IP_ADAPTER_FILE)


def _image_projection(prefix: str, dim: int) -> dict[str, Any]:
    """An image projection to 4 tokens of ``dim`` under ``prefix`` (h94's ``image_proj``,
    XLabs' ``ip_adapter_proj_model``), drawn from the current seed."""
    import torch

    return {
        f"{prefix}.proj.weight": torch.randn(4 * dim, IMAGE_EMBED_DIM) * 0.2,
        f"{prefix}.proj.bias": torch.randn(4 * dim) * 0.2,
        f"{prefix}.norm.weight": torch.ones(dim),
        f"{prefix}.norm.bias": torch.zeros(dim),
    }


def _tiny_image_encoder() -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            projection_dim=IMAGE_EMBED_DIM,
        )
    )


def _save_adapter(dest: Path, encoder: Any, state: dict[str, Any], file: str) -> Path:
    """The encoder in ``image_encoder/`` and ``state`` in ``file``, put in place whole."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        encoder.save_pretrained(tmp / "image_encoder", safe_serialization=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / file))

    return write_folder(dest, write)


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


def ensure(name: str, root: Path, ensure_base: Callable[[str, Path], Path]) -> Path | None:
    """The path of a tiny ControlNet or IP-Adapter builtin (``tiny-sdxl-controlnet``,
    ``tiny-sdxl-controlnet@2`` for another seed, ``tiny-sd15-ip-adapter``,
    ``tiny-flux-ip-adapter``, …), built first if missing; None for another name.

    ``ensure_base`` gives the tiny pipeline one is built on
    (:func:`worker.builtin.tiny.ensure_builtin`, which calls this: handed in, not imported,
    so neither module imports the other)."""
    stem, _, variant = name.partition("@")
    for suffix, builder, marker, seed in (
        ("-controlnet", build_tiny_controlnet, "config.json", SEED + 200),
        ("-ip-adapter", build_tiny_ip_adapter, IP_ADAPTER_FILE, SEED + 300),
    ):
        if stem.endswith(suffix) and stem.removesuffix(suffix) in (
            "tiny-sdxl",
            "tiny-sd15",
            "tiny-flux",
        ):
            dest = root / name
            built = dest / (FLUX_IP_ADAPTER_FILE if stem == "tiny-flux-ip-adapter" else marker)
            if not built.exists():
                base = ensure_base(stem.removesuffix(suffix), root)
                builder(dest, base, seed + int(variant or 0))
            return dest
    return None
