"""The model registry: built-in entries, MODELS_FILE overrides, refusal of bad entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from producer.core.contract import MAX_STEPS
from producer.core.errors import InvalidRequest
from producer.core.registry import ModelSpec, Registry
from producer.core.settings import Settings
from producer.requests.generate import validate_request
from tests.helpers import data_uri, png


@pytest.fixture
def builtin() -> Registry:
    return Registry.load()


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return str(path)


def test_builtin_names(builtin: Registry) -> None:
    assert builtin.names() == [
        "flux.1-schnell",
        "playground-v2.5",
        "sd-1.5",
        "sdxl-base-1.0",
        "sdxl-turbo",
        "tiny-flux",
        "tiny-sd15",
        "tiny-sdxl",
        "tiny-sdxl-edm",
        "tiny-sdxl-turbo",
    ]
    assert {s.name for s in builtin} == set(builtin.names())
    assert builtin.get("nope") is None
    with pytest.raises(KeyError):
        builtin["nope"]


def test_playground_defaults(builtin: Registry) -> None:
    pg = builtin["playground-v2.5"]
    assert pg.source == "playgroundai/playground-v2.5-1024px-aesthetic"
    assert pg.pipeline == "sdxl"
    assert pg.variant == "fp16"
    assert pg.dtype == "fp16"
    assert pg.scheduler == "edm_dpmpp_2m"
    assert set(pg.schedulers) <= {"edm_dpmpp_2m", "edm_euler"}  # EDM only
    assert pg.scheduler in pg.schedulers
    assert pg.steps == 50
    assert pg.guidance_scale == 3.0
    assert (pg.width, pg.height) == (1024, 1024)
    assert pg.max_pixels >= 1024 * 1024


def test_sdxl_and_tiny(builtin: Registry) -> None:
    sdxl = builtin["sdxl-base-1.0"]
    assert sdxl.source == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (sdxl.width, sdxl.height) == (1024, 1024)
    assert sdxl.vae_source  # fp16-safe VAE
    tiny = builtin["tiny-sdxl"]
    assert tiny.source == "builtin:tiny-sdxl"
    assert tiny.dtype == "fp32"
    assert tiny.width % 8 == 0 and tiny.width <= 128  # small enough for CPU tests
    assert tiny.steps <= 10


def test_public_view(builtin: Registry) -> None:
    pub = builtin["playground-v2.5"].public()
    assert pub["name"] == "playground-v2.5"
    assert pub["defaults"] == {
        "width": 1024,
        "height": 1024,
        "steps": 50,
        "guidance_scale": 3.0,
        "scheduler": "edm_dpmpp_2m",
    }
    assert pub["limits"]["max_pixels"] == builtin["playground-v2.5"].max_pixels
    assert pub["limits"]["max_steps"] == MAX_STEPS  # what the request models allow
    assert "edm_dpmpp_2m" in pub["schedulers"]


def test_models_file_overrides_one_key_and_adds_a_model(tmp_path: Path, builtin: Registry) -> None:
    path = write(
        tmp_path,
        """
[models."playground-v2.5"]
revision = "0123456789abcdef0123456789abcdef01234567"

[models."tiny-sdxl"]
steps = 8

[models."my-sdxl"]
source = "/srv/models/my-sdxl"
scheduler = "ddim"
schedulers = ["ddim", "euler"]
steps = 25
width = 768
height = 1024
""",
    )
    reg = Registry.load(path)
    pg, base = reg["playground-v2.5"], builtin["playground-v2.5"]
    assert pg.revision == "0123456789abcdef0123456789abcdef01234567"
    # Every other key keeps its built-in value.
    assert pg == ModelSpec(**{**base.__dict__, "revision": pg.revision})
    tiny = reg["tiny-sdxl"]
    assert tiny.steps == 8
    assert tiny.source == "builtin:tiny-sdxl" and tiny.max_side == builtin["tiny-sdxl"].max_side
    assert tiny.schedulers == builtin["tiny-sdxl"].schedulers
    mine = reg["my-sdxl"]
    assert mine.source == "/srv/models/my-sdxl"
    assert (mine.width, mine.height, mine.steps) == (768, 1024, 25)
    assert mine.schedulers == ("ddim", "euler") and mine.scheduler == "ddim"
    assert mine.pipeline == "sdxl"  # defaults fill the rest
    assert "my-sdxl" in reg.names() and set(builtin.names()) < set(reg.names())
    # The built-in registry itself is unchanged.
    assert Registry.load()["tiny-sdxl"].steps == builtin["tiny-sdxl"].steps


def test_schedulers_default_to_the_scheduler(tmp_path: Path) -> None:
    reg = Registry.load(
        write(
            tmp_path,
            """
[models.one]
source = "x/one"
scheduler = "unipc"
""",
        )
    )
    assert reg["one"].schedulers == ("unipc",)


BAD = [
    ("unknown-key", 'source = "x/y"\nsampler = "euler"', "sampler"),
    ("no-source", "steps = 20", "source"),
    (
        "scheduler-not-in-schedulers",
        'source = "x/y"\nscheduler = "ddim"\nschedulers = ["euler", "euler_a"]',
        "scheduler",
    ),
    ("unknown-scheduler", 'source = "x/y"\nscheduler = "warp"\nschedulers = ["warp"]', "warp"),
    ("width-not-multiple-of-8", 'source = "x/y"\nwidth = 1004', "width"),
    ("height-below-64", 'source = "x/y"\nheight = 32', "height"),
    ("side-above-max-side", 'source = "x/y"\nwidth = 1024\nmax_side = 512', "max_side"),
    (
        "pixels-above-max",
        'source = "x/y"\nwidth = 1024\nheight = 1024\nmax_pixels = 1000',
        "max_pixels",
    ),
    ("steps-0", 'source = "x/y"\nsteps = 0', "steps"),
    ("bad-pipeline", 'source = "x/y"\npipeline = "sd3"', "pipeline"),
    (
        "flux-with-euler",
        'source = "x/y"\npipeline = "flux"\ncfg = false\nguidance_scale = 0.0\nsize_multiple = 16',
        "euler",
    ),
    ("sdxl-with-flow", 'source = "x/y"\nscheduler = "flow_euler"', "flow_euler"),
    ("no-cfg-with-guidance", 'source = "x/y"\ncfg = false', "cfg"),
    ("cfg-not-bool", 'source = "x/y"\ncfg = 1', "cfg"),
    ("width-not-multiple-of-16", 'source = "x/y"\nsize_multiple = 16\nwidth = 1000', "16"),
    ("size-multiple-7", 'source = "x/y"\nsize_multiple = 7', "size_multiple"),
    ("bad-dtype", 'source = "x/y"\ndtype = "int8"', "dtype"),
    ("guidance-above-30", 'source = "x/y"\nguidance_scale = 31.0', "guidance_scale"),
    ("steps-as-string", 'source = "x/y"\nsteps = "30"', "steps"),
    ("width-as-string", 'source = "x/y"\nwidth = "1024"', "width"),
    ("width-as-float", 'source = "x/y"\nwidth = 1024.0', "width"),
    ("guidance-as-string", 'source = "x/y"\nguidance_scale = "x"', "guidance_scale"),
    ("steps-as-bool", 'source = "x/y"\nsteps = true', "steps"),
    ("schedulers-not-a-list", 'source = "x/y"\nschedulers = "euler"', "schedulers"),
    ("vae-source-not-a-string", 'source = "x/y"\nvae_source = 3', "vae_source"),
]


@pytest.mark.parametrize(("entry", "word"), [pytest.param(e, w, id=i) for i, e, w in BAD])
def test_bad_entry_raises_naming_the_model(tmp_path: Path, entry: str, word: str) -> None:
    path = write(tmp_path, f'[models."broken-model"]\n{entry}\n')
    with pytest.raises(ValueError, match="broken-model") as info:
        Registry.load(path)
    assert word in str(info.value)


def test_new_families_have_validated_defaults(builtin: Registry) -> None:
    sd15, turbo, flux = builtin["sd-1.5"], builtin["sdxl-turbo"], builtin["flux.1-schnell"]
    assert sd15.pipeline == "sd15" and (sd15.width, sd15.height) == (512, 512)
    assert turbo.pipeline == "sdxl" and turbo.steps <= 4 and turbo.guidance_scale == 0
    assert (turbo.width, turbo.height) == (512, 512) and turbo.vae_source
    assert flux.pipeline == "flux" and flux.steps == 4 and flux.guidance_scale == 0
    assert not flux.cfg and flux.size_multiple == 16 and flux.schedulers == ("flow_euler",)
    for real, tiny in (
        ("sd-1.5", "tiny-sd15"),
        ("sdxl-turbo", "tiny-sdxl-turbo"),
        ("flux.1-schnell", "tiny-flux"),
    ):
        r, t = builtin[real], builtin[tiny]
        assert (t.pipeline, t.scheduler, t.cfg) == (r.pipeline, r.scheduler, r.cfg)
        assert t.guidance_scale == r.guidance_scale and t.source.startswith("builtin:")
        assert t.width == 64
    assert builtin.lora("tiny-sdxl-lora") is not None
    assert builtin.lora("tiny-sdxl-lora").family == "sdxl"  # type: ignore[union-attr]


def test_loras_section(tmp_path: Path) -> None:
    reg = Registry.load(
        write(tmp_path, '[loras.style]\nsource = "/l/style.safetensors"\nfamily = "sd15"\n')
    )
    assert reg.lora("style") is not None and "tiny-sdxl-lora" in reg.lora_names()
    for bad, word in (
        ('source = "/l/x.ckpt"\nfamily = "sdxl"', "safetensors"),
        ('source = "/l/x.safetensors"\nfamily = "sd3"', "family"),
        ('source = "/l/x.safetensors"', "family"),
        ('source = "/l/x.safetensors"\nfamily = "sdxl"\nscale = 1', "scale"),
    ):
        with pytest.raises(ValueError, match="lora 'bad'") as info:
            Registry.load(write(tmp_path, f"[loras.bad]\n{bad}\n"))
        assert word in str(info.value)


def test_integer_guidance_is_a_float(tmp_path: Path) -> None:
    reg = Registry.load(write(tmp_path, '[models.one]\nsource = "x/one"\nguidance_scale = 7\n'))
    assert reg["one"].guidance_scale == 7.0
    assert isinstance(reg["one"].guidance_scale, float)


def test_bad_override_of_a_builtin_is_refused(tmp_path: Path) -> None:
    # Playground allows EDM schedulers only: a default outside them is an error.
    path = write(tmp_path, '[models."playground-v2.5"]\nscheduler = "euler"\n')
    with pytest.raises(ValueError, match=r"playground-v2\.5"):
        Registry.load(path)


#: LoRAs of the other families and a simulated model (which takes none of them), beside
#: the built-in entries.
MORE = """
[loras.sd15-style]
source = "/l/sd15-style.safetensors"
family = "sd15"

[loras.flux-style]
source = "/l/flux-style.safetensors"
family = "flux"

[models.sim]
pipeline = "simulated"
source = "builtin:simulated"
"""


def refused(reg: Registry, request: dict[str, Any]) -> list[str]:
    """The fields the validator (what every submit runs) refuses in ``request``."""
    try:
        validate_request({"prompt": "a fox", **request}, reg, Settings())
    except InvalidRequest as exc:
        return [e["field"] for e in exc.fields]
    return []


def test_what_a_model_lists_is_what_its_requests_may_name(tmp_path: Path) -> None:
    """Every registry ControlNet, LoRA and reference mode against every model: a submit
    takes exactly the ones the model's view lists, and refuses the others by field."""
    reg = Registry.load(write(tmp_path, MORE))
    image = data_uri(png((200, 30, 60), (16, 16)))
    modes = ("full", "subject", "style")
    for spec in reg:
        view, model = reg.view(spec), {"model": spec.name}
        cns = {c["name"]: c for c in view["controlnets"]}
        for name in reg.controlnet_names():
            for pre in cns[name]["preprocess"] if name in cns else ["none"]:
                control = [{"name": name, "image": image, "preprocess": pre}]
                got = refused(reg, {**model, "control": control})
                assert got == ([] if name in cns else [_cn_field(spec)]), (spec.name, name)
        listed = {lora["name"] for lora in view["loras"]}
        for name in reg.lora_names():
            got = refused(reg, {**model, "loras": [{"name": name}]})
            assert got == ([] if name in listed else ["loras.0.name"]), (spec.name, name)
        taken = view["ip_adapter"]["modes"] if view["ip_adapter"] else []
        for mode in modes:
            got = refused(reg, {**model, "references": [{"image": image, "mode": mode}]})
            assert (got == []) == (mode in taken), (spec.name, mode, got)
        assert view["references"] == bool(taken)
    # Each family sees its own and refuses the others' (by family, not by name).
    views = {spec.name: reg.view(spec) for spec in reg}
    assert {c["name"] for c in views["tiny-sd15"]["controlnets"]} == {
        "sd15-canny",
        "tiny-sd15-canny",
    }
    assert [lora["name"] for lora in views["tiny-flux"]["loras"]] == ["flux-style"]
    assert views["tiny-flux"]["ip_adapter"]["modes"] == ["full"]
    assert views["sim"]["controlnets"] == views["sim"]["loras"] == []
    assert views["sim"]["ip_adapter"] is None
    assert views["playground-v2.5"]["ip_adapter"] is None  # no ip_adapter entry
    assert refused(reg, {"model": "tiny-sdxl", "loras": [{"name": "sd15-style"}]})


def _cn_field(spec: ModelSpec) -> str:
    """Where a ControlNet the model may not use is refused: the whole field for a family
    that takes none, else the entry's name."""
    return "control" if spec.pipeline == "simulated" else "control.0.name"
