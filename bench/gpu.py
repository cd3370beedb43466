"""Generation speed on a CUDA device, for each set of pipeline options.

For every option set (``--sets``; see OPTION_SETS) a fresh child process loads the
model exactly as the worker does (``worker.diffusion.pipelines.load_model`` + ``warm_up``, which
is where ``torch.compile`` compiles), then times ``--images`` generations at
``--size``² and ``--steps`` steps with the model's guidance (CFG) and scheduler:

- ``it_per_s``: denoising steps per second (``output_type="latent"``: no VAE decode);
- ``s_per_image``: one whole image, VAE decode and PIL conversion included;
- ``peak_mem_gib``: ``torch.cuda.max_memory_allocated`` during those runs;
- ``floor_ratio``: ``s_per_image`` over the FLOP floor, the time the device would need
  at its dense bf16/fp16 peak for the ~687 TFLOP a Playground v2.5 (SDXL UNet) image
  costs at 1024², 50 steps with CFG (scaled linearly with steps and pixels elsewhere:
  an approximation). 1.0 is unreachable; the best published diffusers setups are near 3.

The parent never imports torch (no CUDA in a process that starts others). Without a
CUDA device it prints a JSON line saying so and exits 0. ``--device cpu`` runs the same
children on the CPU, for checking the plumbing with ``--model tiny-sdxl`` (no memory
or floor figures then).

    python bench/gpu.py [--model playground-v2.5] [--images 3] [--steps 50] [--size 1024]
                        [--sets stock,bf16,fast,compiled,small-card,train] [--peak-tflops T]

The ``train`` set times DreamBooth LoRA training instead (``it_per_s``: optimizer steps
per second at ``--size``², batch 1, rank 4; ``peak_mem_gib``), as a ``--train`` worker
runs it.

Last stdout line: {"bench": "gpu", "device", "model", "results": [{"set", "it_per_s",
"s_per_image", "peak_mem_gib", "floor_ratio", ...}, ...]}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, emit, log

#: TFLOP per image: Playground v2.5 / SDXL UNet at 1024², 50 steps, CFG (batch 2).
FLOP_PER_IMAGE_1024_50 = 687e12

#: Dense bf16/fp16 tensor-core peaks (TFLOP/s), by a substring of the device name.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}

#: name → (pipeline options, ATELIER_DTYPE)
OPTION_SETS: dict[str, tuple[dict[str, Any], str]] = {
    "stock": ({}, "auto"),
    "bf16": ({}, "bf16"),
    "fast": ({"channels_last": True, "fuse_qkv": True}, "auto"),
    "compiled": (
        {
            "channels_last": True,
            "fuse_qkv": True,
            "compile": "max-autotune-no-cudagraphs",
            "compile_fullgraph": True,
        },
        "auto",
    ),
    "small-card": ({"cpu_offload": True, "vae_tiling": True, "vae_slicing": True}, "auto"),
    # Not a generation: DreamBooth LoRA training steps (train_child).
    "train": ({}, "auto"),
}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def train_child(args: argparse.Namespace) -> dict[str, Any]:
    """SDXL DreamBooth LoRA training on the loaded base, as a --train worker runs it
    (``worker.training.loop.Trainer``: rank 4, batch 1, accelerate's mixed precision,
    gradient checkpointing on CUDA): optimizer steps per second at ``--size``² and peak
    memory, over ``--steps`` steps after 3 of warm-up."""
    import torch

    from producer.core.registry import Registry
    from producer.core.settings import Settings
    from worker.diffusion.pipelines import load_model
    from worker.training.loop import Trainer

    settings = Settings(device=args.device)
    spec = Registry.load(settings.models_file)[args.model]
    model = load_model(spec, settings, args.device)
    cuda = args.device.startswith("cuda")
    examples = _training_examples(model, args.size)
    request: Any = {
        "seed": 1,
        "rank": 4,
        "learning_rate": 1e-4,
        "train_text_encoder": False,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "steps": args.steps + 3,
        "batch_size": 1,
        "gradient_accumulation": 1,
        "prior_loss_weight": 1.0,
    }
    trainer = Trainer(model, request, examples)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    try:
        for step in range(3):
            trainer.step(step)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        for step in range(3, 3 + args.steps):
            trainer.step(step)
        sync()
        seconds = time.perf_counter() - t0
    finally:
        trainer.restore()
    return {
        "set": "train",
        "mixed_precision": trainer.accelerator.mixed_precision,
        "edm": trainer.edm,
        "dtype": str(model.dtype).removeprefix("torch."),
        "it_per_s": round(args.steps / seconds, 3),
        "s_per_image": None,
        "peak_mem_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None),
        "floor_s": None,
        "floor_ratio": None,
    }


def _training_examples(model: Any, size: int) -> list[Any]:
    """Two seeded noise pictures of ``size``², encoded as the trainer's examples."""
    import numpy as np
    from PIL import Image

    from worker.training.loop import Example, latent_dist, time_ids

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(2)
    ]
    return [
        Example(m, s, "a photo of sks dog", time_ids((size, size), (0, 0), size))
        for m, s in latent_dist(model, images)
    ]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One option set, in this (fresh) process."""
    from dataclasses import asdict, replace

    import torch

    from producer.core.pipeline_options import PipelineOptions
    from producer.core.registry import Registry
    from producer.core.settings import Settings
    from worker.diffusion.pipelines import load_model, warm_up

    options, dtype = OPTION_SETS[args.child]
    settings = Settings(device=args.device, dtype=dtype)
    registry = Registry.load(settings.models_file)
    spec = registry[args.model]
    spec = replace(spec, options=PipelineOptions(**{**asdict(spec.options), **options}))
    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    model = load_model(spec, settings, args.device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_up(model)
    warm_s = time.perf_counter() - t0

    generate = _generation_timer(model, spec, args, cuda)
    model.pipe.scheduler = model.scheduler(spec.scheduler)
    generate("pil", 0)  # the full size once: kernels and allocator settle
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    latent = [generate("latent", 1 + i) for i in range(args.images)]
    full = [generate("pil", 100 + i) for i in range(args.images)]
    s_image = sorted(full)[len(full) // 2]
    result: dict[str, Any] = {
        "set": args.child,
        "options": spec.options.active(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "it_per_s": round(args.steps / sorted(latent)[len(latent) // 2], 3),
        "s_per_image": round(s_image, 3),
        "peak_mem_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None),
        "load_s": round(load_s, 1),
        "warmup_s": round(warm_s, 1),
    }
    result["floor_s"], result["floor_ratio"] = _floor(args, s_image) if cuda else (None, None)
    return result


def _generation_timer(model: Any, spec: Any, args: argparse.Namespace, cuda: bool) -> Any:
    """``generate(output_type, seed)``: one image of ``model`` at the benchmark's size and
    steps, its wall time in seconds (the CUDA queue drained before and after)."""
    import torch

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def generate(output_type: str, seed: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.pipe(
                prompt="a lighthouse at dusk, oil on canvas",
                width=args.size,
                height=args.size,
                num_inference_steps=args.steps,
                guidance_scale=spec.guidance_scale,
                output_type=output_type,
                generator=torch.Generator("cpu").manual_seed(seed),
            )
        sync()
        return time.perf_counter() - t

    return generate


def _floor(args: argparse.Namespace, s_image: float) -> tuple[float | None, float | None]:
    """The CUDA card's compute floor for one image (seconds at its peak TFLOPS) and the
    measured time's ratio to it; None where the card's peak is unknown."""
    import torch

    peak = args.peak_tflops or peak_tflops(torch.cuda.get_device_name())
    if not peak:
        return None, None
    flop = FLOP_PER_IMAGE_1024_50 * (args.steps / 50) * (args.size / 1024) ** 2
    floor_s = round(flop / (peak * 1e12), 3)
    return floor_s, round(s_image / floor_s, 2)


def cuda_device() -> str | None:
    """The CUDA device's name, asked of a child process (this one never loads CUDA)."""
    code = "import torch\nprint(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return name or None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(train_child(args) if args.child == "train" else child(args)), flush=True)
        return 0

    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in OPTION_SETS]
    if unknown:
        parser.error(f"unknown option sets {unknown}; known: {sorted(OPTION_SETS)}")
    device = args.device
    name = None
    if device != "cpu":
        name = cuda_device()
        if name is None:
            emit(
                {
                    "bench": "gpu",
                    "status": "skipped",
                    "reason": "needs a CUDA GPU: torch sees none on this machine",
                    "results": [],
                }
            )
            return 0
        device = "cuda" if device == "auto" else device
    results = [run_set(args, s, device) for s in sets]
    emit(
        {
            "bench": "gpu",
            "status": "ok",
            "device": name or device,
            "model": args.model,
            "size": args.size,
            "steps": args.steps,
            "images": args.images,
            "results": results,
        }
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="playground-v2.5")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--sets", default="stock,bf16,fast,compiled,small-card,train")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto, cuda, cuda:N, or cpu (the CPU only checks the plumbing)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's dense bf16 peak, when its name is not in the table",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def run_set(args: argparse.Namespace, s: str, device: str) -> dict[str, Any]:
    """Option set ``s`` timed in a fresh child process: its result, or why it has none."""
    if device == "cpu" and (
        OPTION_SETS[s][0].get("cpu_offload") or OPTION_SETS[s][0].get("compile", "off") != "off"
    ):
        return {
            "set": s,
            "skipped": "needs CUDA (offload) or minutes of CPU compilation (compile)",
        }
    log(f"{s}: {args.model} at {args.size}², {args.steps} steps, {args.images} images")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        s,
        "--model",
        args.model,
        "--images",
        str(args.images),
        "--steps",
        str(args.steps),
        "--size",
        str(args.size),
        "--device",
        device,
    ]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
    if out.returncode != 0:
        return {"set": s, "error": out.stderr.strip().splitlines()[-1:]}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    sys.exit(main())
