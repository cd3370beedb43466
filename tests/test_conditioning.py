"""ControlNets and IP-Adapter references, in this process on the tiny models: the
worker's conditioning code (worker/generation/conditioning.py) against bare diffusers,
given the same inputs and seed, for SDXL and SD 1.5 (Flux's are in
test_conditioning_flux.py). The worker subprocess path is in test_references_jobs.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conditioning import Loaded, control_image, entry, generate, reference_image
from tests.helpers import mask_image


@pytest.fixture(scope="module")
def sdxl(models_dir: Path, one_thread: None) -> Loaded:
    return Loaded("tiny-sdxl", models_dir)


def test_control_equals_bare_diffusers_and_shares_the_base_modules(
    sdxl: Loaded, models_dir: Path
) -> None:
    from diffusers import (
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    ctrl = control_image()
    base = sdxl.run()
    controlled = sdxl.run(control=[entry()], control_images=[ctrl])
    pipe, model = sdxl.last_pipe, sdxl.model.pipe
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer"):
        assert getattr(pipe, name) is getattr(model, name), name  # no second copy
    assert sdxl.run(control=[entry(scale=0.0)], control_images=[ctrl]).tobytes() == base.tobytes()
    assert controlled.tobytes() != base.tobytes()
    # the same inputs through diffusers alone
    bare = StableDiffusionXLPipeline.from_pretrained(
        str(models_dir / "tiny-sdxl"), use_safetensors=True
    )
    net = ControlNetModel.from_pretrained(
        str(models_dir / "tiny-sdxl-controlnet"), use_safetensors=True
    )
    cpipe = StableDiffusionXLControlNetPipeline.from_pipe(bare, controlnet=net)
    cpipe.scheduler = EulerDiscreteScheduler.from_config(cpipe.scheduler.config)
    cpipe.set_progress_bar_config(disable=True)
    assert (
        generate(cpipe, image=ctrl, guidance_scale=5.0, controlnet_conditioning_scale=1.0).tobytes()
        == controlled.tobytes()
    )
    # loaded once: the later jobs took it, and its pipeline, from the caches
    assert sdxl.cond.controlnets.loads == 1
    sdxl.run(control=[entry()], control_images=[ctrl])
    assert sdxl.last_pipe is pipe


def test_controlnet_cache_keeps_within_its_budget(sdxl: Loaded) -> None:
    from worker.generation.conditioning import _nbytes

    nets = sdxl.cond.controlnets
    ctrl = control_image()
    first = sdxl.run(control=[entry()], control_images=[ctrl])
    size = _nbytes(nets.get("tiny-sdxl-canny", "cpu", sdxl.model.dtype, "x"))
    budget, nets.cache.max_bytes = nets.cache.max_bytes, size  # room for one
    try:
        sdxl.run(control=[entry("tiny-sdxl-depth")], control_images=[ctrl])
        assert [n.split("|")[0] for n in nets.cached_names()] == ["tiny-sdxl-depth"]
        assert all(k[2][0].startswith("tiny-sdxl-depth") for k in sdxl.cond._pipes)
        loads = nets.loads
        again = sdxl.run(control=[entry()], control_images=[ctrl])  # loaded again
        assert nets.loads == loads + 1 and again.tobytes() == first.tobytes()
    finally:
        nets.cache.max_bytes = budget


def test_two_controlnets_and_the_guidance_window(sdxl: Loaded) -> None:
    from worker.generation.conditioning import canny

    ctrl = control_image()
    one = sdxl.run(control=[entry()], control_images=[ctrl])
    two = sdxl.run(
        control=[entry(), entry("tiny-sdxl-depth", scale=0.8)], control_images=[ctrl, canny(ctrl)]
    )
    assert type(sdxl.last_pipe.controlnet).__name__ == "MultiControlNetModel"
    assert two.tobytes() != one.tobytes()
    late = sdxl.run(control=[entry(start=0.5)], control_images=[ctrl])
    assert late.tobytes() not in (one.tobytes(), sdxl.run().tobytes())
    assert sdxl.cond.controlnets.cached_names()[-1].startswith("tiny-sdxl-canny|")


def test_control_with_img2img_and_inpainting(sdxl: Loaded) -> None:
    init = Image.new("RGB", (64, 64), (20, 90, 160))
    ctrl = control_image()
    cases: list[tuple[int, dict[str, Any]]] = [
        (1, {"image": init, "strength": 0.7}),
        (2, {"image": init, "strength": 0.7, "mask_image": mask_image()}),
    ]
    for task, extra in cases:
        plain = sdxl.run(task, **extra)
        controlled = sdxl.run(task, control=[entry()], control_images=[ctrl], **extra)
        name = type(sdxl.last_pipe).__name__
        assert name == (
            "StableDiffusionXLControlNetImg2ImgPipeline"
            if task == 1
            else "StableDiffusionXLControlNetInpaintPipeline"
        )
        assert controlled.shape == (64, 64, 3)
        assert controlled.tobytes() != plain.tobytes()


def test_canny_is_opencv_and_deterministic() -> None:
    import cv2

    from worker.generation.conditioning import canny

    img = control_image()
    edges = canny(img)
    assert edges.tobytes() == canny(img).tobytes()
    assert edges.mode == "RGB" and edges.size == img.size
    want = cv2.Canny(np.asarray(img.convert("L")), 100, 200)
    assert (np.asarray(edges)[..., 0] == want).all()
    assert 0 < (want > 0).mean() < 1  # edges found, not everything


def test_mode_scales_are_instantstyle_layers(sdxl: Loaded) -> None:
    from types import SimpleNamespace

    from worker.generation.conditioning import mode_scale

    unet = sdxl.model.pipe.unet.config
    assert mode_scale(unet, "full", 0.6) == 0.6
    assert mode_scale(unet, "style", 0.6) == {"up": {"block_0": [0.0, 0.6, 0.0]}}
    assert mode_scale(unet, "subject", 0.6) == {"down": {"block_1": [0.0, 0.6]}}  # tiny
    real_sdxl = SimpleNamespace(  # SDXL base's blocks: InstantStyle's published layers
        layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    )
    assert mode_scale(real_sdxl, "style", 1.0) == {"up": {"block_0": [0.0, 1.0, 0.0]}}
    assert mode_scale(real_sdxl, "subject", 1.0) == {"down": {"block_2": [0.0, 1.0]}}


def test_references_equal_bare_diffusers_and_leave_nothing(sdxl: Loaded, models_dir: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from worker.generation.conditioning import mode_scale

    ref = reference_image()
    processors = dict(sdxl.model.pipe.unet.attn_processors)
    base = sdxl.run()
    full = sdxl.run(refs=[{"scale": 0.6, "mode": "full"}], ref_images=[ref])
    style = sdxl.run(refs=[{"scale": 0.6, "mode": "style"}], ref_images=[ref])
    subject = sdxl.run(refs=[{"scale": 0.6, "mode": "subject"}], ref_images=[ref])
    assert len({base.tobytes(), full.tobytes(), style.tobytes(), subject.tobytes()}) == 4
    after = sdxl.run()
    assert after.tobytes() == base.tobytes()  # detached: the job after has the base pixels
    unet = sdxl.model.pipe.unet
    assert dict(unet.attn_processors) == processors and unet.encoder_hid_proj is None
    assert sdxl.model.pipe.image_encoder is None
    assert sdxl.cond.ip_adapters.loads == 1  # loaded once, attached per job
    # diffusers alone, with the same adapter loaded the documented way
    bare = StableDiffusionXLPipeline.from_pretrained(
        str(models_dir / "tiny-sdxl"), use_safetensors=True
    )
    bare.scheduler = EulerDiscreteScheduler.from_config(bare.scheduler.config)
    bare.set_progress_bar_config(disable=True)
    bare.load_ip_adapter(
        str(models_dir / "tiny-sdxl-ip-adapter"), subfolder="", weight_name="ip-adapter.safetensors"
    )
    for mode, got in (("full", full), ("style", style)):
        bare.set_ip_adapter_scale(mode_scale(bare.unet.config, mode, 0.6))
        assert (
            generate(bare, ip_adapter_image=ref, guidance_scale=5.0).tobytes() == got.tobytes()
        ), mode
    # scale 0 skips the adapter's attention: checked, the base pixels on this CPU
    zero = sdxl.run(refs=[{"scale": 0.0, "mode": "full"}], ref_images=[ref])
    assert zero.tobytes() == base.tobytes()


def test_several_references_are_one_adapter_per_image(sdxl: Loaded, models_dir: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from worker.generation.conditioning import canny, mode_scale

    refs: list[dict[str, Any]] = [{"scale": 0.6, "mode": "full"}, {"scale": 1.0, "mode": "style"}]
    images = [reference_image(), canny(control_image())]
    got = sdxl.run(refs=refs, ref_images=images)
    single = sdxl.run(refs=refs[:1], ref_images=images[:1])
    assert got.tobytes() != single.tobytes()
    # what the same adapter loaded once per image computes, each with its own scale
    bare = StableDiffusionXLPipeline.from_pretrained(
        str(models_dir / "tiny-sdxl"), use_safetensors=True
    )
    bare.scheduler = EulerDiscreteScheduler.from_config(bare.scheduler.config)
    bare.set_progress_bar_config(disable=True)
    bare.load_ip_adapter(
        str(models_dir / "tiny-sdxl-ip-adapter"),
        subfolder="",
        weight_name=["ip-adapter.safetensors"] * 2,
    )
    bare.set_ip_adapter_scale([mode_scale(bare.unet.config, r["mode"], r["scale"]) for r in refs])
    want = generate(bare, ip_adapter_image=images, guidance_scale=5.0)
    # the images are encoded as one batch here, one by one there: the same up to rounding
    assert np.abs(want.astype(int) - got.astype(int)).max() <= 1


def test_sd15_control_and_references_equal_bare_diffusers(
    models_dir: Path, one_thread: None
) -> None:
    from diffusers import (
        ControlNetModel,
        DPMSolverMultistepScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    sd15 = Loaded("tiny-sd15", models_dir)
    ctrl, ref = control_image(), reference_image()
    controlled = sd15.run(control=[entry("tiny-sd15-canny")], control_images=[ctrl])
    referenced = sd15.run(refs=[{"scale": 0.8, "mode": "subject"}], ref_images=[ref])
    base = sd15.run()
    assert len({controlled.tobytes(), referenced.tobytes(), base.tobytes()}) == 3
    bare = StableDiffusionPipeline.from_pretrained(
        str(models_dir / "tiny-sd15"),
        use_safetensors=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    net = ControlNetModel.from_pretrained(
        str(models_dir / "tiny-sd15-controlnet"), use_safetensors=True
    )
    cpipe = StableDiffusionControlNetPipeline.from_pipe(bare, controlnet=net)
    for p in (bare, cpipe):
        p.scheduler = DPMSolverMultistepScheduler.from_config(
            p.scheduler.config, use_karras_sigmas=True
        )
        p.set_progress_bar_config(disable=True)
    assert (
        generate(cpipe, image=ctrl, guidance_scale=7.5, controlnet_conditioning_scale=1.0).tobytes()
        == controlled.tobytes()
    )
    bare.load_ip_adapter(
        str(models_dir / "tiny-sd15-ip-adapter"), subfolder="", weight_name="ip-adapter.safetensors"
    )
    bare.set_ip_adapter_scale({"down": {"block_1": [0.0, 0.8]}})
    assert (
        generate(bare, ip_adapter_image=ref, guidance_scale=7.5).tobytes() == referenced.tobytes()
    )


def test_an_adapter_that_does_not_load_leaves_nothing(sdxl: Loaded, tmp_path: Path) -> None:
    from dataclasses import replace

    from producer.core.adapters import IpAdapterSpec
    from producer.core.errors import InternalError

    model, spec = sdxl.model, sdxl.model.spec
    unet = model.pipe.unet
    processors = dict(unet.attn_processors)
    model.spec = replace(
        spec,
        name="tiny-broken",
        ip_adapter=IpAdapterSpec(source=str(tmp_path), weight_name="missing.safetensors"),
    )
    try:
        with pytest.raises(InternalError, match=r"^references: the IP-Adapter of tiny-broken"):
            sdxl.cond.ip_adapters.attach(
                model, model.pipe, [{"scale": 1.0, "mode": "full"}], [reference_image()]
            )
    finally:
        model.spec = spec
    assert dict(unet.attn_processors) == processors and unet.encoder_hid_proj is None
