"""ControlNets and IP-Adapter references on tiny-flux, in this process: the worker's
conditioning code (worker/generation/conditioning.py) against bare diffusers, given the
same inputs and seed. SDXL's and SD 1.5's are in test_conditioning.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conditioning import Loaded, control_image, entry, generate, reference_image
from tests.helpers import mask_image


def test_flux_control_equals_bare_diffusers(models_dir: Path, one_thread: None) -> None:
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline

    flux = Loaded("tiny-flux", models_dir)
    ctrl, init = control_image(), Image.new("RGB", (64, 64), (20, 90, 160))
    net = entry("tiny-flux-canny")
    base = flux.run()
    controlled = flux.run(control=[net], control_images=[ctrl])
    two = flux.run(control=[net, {**net, "scale": 0.5}], control_images=[ctrl, ctrl])
    assert type(flux.last_pipe.controlnet).__name__ == "FluxMultiControlNetModel"
    plain_i2i = flux.run(1, image=init, strength=0.7)
    i2i = flux.run(1, control=[net], control_images=[ctrl], image=init, strength=0.7)
    assert type(flux.last_pipe).__name__ == "FluxControlNetImg2ImgPipeline"
    inpaint = flux.run(
        2, control=[net], control_images=[ctrl], image=init, strength=0.7, mask_image=mask_image()
    )
    assert type(flux.last_pipe).__name__ == "FluxControlNetInpaintPipeline"
    assert inpaint.shape == (64, 64, 3) and inpaint.tobytes() != i2i.tobytes()
    assert len({base.tobytes(), controlled.tobytes(), two.tobytes()}) == 3
    assert i2i.tobytes() != plain_i2i.tobytes()
    bare = FluxPipeline.from_pretrained(str(models_dir / "tiny-flux"), use_safetensors=True)
    cnet = FluxControlNetModel.from_pretrained(
        str(models_dir / "tiny-flux-controlnet"), use_safetensors=True
    )
    cpipe = FluxControlNetPipeline.from_pipe(bare, controlnet=cnet)
    cpipe.set_progress_bar_config(disable=True)
    assert (
        generate(
            cpipe, control_image=ctrl, guidance_scale=0.0, controlnet_conditioning_scale=1.0
        ).tobytes()
        == controlled.tobytes()
    )


@pytest.fixture(scope="module")
def flux(models_dir: Path, one_thread: None) -> Loaded:
    return Loaded("tiny-flux", models_dir)


def bare_flux(models_dir: Path, adapters: int) -> Any:
    """tiny-flux through diffusers alone, its IP-Adapter loaded ``adapters`` times from
    the same file, the documented way."""
    import torch
    from diffusers import FluxPipeline

    bare = FluxPipeline.from_pretrained(str(models_dir / "tiny-flux"), use_safetensors=True)
    bare.set_progress_bar_config(disable=True)
    folder = models_dir / "tiny-flux-ip-adapter"
    bare.load_ip_adapter(
        str(folder),
        weight_name=["ip_adapter.safetensors"] * adapters,
        image_encoder_pretrained_model_name_or_path=str(folder / "image_encoder"),
        image_encoder_dtype=torch.float32,
    )
    return bare


def test_flux_references_equal_bare_diffusers_and_leave_nothing(
    flux: Loaded, models_dir: Path
) -> None:
    ref = reference_image()
    transformer = flux.model.pipe.transformer
    processors = dict(transformer.attn_processors)
    base = flux.run()
    one = flux.run(refs=[{"scale": 0.6, "mode": "full"}], ref_images=[ref])
    assert one.tobytes() != base.tobytes()
    after = flux.run()
    assert after.tobytes() == base.tobytes()  # detached: the job after has the base pixels
    assert dict(transformer.attn_processors) == processors
    assert transformer.encoder_hid_proj is None
    assert transformer.config.encoder_hid_dim_type is None
    assert flux.model.pipe.image_encoder is None and flux.model.pipe.feature_extractor is None
    assert flux.cond.ip_adapters.loads == 1
    # scale 0 adds the adapter's attention times 0: the base pixels
    zero = flux.run(refs=[{"scale": 0.0, "mode": "full"}], ref_images=[ref])
    assert zero.tobytes() == base.tobytes()
    bare = bare_flux(models_dir, 1)
    bare.set_ip_adapter_scale(0.6)
    assert generate(bare, ip_adapter_image=ref, guidance_scale=0.0).tobytes() == one.tobytes()
    assert bare.image_encoder.dtype == flux.model.pipe.transformer.dtype


def test_flux_several_references_are_adapters_sharing_one_set_of_weights(
    flux: Loaded, models_dir: Path
) -> None:
    from worker.generation.conditioning import canny

    refs: list[dict[str, Any]] = [{"scale": 0.6, "mode": "full"}, {"scale": 1.0, "mode": "full"}]
    images = [reference_image(), canny(control_image())]
    two = flux.run(refs=refs, ref_images=images)
    single = flux.run(refs=refs[:1], ref_images=images[:1])
    assert two.tobytes() != single.tobytes()
    # what diffusers computes with the adapter loaded twice, each with its own scale
    bare = bare_flux(models_dir, 2)
    bare.set_ip_adapter_scale([0.6, 1.0])
    assert generate(bare, ip_adapter_image=images, guidance_scale=0.0).tobytes() == two.tobytes()
    # while attached: two adapters made of the one loaded set of modules, no copy
    model, pipe = flux.model, flux.model.pipe
    params = sum(p.numel() for p in pipe.transformer.parameters())
    flux.cond.ip_adapters.attach(model, pipe, refs, images)
    try:
        proc = pipe.transformer.attn_processors["transformer_blocks.0.attn.processor"]
        assert proc.to_k_ip[0] is proc.to_k_ip[1] and proc.to_v_ip[0] is proc.to_v_ip[1]
        assert proc.scale == [0.6, 1.0]
        layers = pipe.transformer.encoder_hid_proj.image_projection_layers
        assert len(layers) == 2 and layers[0] is layers[1]
        attached = sum(p.numel() for p in pipe.transformer.parameters())
    finally:
        flux.cond.ip_adapters.detach(model, pipe)
    per_adapter = sum(p.numel() for p in proc.parameters()) + sum(
        p.numel() for p in layers[0].parameters()
    )
    assert attached == params + per_adapter  # one set, however many references
    assert len(proc.to_k_ip) == 1 and proc.scale == [1.0]  # the loaded adapter again
    assert flux.run().tobytes() == flux.run().tobytes()


def test_flux_references_with_img2img_inpainting_and_control(flux: Loaded) -> None:
    from producer.core.errors import InternalError

    ref, ctrl = reference_image(), control_image()
    init = Image.new("RGB", (64, 64), (20, 90, 160))
    refs: list[dict[str, Any]] = [{"scale": 1.0, "mode": "full"}]
    cases: list[tuple[int, dict[str, Any], str]] = [
        (1, {"image": init, "strength": 0.7}, "FluxImg2ImgPipeline"),
        (2, {"image": init, "strength": 0.7, "mask_image": mask_image()}, "FluxInpaintPipeline"),
    ]
    for task, extra, name in cases:
        plain = flux.run(task, **extra)
        referenced = flux.run(task, refs=refs, ref_images=[ref], **extra)
        assert type(flux.last_pipe).__name__ == name
        assert referenced.tobytes() != plain.tobytes(), name
    net = [entry("tiny-flux-canny")]
    controlled = flux.run(control=net, control_images=[ctrl])
    both = flux.run(control=net, control_images=[ctrl], refs=refs, ref_images=[ref])
    assert type(flux.last_pipe).__name__ == "FluxControlNetPipeline"
    assert both.tobytes() != controlled.tobytes()
    # Flux's ControlNet img2img pipeline takes no ip_adapter_image: refused, not ignored
    # (the producer refuses such a job at submit)
    with pytest.raises(InternalError, match=r"^references: FluxControlNetImg2ImgPipeline"):
        flux.run(
            1,
            control=net,
            control_images=[ctrl],
            refs=refs,
            ref_images=[ref],
            image=init,
            strength=0.7,
        )
    flux.run(1, control=net, control_images=[ctrl], image=init, strength=0.7)
    assert not hasattr(flux.last_pipe, "image_encoder")  # nothing registered on it
    with pytest.raises(InternalError, match=r"^references\.0\.mode: Flux takes mode full"):
        flux.run(refs=[{"scale": 1.0, "mode": "style"}], ref_images=[ref])
    assert flux.model.pipe.transformer.encoder_hid_proj is None
    assert flux.run(control=net, control_images=[ctrl]).tobytes() == controlled.tobytes()
