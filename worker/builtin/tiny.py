"""Build ``tiny-sdxl``: an SDXL-architecture pipeline with random weights.

Tests and the demo need a model that runs on a CPU, offline, in well under a second,
and that loads through exactly the path real checkpoints take
(``from_pretrained(..., use_safetensors=True)``). So the project builds one from
configs: fixed seed, fixed configs, saved as safetensors. The same torch version
gives the same weight bytes on every machine. (The seed, the tokenizer and the atomic
save are in :mod:`worker.builtin.common`.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from worker.builtin.common import MARKER, SEED, byte_tokenizer, save_pretrained


def build_tiny_sdxl(dest: str | os.PathLike[str]) -> Path:
    """Build the tiny SDXL pipeline into ``dest`` (atomically) and return the path."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dest = Path(dest)
    tokenizer, vocab_size = byte_tokenizer()
    # Fork the RNG so building does not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
            cross_attention_dim=64,  # 32 + 32: both encoders' hidden states
            norm_num_groups=32,
        )
        torch.manual_seed(SEED + 1)
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            sample_size=128,
        )
        text_config = CLIPTextConfig(
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=vocab_size,
            hidden_act="gelu",
            projection_dim=32,
        )
        torch.manual_seed(SEED + 2)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(SEED + 3)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe: Any = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    return save_pretrained(pipe, dest)


def _text_config(vocab_size: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=vocab_size,
        hidden_act="gelu",
        projection_dim=32,
    )


def _vae(latent_channels: int = 4, blocks: int = 2, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32] * blocks if blocks > 2 else [32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=latent_channels,
        sample_size=128,
        **extra,
    )


def build_tiny_sd15(dest: str | os.PathLike[str]) -> Path:
    """A Stable Diffusion 1.x pipeline (one CLIP encoder, 4-channel VAE), random weights."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer, vocab_size = byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 10)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=32,
        )
        torch.manual_seed(SEED + 11)
        vae = _vae()
        torch.manual_seed(SEED + 12)
        text_encoder = CLIPTextModel(_text_config(vocab_size))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return save_pretrained(pipe, Path(dest))


def build_tiny_flux(dest: str | os.PathLike[str]) -> Path:
    """A FLUX.1-schnell-shaped pipeline: a tiny FluxTransformer2DModel (no guidance
    embedding, like schnell), CLIP + T5 text encoders, a 16-channel VAE with the real
    one's 8× downsampling, flow-matching Euler. Random weights.

    Both tokenizers are the byte-level one (no T5 vocabulary can be downloaded here);
    the second takes up to 512 tokens, as T5's does in the real pipeline.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, vocab_size = byte_tokenizer()
    tokenizer_2, _ = byte_tokenizer(512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 20)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=False,
            axes_dims_rope=(4, 4, 8),
        )
        torch.manual_seed(SEED + 21)
        vae = _vae(
            latent_channels=16,
            blocks=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        )
        torch.manual_seed(SEED + 22)
        text_encoder = CLIPTextModel(_text_config(vocab_size))
        torch.manual_seed(SEED + 23)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=vocab_size,
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=vocab_size - 1,
                eos_token_id=vocab_size - 1,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe: Any = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return save_pretrained(pipe, Path(dest))


def ensure_tiny_sdxl(dest: str | os.PathLike[str]) -> Path:
    """Return ``dest``, building the model there first if it is missing."""
    dest = Path(dest)
    if not (dest / MARKER).exists():
        build_tiny_sdxl(dest)
    return dest


def build_tiny_lora(
    dest: str | os.PathLike[str],
    base: str | os.PathLike[str],
    seed: int = SEED + 100,
    rank: int = 4,
    family: str = "sdxl",
) -> Path:
    """A LoRA for the attention projections of a tiny model's denoiser (the UNet of
    ``sdxl``/``sd15``, the transformer of ``flux``), random but fixed by ``seed``, saved
    as one diffusers-format safetensors file (atomically) at ``dest``."""
    import diffusers
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe_cls, model_cls, sub, arg = {
        "sdxl": ("StableDiffusionXLPipeline", "UNet2DConditionModel", "unet", "unet_lora_layers"),
        "sd15": ("StableDiffusionPipeline", "UNet2DConditionModel", "unet", "unet_lora_layers"),
        "flux": (
            "FluxPipeline",
            "FluxTransformer2DModel",
            "transformer",
            "transformer_lora_layers",
        ),
    }[family]
    dest = Path(dest)
    denoiser = getattr(diffusers, model_cls).from_pretrained(Path(base) / sub, use_safetensors=True)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-lora-", dir=dest.parent))
    try:
        getattr(diffusers, pipe_cls).save_lora_weights(tmp, weight_name=dest.name, **{arg: layers})
        os.replace(tmp / dest.name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ensure_builtin(name: str, models_dir: str | os.PathLike[str]) -> Path:
    """The path of a ``builtin:NAME`` model or adapter, built first if missing."""
    root = Path(models_dir)
    builders = {
        "tiny-sdxl": build_tiny_sdxl,
        "tiny-sd15": build_tiny_sd15,
        "tiny-flux": build_tiny_flux,
        "tiny-sdxl-edm": build_tiny_sdxl_edm,
    }
    if name in builders:
        dest = root / name
        if not (dest / MARKER).exists():
            builders[name](dest)
        return dest
    if name.startswith("tiny-safety-checker"):
        # tiny-safety-checker flags nothing; tiny-safety-checker@T flags above cosine T
        threshold = float(name.partition("@")[2] or 1.0)
        dest = root / name
        if not (dest / "config.json").exists():
            build_tiny_safety_checker(dest, threshold)
        return dest
    if name == "tiny-sdxl-lora":
        dest = root / "tiny-sdxl-lora.safetensors"
        if not dest.exists():
            build_tiny_lora(dest, ensure_tiny_sdxl(root / "tiny-sdxl"))
        return dest
    from worker.builtin.refs import ensure as ensure_conditioning

    built = ensure_conditioning(name, root, ensure_builtin)
    if built is not None:
        return built
    raise ValueError(f"unknown builtin {name!r}")


def build_tiny_safety_checker(
    dest: str | os.PathLike[str], threshold: float = 1.0, seed: int = SEED + 30
) -> Path:
    """A ``StableDiffusionSafetyChecker`` with a tiny random CLIP vision tower and random
    concept embeddings; an image is flagged when its cosine similarity to a concept
    exceeds ``threshold`` (1.0: never; -1.0: always). Plus its image-processor config."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    dest = Path(dest)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 1,
            "projection_dim": 32,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StableDiffusionSafetyChecker(config)
        with torch.no_grad():
            model.concept_embeds.copy_(torch.randn(17, 32))
            model.special_care_embeds.copy_(torch.randn(3, 32))
            model.concept_embeds_weights.fill_(threshold)
            model.special_care_embeds_weights.fill_(1.0)  # never: no adjustment
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return save_pretrained(model, dest, processor)


def build_tiny_sdxl_edm(dest: str | os.PathLike[str]) -> Path:
    """tiny-sdxl with Playground v2.5's EDM scheduler config and VAE latent statistics
    (``latents_mean``/``latents_std``): what tests train the EDM way on."""
    import json
    import shutil
    import tempfile

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-sdxl-edm-", dir=dest.parent))
    try:
        build_tiny_sdxl(tmp / "m")
        model = tmp / "m"
        (model / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(
                {
                    "_class_name": "EDMDPMSolverMultistepScheduler",
                    "algorithm_type": "dpmsolver++",
                    "dynamic_thresholding_ratio": 0.995,
                    "euler_at_final": False,
                    "final_sigmas_type": "zero",
                    "lower_order_final": True,
                    "num_train_timesteps": 1000,
                    "prediction_type": "epsilon",
                    "rho": 7.0,
                    "sample_max_value": 1.0,
                    "sigma_data": 0.5,
                    "sigma_max": 80.0,
                    "sigma_min": 0.002,
                    "solver_order": 2,
                    "solver_type": "midpoint",
                    "thresholding": False,
                },
                indent=2,
            )
        )
        vae_config = model / "vae" / "config.json"
        config = json.loads(vae_config.read_text())
        config.update(
            latents_mean=[-1.6574, 1.886, -1.383, 2.5155],
            latents_std=[8.4927, 5.9022, 6.5498, 5.2299],
        )
        vae_config.write_text(json.dumps(config, indent=2))
        shutil.rmtree(dest, ignore_errors=True)
        model.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
