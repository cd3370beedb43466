"""tiny-sdxl DreamBooth LoRA training steps per second through the worker, against a
bare peft + diffusers loop with the same settings.

The worker: a training submitted through the client and run by ``python -m worker
--train`` (progress events, cancel and fence checks at every step, checkpoints every
``--checkpoint-every`` steps); its steps per second are read from its own
``job.progress`` events over the training phase (first to last training event), so
the model load, the VAE encode and the outputs are left out, as they are from the bare
loop. The bare loop: ``StableDiffusionXLPipeline`` from the same folder, peft LoRA on
the same projections (rank 4), AdamW, the prompt encoded once, one image of 64², an
ε-prediction MSE step with DDPM noise, timed over the same number of steps.

Both run torch on one intra-op thread; they alternate ``--rounds`` times.

    python bench/train.py [--steps 60] [--rounds 2]

Last stdout line: {"bench": "train", "steps", "worker_steps_per_s", "bare_steps_per_s",
"ratio", ...}
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Bench,
    Reference,
    add_models_dir,
    bare_tiny_sdxl,
    emit,
    load_average,
    log,
    serve_reference,
)

PROMPT = "a photo of sks dog"


def subject() -> list[str]:
    from PIL import Image

    out = []
    for color in ((200, 40, 40), (40, 160, 60)):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(buf, "PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def bare_server(models_dir: str) -> None:
    """The reference loop in a child process: for each line ``N`` on stdin, N training
    steps; answers with a JSON line."""
    step = bare_step(bare_tiny_sdxl(models_dir))

    def steps(n: int) -> None:
        for _ in range(n):
            step()

    for _ in range(3):  # warm-up
        step()
    serve_reference(steps, "steps")


def bare_step(pipe: Any) -> Callable[[], None]:
    """One training step of a rank-4 LoRA on ``pipe``'s UNet (AdamW, the prompt encoded
    once, one 64² image, ε-prediction MSE with DDPM noise)."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    params = add_lora(pipe)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        x = torch.from_numpy(np.full((64, 64, 3), 0.5, dtype=np.float32)).permute(2, 0, 1)
        dist = pipe.vae.encode(x.unsqueeze(0)).latent_dist
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    unet.train()

    def step() -> None:
        latents = (
            dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        ) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (1,), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(
            noisy,
            t,
            encoder_hidden_states=pe,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def add_lora(pipe: Any) -> list[Any]:
    """Everything frozen, then a rank-4 LoRA on the UNet's attention projections (seeded);
    returns the trainable parameters."""
    import torch
    from peft import LoraConfig

    unet = pipe.unet
    for m in (unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    return [p for p in unet.parameters() if p.requires_grad]


def worker_rate(client: Any, job_id: str) -> tuple[int, float]:
    """(steps, seconds) between the first and last training progress events."""
    from producer.core.contract import parse_iso

    points = []
    for ev in client.events(job_id, timeout=300):
        data = ev["data"]
        if ev["type"] == "job.progress" and data.get("phase") == "training":
            points.append((data["step"], parse_iso(ev["ts"]).timestamp()))
        if ev["type"] in ("job.failed", "job.cancelled"):
            raise RuntimeError(f"training {job_id}: {ev['type']} {data.get('error')}")
    (s0, t0), (s1, t1) = points[0], points[-1]
    return s1 - s0, t1 - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare_server:
        bare_server(args.models_dir)
        return 0

    from producer import Client

    t_start = time.perf_counter()
    load_before = load_average()
    worker_steps = worker_s = bare_s = 0.0
    with Bench(s3=False) as bench:
        reference = start_both(bench, args.models_dir)
        settings = bench.settings(models_dir=args.models_dir, default_model="tiny-sdxl")
        req = training_request(args)
        with Client(settings) as client:
            for r in range(args.rounds):
                log(f"round {r + 1}: bare loop, {args.steps} steps")
                bare_s += reference.run(args.steps)
                log(f"round {r + 1}: worker, {args.steps} steps")
                n, s = worker_rate(client, client.train(req))
                worker_steps += n
                worker_s += s
    bare_rate = args.steps * args.rounds / bare_s
    worker_rate_ = worker_steps / worker_s
    emit(
        {
            "bench": "train",
            "steps": args.steps * args.rounds,
            "worker_steps_per_s": round(worker_rate_, 3),
            "bare_steps_per_s": round(bare_rate, 3),
            "ratio": round(worker_rate_ / bare_rate, 4),
            "rounds": args.rounds,
            "checkpoint_every": args.checkpoint_every,
        },
        started=t_start,
        load_before=load_before,
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    add_models_dir(parser)
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def start_both(bench: Bench, models_dir: str) -> Reference:
    """The ``--train`` worker and the bare loop's child, started together; returns the
    bare loop once both are ready."""
    from tests.servers import Worker

    env = bench.env(models_dir=models_dir, progress_interval_s=0.2)
    worker = Worker(
        env, bench.workdir / "logs" / "train-worker.log", ["tiny-sdxl"], extra_args=["--train"]
    )
    worker.start(wait=False)
    bench.procs.append(worker)
    reference = Reference(bench, __file__, ["--models-dir", models_dir])
    worker.wait_ready(timeout=180)
    return reference


def training_request(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "images": subject(),
        "instance_prompt": PROMPT,
        "model": "tiny-sdxl",
        "resolution": 64,
        "steps": args.steps,
        "num_validation_images": 0,
        "checkpoint_every": args.checkpoint_every,
        "seed": 1,
    }


if __name__ == "__main__":
    sys.exit(main())
