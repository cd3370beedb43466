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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Bench, Reference, emit, load_average, log

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
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from peft import LoraConfig

    from worker.builtin.tiny import ensure_tiny_sdxl

    torch.set_num_threads(1)
    path = ensure_tiny_sdxl(Path(models_dir) / "tiny-sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), use_safetensors=True).to("cpu")
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
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
    params = [p for p in unet.parameters() if p.requires_grad]
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

    for _ in range(3):  # warm-up
        step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n = int(line)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        print(json.dumps({"steps": n, "seconds": time.perf_counter() - t0}), flush=True)


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument(
        "--models-dir",
        default=os.environ.get(
            "ATELIER_MODELS_DIR", str(Path.home() / ".cache" / "atelier" / "models")
        ),
    )
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_server:
        bare_server(args.models_dir)
        return 0

    from producer import Client

    t_start = time.perf_counter()
    load_before = load_average()
    worker_steps = worker_s = bare_s = 0.0
    with Bench(s3=False) as bench:
        env = bench.env(models_dir=args.models_dir, progress_interval_s=0.2)
        from tests.servers import Worker

        worker = Worker(
            env, bench.workdir / "logs" / "train-worker.log", ["tiny-sdxl"], extra_args=["--train"]
        )
        worker.start(wait=False)
        bench.procs.append(worker)
        reference = Reference(bench, __file__, ["--models-dir", args.models_dir])
        worker.wait_ready(timeout=180)
        settings = bench.settings(models_dir=args.models_dir, default_model="tiny-sdxl")
        req = {
            "images": subject(),
            "instance_prompt": PROMPT,
            "model": "tiny-sdxl",
            "resolution": 64,
            "steps": args.steps,
            "num_validation_images": 0,
            "checkpoint_every": args.checkpoint_every,
            "seed": 1,
        }
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


if __name__ == "__main__":
    sys.exit(main())
