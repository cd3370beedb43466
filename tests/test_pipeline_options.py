"""GPU-ready pipeline options (``[models.NAME.options]``): validated by the registry,
applied by ``load_model``, checked one by one on the CPU with tiny-sdxl.

What the CPU cannot show is said where it matters: speed, CUDA kernels, and model CPU
offload onto a real accelerator (its hooks are installed and run here with the CPU
standing in for the device).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from producer.core.pipeline_options import PipelineOptions
from producer.core.registry import Registry
from producer.core.settings import Settings
from worker.diffusion.pipelines import LoadedModel, apply_options, load_model, place, warm_up


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return str(path)


def options_file(tmp_path: Path, table: str) -> str:
    """A registry file whose one model has ``table`` as its options."""
    return write(
        tmp_path,
        f"""
[models."my-sdxl"]
source = "/srv/my-sdxl"
[models."my-sdxl".options]
{table}
""",
    )


# -- validation -------------------------------------------------------------------------


def test_builtin_entries_use_stock_options() -> None:
    for spec in Registry.load():
        assert isinstance(spec.options, PipelineOptions)
    assert Registry.load()["tiny-sdxl"].options == PipelineOptions()


def test_options_parse(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[models."my-sdxl"]
source = "/srv/my-sdxl"
[models."my-sdxl".options]
channels_last = true
fuse_qkv = true
compile = "max-autotune-no-cudagraphs"
compile_fullgraph = true
vae_upcast = false
vae_slicing = true
""",
    )
    spec = Registry.load(path)["my-sdxl"]
    assert spec.options == PipelineOptions(
        channels_last=True,
        fuse_qkv=True,
        compile="max-autotune-no-cudagraphs",
        compile_fullgraph=True,
        vae_upcast=False,
        vae_slicing=True,
    )
    assert spec.options.active()["compile"] == "max-autotune-no-cudagraphs"


def test_options_override_merges_with_the_builtin_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import producer.core.registry as registry

    # A built-in entry with options of its own: an override adds to them key by key.
    text = Path(registry.__file__).with_name("models.toml").read_text()
    text += '\n[models."tiny-sdxl".options]\nvae_slicing = true\n'
    monkeypatch.setattr(registry, "_builtin_text", lambda: text)
    path = write(
        tmp_path,
        """
[models."tiny-sdxl".options]
vae_tiling = true
""",
    )
    spec = Registry.load(path)["tiny-sdxl"]
    assert spec.options.active() == {"vae_tiling": True, "vae_slicing": True}
    assert Registry.load()["tiny-sdxl"].options.active() == {"vae_slicing": True}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("flash = true", "unknown options ['flash']"),
        ("channels_last = 1", "options.channels_last must be a bool"),
        ('vae_tiling = "yes"', "options.vae_tiling must be a bool"),
        ("attention_slicing = true", "options.attention_slicing must be a str or int"),
        ("attention_slicing = 0", "options.attention_slicing must be off, auto, max"),
        ('attention_slicing = "some"', "options.attention_slicing must be off, auto, max"),
        ('compile = "reduce-overhead"', "options.compile must be one of"),
        ('attention = "flash"', "options.attention must be one of"),
        ('compile_backend = ""', "options.compile_backend must not be empty"),
    ],
)
def test_bad_options_are_refused_by_name(tmp_path: Path, table: str, message: str) -> None:
    path = options_file(tmp_path, table)
    with pytest.raises(ValueError, match="model 'my-sdxl'") as exc:
        Registry.load(path)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('fuse_qkv = true\nattention = "eager"', "options.fuse_qkv needs attention"),
        ('fuse_qkv = true\nattention_slicing = "auto"', "exclude each other"),
        ('cpu_offload = true\ncompile = "default"', "options.cpu_offload and options.compile"),
    ],
)
def test_conflicting_options_are_refused(tmp_path: Path, table: str, message: str) -> None:
    path = options_file(tmp_path, table)
    with pytest.raises(ValueError, match=message):
        Registry.load(path)


def test_options_must_be_a_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[models."my-sdxl"]
source = "/srv/my-sdxl"
options = "fast"
""",
    )
    with pytest.raises(ValueError, match="wrong type for \\['options'\\]"):
        Registry.load(path)


def test_simulated_entries(tmp_path: Path) -> None:
    ok = write(
        tmp_path,
        """
[models."sim"]
pipeline = "simulated"
source = "builtin:simulated"
gpu_ms = 300
width = 1024
height = 1024
""",
    )
    spec = Registry.load(ok)["sim"]
    assert spec.pipeline == "simulated" and spec.gpu_ms == 300.0
    for body, message in [
        ('pipeline = "simulated"\nsource = "/x"', 'needs source = "builtin:simulated"'),
        ('pipeline = "simulated"\nsource = "builtin:simulated"\ngpu_ms = -1', "gpu_ms must be"),
        ('source = "/x"\ngpu_ms = 5', "gpu_ms applies to simulated pipelines only"),
        (
            'pipeline = "simulated"\nsource = "builtin:simulated"\n'
            '[models."bad".options]\nvae_tiling = true',
            "options apply to sdxl pipelines",
        ),
    ]:
        path = write(tmp_path, f'[models."bad"]\n{body}\n')
        with pytest.raises(ValueError, match="model 'bad'") as exc:
            Registry.load(path)
        assert message in str(exc.value)


# -- applied, and a tiny generation runs ------------------------------------------------


def load(models_dir: Path, dtype: str = "auto", **options: Any) -> LoadedModel:
    spec = replace(Registry.load()["tiny-sdxl"], options=PipelineOptions(**options))
    return load_model(spec, Settings(models_dir=str(models_dir), dtype=dtype), "cpu")


def generate(pipe: Any, size: int = 64, n: int = 1, output_type: str = "pil") -> Any:
    with torch.inference_mode():
        out = pipe(
            prompt="a lighthouse",
            num_inference_steps=2,
            width=size,
            height=size,
            num_images_per_prompt=n,
            output_type=output_type,
            generator=torch.Generator("cpu").manual_seed(3),
        )
    return out.images


def count_calls(module: torch.nn.Module) -> list[torch.Size]:
    calls: list[torch.Size] = []
    module.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape))
    return calls


def processors(model: LoadedModel) -> set[str]:
    return {type(p).__name__ for p in model.pipe.unet.attn_processors.values()}


def test_stock_options_are_sdpa(models_dir: Path) -> None:
    model = load(models_dir)
    assert processors(model) == {"AttnProcessor2_0"}
    assert model.source["options"] == {}
    assert generate(model.pipe)[0].size == (64, 64)


def test_eager_attention(models_dir: Path) -> None:
    model = load(models_dir, attention="eager")
    assert processors(model) == {"AttnProcessor"}
    assert {type(p).__name__ for p in model.pipe.vae.attn_processors.values()} == {"AttnProcessor"}
    assert model.source["options"] == {"attention": "eager"}
    # The same maths as SDPA: the same picture, to float tolerance.
    ref = generate(load(models_dir).pipe, output_type="np")
    assert np.allclose(generate(model.pipe, output_type="np"), ref, atol=1e-3)


def test_channels_last(models_dir: Path) -> None:
    model = load(models_dir, channels_last=True)
    for module in (model.pipe.unet.conv_in, model.pipe.vae.decoder.conv_in):
        assert module.weight.is_contiguous(memory_format=torch.channels_last)
    stock = load(models_dir)
    assert not stock.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.allclose(
        generate(model.pipe, output_type="np"), generate(stock.pipe, output_type="np"), atol=1e-3
    )


def test_fused_qkv(models_dir: Path) -> None:
    model = load(models_dir, fuse_qkv=True)
    assert processors(model) == {"FusedAttnProcessor2_0"}
    attn = next(m for n, m in model.pipe.unet.named_modules() if n.endswith("attn1"))
    assert attn.fused_projections and hasattr(attn, "to_qkv")
    assert model.img2img.unet is model.pipe.unet  # img2img runs fused too
    assert np.allclose(
        generate(model.pipe, output_type="np"),
        generate(load(models_dir).pipe, output_type="np"),
        atol=1e-3,
    )


def test_attention_slicing(models_dir: Path) -> None:
    model = load(models_dir, attention_slicing="max")
    assert processors(model) == {"SlicedAttnProcessor"}
    assert {p.slice_size for p in model.pipe.unet.attn_processors.values()} == {1}
    assert generate(model.pipe)[0].size == (64, 64)


def test_vae_tiling(models_dir: Path) -> None:
    # tiny-sdxl's VAE tiles latents above 64²: a 144 px image decodes in tiles.
    model = load(models_dir, vae_tiling=True)
    assert model.pipe.vae.use_tiling is True
    calls = count_calls(model.pipe.vae.decoder)
    assert generate(model.pipe, size=144)[0].size == (144, 144)
    assert len(calls) > 1 and all(c[-1] <= 64 for c in calls)
    stock = load(models_dir)
    stock_calls = count_calls(stock.pipe.vae.decoder)
    generate(stock.pipe, size=144)
    assert len(stock_calls) == 1


def test_vae_slicing(models_dir: Path) -> None:
    model = load(models_dir, vae_slicing=True)
    assert model.pipe.vae.use_slicing is True
    calls = count_calls(model.pipe.vae.decoder)
    assert len(generate(model.pipe, n=2)) == 2
    assert [c[0] for c in calls] == [1, 1]  # one image per decode


@pytest.mark.parametrize("upcast", [True, False])
def test_vae_upcast_in_fp16(models_dir: Path, upcast: bool) -> None:
    model = load(models_dir, dtype="fp16", vae_upcast=upcast)
    assert model.pipe.vae.config.force_upcast is upcast
    seen: list[torch.dtype] = []
    model.pipe.vae.post_quant_conv.register_forward_pre_hook(
        lambda m, args: seen.append(m.weight.dtype)
    )
    assert generate(model.pipe)[0].size == (64, 64)
    assert seen == [torch.float32 if upcast else torch.float16]
    assert model.pipe.vae.dtype == torch.float16  # cast back after decoding


def test_compile_warms_before_jobs_and_serves_other_threads(models_dir: Path) -> None:
    from torch._dynamo.utils import counters

    # The eager backend traces the UNet exactly as inductor would (fullgraph: no graph
    # break allowed) without generating kernels, which takes minutes on this CPU.
    torch._dynamo.reset()
    counters.clear()
    model = load(models_dir, compile="default", compile_backend="eager", compile_fullgraph=True)
    assert model.pipe.unet._compiled_call_impl is not None
    assert model.img2img.unet is model.pipe.unet
    assert counters["stats"]["unique_graphs"] == 0  # compiled lazily…
    warm_up(model)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # …by the warm-up, before any job
    out: list[Any] = []
    # Jobs run on the worker pool's threads: no recompilation there.
    thread = threading.Thread(target=lambda: out.extend(generate(model.pipe)))
    thread.start()
    thread.join()
    assert out[0].size == (64, 64)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_cpu_offload_is_refused_without_cuda(models_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"options\.cpu_offload needs a CUDA device"):
        load(models_dir, cpu_offload=True)


def test_cpu_offload_hooks(models_dir: Path) -> None:
    """Not verified on a GPU: here the hooks are installed with the CPU as the
    'accelerator', and a text-to-image and an img2img generation run through them."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    opts = PipelineOptions(cpu_offload=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(models_dir / "tiny-sdxl"), use_safetensors=True
    )
    apply_options(pipe, opts)
    place(pipe, opts, "cpu")
    assert len(pipe._all_hooks) >= 4
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert hasattr(getattr(pipe, name), "_hf_hook"), name
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    place(img2img, opts, "cpu")
    assert len(img2img._all_hooks) >= 4
    image = generate(pipe)[0]
    with torch.inference_mode():
        out = img2img(
            prompt="x",
            image=image,
            strength=0.5,
            num_inference_steps=2,
            generator=torch.Generator("cpu").manual_seed(0),
        ).images[0]
    assert out.size == (64, 64)
