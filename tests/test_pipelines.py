"""Model loading plumbing on the CPU: device and dtype settings, schedulers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from producer.core.registry import Registry
from producer.core.settings import Settings
from worker.diffusion.pipelines import SCHEDULERS, load_model, resolve_device, resolve_dtype


def test_device_setting() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cpu", torch.float32),  # half precision is slow or missing on CPUs
        ("auto", "cuda", torch.float16),  # the model's dtype
        ("bf16", "cuda", torch.bfloat16),
        ("fp16", "cpu", torch.float16),  # an explicit setting wins
        ("fp32", "cuda", torch.float32),
    ],
)
def test_dtype_setting(setting: str, device: str, expected: torch.dtype) -> None:
    spec = Registry.load()["playground-v2.5"]
    assert resolve_dtype(setting, spec, device) == expected


def test_every_registry_scheduler_builds_from_its_model_family() -> None:
    # The classes from their own modules: mypy reads ``diffusers.X`` as the dummy
    # object diffusers' __init__ declares for installs without torch.
    import diffusers
    from diffusers.schedulers.scheduling_edm_dpmsolver_multistep import (
        EDMDPMSolverMultistepScheduler,
    )
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
        EulerAncestralDiscreteScheduler,
    )
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )
    from diffusers.schedulers.scheduling_pndm import PNDMScheduler

    # Base configs of the two families: epsilon-prediction SDXL and EDM (Playground).
    bases = {
        "playground-v2.5": EDMDPMSolverMultistepScheduler().config,
        "sdxl-turbo": EulerAncestralDiscreteScheduler(timestep_spacing="trailing").config,
    }
    # ... and of the other families, epsilon-prediction SD and flow-matching Flux.
    families = {
        "sdxl": EulerDiscreteScheduler().config,
        "sd15": PNDMScheduler().config,
        "flux": FlowMatchEulerDiscreteScheduler(shift=1.0).config,
    }
    for spec in Registry.load():
        for name in spec.schedulers:
            cls_name, _ = SCHEDULERS[name]
            base = bases.get(spec.name, families[spec.pipeline])
            sched = getattr(diffusers, cls_name).from_config(base, **SCHEDULERS[name][1])
            sched.set_timesteps(4)
            assert len(sched.timesteps) >= 4, (spec.name, name)
        # Playground v2.5 is EDM-trained: only EDM schedulers may be chosen for it.
        if spec.name == "playground-v2.5":
            assert all(n.startswith("edm_") for n in spec.schedulers)


def test_bf16_loads_and_generates(models_dir: Path) -> None:
    settings = Settings(models_dir=str(models_dir), dtype="bf16")
    model = load_model(Registry.load()["tiny-sdxl"], settings, "cpu")
    assert model.pipe.unet.dtype == torch.bfloat16
    assert model.img2img.unet is model.pipe.unet  # shared, not copied
    assert model.inpaint.unet is model.pipe.unet and model.inpaint.unet.dtype == torch.bfloat16
    assert model.source["dtype"] == "bfloat16"
    assert set(model.source["weights"]) >= {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    with torch.inference_mode():
        image = model.pipe(
            prompt="x",
            num_inference_steps=1,
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(0),
        ).images[0]
    assert image.size == (64, 64)
