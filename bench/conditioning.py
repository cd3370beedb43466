"""What ControlNets and reference images add to a tiny model's generation time.

In one process, on one torch thread, the worker's own generation step
(``worker.generation.generate.generate``) runs the model (``--model``: tiny-sdxl at
64², guidance 5, Euler; or tiny-flux at 64², no guidance, flow-matching Euler; 4 steps)
with: nothing; one ControlNet; one with ``preprocess: canny`` (the edge map derived
when the inputs are decoded, timed with it); two ControlNets (tiny-flux's are its one
tiny ControlNet twice); one reference; four references; img2img with a ControlNet.
Each configuration is warmed once (the first ControlNet / IP-Adapter load is reported
apart), then timed ``--repeat`` times, the configurations interleaved so load from
other processes falls on all alike; the median per configuration and its difference
from the plain job are reported.

    python bench/conditioning.py [--model tiny-flux] [--repeat 9] [--steps 4]
                                 [--only control,reference]

Last stdout line: {"bench": "conditioning", "median_ms": {...}, "added_ms": {...},
"first_load_ms": {...}, ...}
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, load_average, log

#: Per model: its guidance and scheduler, and the two ControlNets of ``two_controls``.
MODELS: dict[str, tuple[float, str, tuple[str, str]]] = {
    "tiny-sdxl": (5.0, "euler", ("tiny-sdxl-canny", "tiny-sdxl-depth")),
    "tiny-flux": (0.0, "flow_euler", ("tiny-flux-canny", "tiny-flux-canny")),
}


class _Run:
    """What generate() reads of a run: the request, progress and cancel checks."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request

    def report(self, *args: Any, **kwargs: Any) -> None:
        pass

    def check(self) -> None:
        pass

    @contextlib.contextmanager
    def watched(self) -> Iterator[None]:
        yield


def main() -> None:
    args = parse_args()
    started, load_before = time.perf_counter(), load_average()

    import torch

    torch.set_num_threads(1)
    # The tiny models in ATELIER_MODELS_DIR when set (built there if missing), else in a
    # folder of this run's own.
    tmp = tempfile.TemporaryDirectory(prefix="atelier-bench-cond-")
    once, names = setup(args, tmp.name)
    first = {name: round(once(name)) for name in names}
    log(f"first runs (loads included): {first}")
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.repeat):
        for name in names:
            times[name].append(once(name))
        log(f"round {i + 1}/{args.repeat}")
    report(args, first, times, started, load_before)
    tmp.cleanup()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny-sdxl")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated configurations")
    return parser.parse_args()


def setup(args: argparse.Namespace, tmp_dir: str) -> tuple[Callable[[str], float], list[str]]:
    """The model loaded; returns ``once(name)``, one generation of a configuration in
    milliseconds, and the configurations' names."""
    from producer.core.registry import Registry
    from producer.core.settings import Settings
    from worker.diffusion.pipelines import load_model
    from worker.generation.conditioning import Conditioning
    from worker.generation.generate import generate

    settings = Settings(device="cpu")
    if "models_dir" not in settings.model_fields_set:
        settings = Settings(device="cpu", models_dir=tmp_dir)
    registry = Registry.load()
    model = load_model(registry[args.model], settings, "cpu")
    cond = Conditioning(settings, registry)
    guidance, scheduler, nets = MODELS[args.model]
    base = {
        "prompt": "a lighthouse",
        "negative_prompt": "",
        "steps": args.steps,
        "guidance_scale": guidance,
        "scheduler": scheduler,
        "seed": 1,
        "num_images": 1,
        "width": 64,
        "height": 64,
        "strength": 0.75,
        "loras": [],
    }
    configs = configurations(nets)
    if args.only:
        configs = {n: c for n, c in configs.items() if n in {"plain", *args.only.split(",")}}

    def once(name: str) -> float:
        extra, inputs = configs[name]
        t0 = time.perf_counter()
        run: Any = _Run({**base, **extra})  # what generate reads of a Run
        generate(run, model, inputs(), None, refs=cond)
        return (time.perf_counter() - t0) * 1000

    return once, list(configs)


def configurations(nets: tuple[str, str]) -> dict[str, tuple[dict[str, Any], Any]]:
    """By name: what a configuration adds to the request, and its decoded inputs."""
    from PIL import Image

    from worker.generation.conditioning import canny
    from worker.generation.inputs import Inputs

    net, net_2 = nets
    ctrl = Image.effect_noise((64, 64), 60).convert("RGB")
    init = Image.new("RGB", (64, 64), (20, 90, 160))
    cn = {"name": net, "image": "-", "scale": 1.0, "start": 0.0, "end": 1.0, "preprocess": "none"}
    ref = {"image": "-", "scale": 0.6, "mode": "full"}
    return {
        "plain": ({}, lambda: Inputs()),
        "control": ({"control": [cn]}, lambda: Inputs(control=[ctrl])),
        "control_canny": ({"control": [cn]}, lambda: Inputs(control=[canny(ctrl)])),
        "two_controls": (
            {"control": [cn, {**cn, "name": net_2}]},
            lambda: Inputs(control=[ctrl, ctrl]),
        ),
        "reference": ({"references": [ref]}, lambda: Inputs(references=[ctrl])),
        "four_references": ({"references": [ref] * 4}, lambda: Inputs(references=[ctrl] * 4)),
        "img2img": ({}, lambda: Inputs(image=init)),
        "img2img_control": ({"control": [cn]}, lambda: Inputs(image=init, control=[ctrl])),
    }


def report(
    args: argparse.Namespace,
    first: dict[str, int],
    times: dict[str, list[float]],
    started: float,
    load_before: float,
) -> None:
    median = {n: round(statistics.median(t), 1) for n, t in times.items()}
    added = {n: round(m - median["plain"], 1) for n, m in median.items() if n != "plain"}
    if "img2img_control" in median and "img2img" in median:
        added["img2img_control"] = round(median["img2img_control"] - median["img2img"], 1)
    emit(
        {
            "bench": "conditioning",
            "model": args.model,
            "size": 64,
            "steps": args.steps,
            "repeat": args.repeat,
            "median_ms": median,
            "added_ms": added,
            "first_run_ms": first,
            "note": "img2img_control is against img2img",
        },
        started,
        load_before,
    )


if __name__ == "__main__":
    main()
