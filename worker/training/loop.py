"""The DreamBooth LoRA loop on the worker's loaded base, after diffusers'
``train_dreambooth_lora_sdxl.py`` / ``train_dreambooth_lora.py``.

- peft LoRA (``rank``, alpha = rank, gaussian init) on the UNet's attention projections
  ``to_k, to_q, to_v, to_out.0`` and, with ``train_text_encoder``, on the text
  encoders' ``q_proj, k_proj, v_proj, out_proj``; everything else frozen.
- The VAE's latent distribution of each image is computed once; each step samples it.
- ε- or v-prediction against a DDPM noise schedule made from the model's scheduler
  config; an EDM model (Playground v2.5) trains the EDM way: EDMEulerScheduler's sigmas,
  ``precondition_inputs/noise/outputs`` and the ``sigma⁻²`` weighting, on latents
  normalized by the VAE's ``latents_mean``/``latents_std``.
- Prior preservation: class images ride in the same batch; their loss is weighted by
  ``prior_loss_weight``.
- Randomness is drawn per optimizer step from a generator seeded by ``(seed, step)``
  (data order per epoch by ``(seed, epoch)``), so a run resumed at step k draws exactly
  what an uninterrupted one does from k on.

:class:`Trainer` holds one training's state; :meth:`Trainer.restore` puts the base back
as it was (adapters unloaded, flags and modes restored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from producer.core.normalized import TrainingRequest

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER = "atelier_train"


@dataclass
class Example:
    """One image ready to train on: its latent distribution and its conditioning."""

    mean: Any
    std: Any
    prompt: str
    time_ids: Any = None  # SDXL only


@dataclass
class Trainer:
    model: Any  # worker.diffusion.pipelines.LoadedModel
    request: TrainingRequest
    instances: list[Example]
    classes: list[Example] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        import torch
        from accelerate import Accelerator

        pipe = self.model.pipe
        self.sdxl = hasattr(pipe, "text_encoder_2")
        self.device = torch.device(self.model.device)
        cuda = self.device.type == "cuda"
        # On CUDA: mixed precision in the loaded weights' half type (fp16 gets
        # accelerate's loss scaler), bf16 over fp32 weights where the device has it.
        half = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.model.dtype)
        mixed = "no" if not cuda else half or ("bf16" if torch.cuda.is_bf16_supported() else "no")
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
        self.encoders = [
            e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None
        ]
        self._flags = {
            id(p): p.requires_grad
            for m in [pipe.unet, pipe.vae, *self.encoders]
            for p in m.parameters()
        }
        self._edm()
        self._add_lora()
        if cuda:  # activations recomputed in the backward pass: memory for time
            pipe.unet.enable_gradient_checkpointing()

    # -- set up --------------------------------------------------------------------------

    def _edm(self) -> None:
        from diffusers import DDPMScheduler, EDMEulerScheduler

        config = self.model.base_scheduler_config
        # Playground v2.5's own scheduler config is an EDM one; a model whose default
        # scheduler is an EDM one trains the EDM way too.
        self.edm = "EDM" in str(
            config.get("_class_name", "")
        ) or self.model.spec.scheduler.startswith("edm_")
        self.noise: Any
        if self.edm:
            self.noise = EDMEulerScheduler(sigma_data=config.get("sigma_data", 0.5))
        else:
            self.noise = DDPMScheduler.from_config(config)

    def _add_lora(self) -> None:
        import torch
        from peft import LoraConfig

        req, pipe = self.request, self.model.pipe
        torch.manual_seed(req["seed"])  # peft's gaussian init draws from the global RNG
        for m in [pipe.unet, pipe.vae, *self.encoders]:
            m.requires_grad_(False)
        pipe.unet.add_adapter(
            LoraConfig(
                r=req["rank"],
                lora_alpha=req["rank"],
                init_lora_weights="gaussian",
                target_modules=UNET_TARGETS,
            ),
            adapter_name=ADAPTER,
        )
        groups: list[dict[str, Any]] = [
            {"params": self._trainable(pipe.unet), "lr": req["learning_rate"]}
        ]
        if req["train_text_encoder"]:
            from peft import inject_adapter_in_model

            for enc in self.encoders:
                # peft directly: transformers' add_adapter wants a newer peft than
                # diffusers does; the layers are the same.
                inject_adapter_in_model(
                    LoraConfig(
                        r=req["rank"],
                        lora_alpha=req["rank"],
                        init_lora_weights="gaussian",
                        target_modules=TEXT_TARGETS,
                    ),
                    enc,
                    adapter_name=ADAPTER,
                )
                groups.append({"params": self._trainable(enc), "lr": req["text_encoder_lr"]})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        from diffusers.optimization import get_scheduler

        self.lr = get_scheduler(
            req["lr_scheduler"],
            optimizer=self.optimizer,
            num_warmup_steps=req["lr_warmup_steps"],
            num_training_steps=req["steps"],
        )
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)

    def named_trainable(self) -> list[tuple[str, Any]]:
        """The trained parameters by a stable name (checkpoints), in optimizer order."""
        pipe = self.model.pipe
        modules = [("unet", pipe.unet)]
        if self.request["train_text_encoder"]:
            modules += [(f"text_encoder_{i}", e) for i, e in enumerate(self.encoders)]
        return [
            (f"{prefix}.{name}", p)
            for prefix, m in modules
            for name, p in m.named_parameters()
            if p.requires_grad
        ]

    @staticmethod
    def _trainable(module: Any) -> list[Any]:
        import torch

        out = []
        for p in module.parameters():
            if p.requires_grad:  # the LoRA layers peft just added
                p.data = p.data.to(torch.float32)  # trained in fp32 under mixed precision
                out.append(p)
        return out

    # -- one optimizer step --------------------------------------------------------------

    def step(self, step: int) -> float:
        """Optimizer step ``step`` (0-based): ``gradient_accumulation`` batches, then the
        update; returns the mean loss."""
        import torch

        req = self.request
        ga, total = req["gradient_accumulation"], 0.0
        gen = torch.Generator().manual_seed(_mix(req["seed"], step))
        self.model.pipe.unet.train()
        for micro in range(ga):
            batch = self._batch(step * ga + micro, req["batch_size"])
            with self.accelerator.autocast():
                loss = self._loss(batch, gen)
            self.accelerator.backward(loss / ga)
            total += float(loss.detach())
        self.accelerator.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(total / ga)
        return float(total / ga)

    def _batch(self, index: int, size: int) -> list[Example]:
        """Batch ``index`` of the seeded epoch order (instances, then as many class
        images beside them with prior preservation)."""
        import torch

        n = len(self.instances)
        out: list[Example] = []
        for k in range(index * size, index * size + size):
            epoch, pos = divmod(k, n)
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(_mix(self.request["seed"], -1 - epoch))
            ).tolist()
            out.append(self.instances[order[pos]])
        if self.classes:
            out += [self.classes[(index * size + j) % len(self.classes)] for j in range(size)]
        return out

    def _loss(self, batch: list[Example], gen: Any) -> Any:
        import torch

        dev = self.device
        mean = torch.cat([e.mean for e in batch])
        std = torch.cat([e.std for e in batch])
        latents = (mean + std * torch.randn(mean.shape, generator=gen)).to(dev)
        latents = self._scale(latents)
        noise = torch.randn(latents.shape, generator=gen).to(dev, latents.dtype)
        bsz = latents.shape[0]
        idx = torch.randint(0, self.noise.config.num_train_timesteps, (bsz,), generator=gen)
        cond = self._condition(batch)
        unet = self.model.pipe.unet
        weighting = None
        if self.edm:
            timesteps = self.noise.timesteps[idx].to(dev)
            sigmas = self.noise.sigmas[idx].to(dev, latents.dtype).reshape(bsz, 1, 1, 1)
            noisy = latents + noise * sigmas
            pred = unet(
                self.noise.precondition_inputs(noisy, sigmas),
                self.noise.precondition_noise(sigmas.flatten()),
                **cond,
            ).sample
            pred = self.noise.precondition_outputs(noisy, pred, sigmas)
            target, weighting = latents, (sigmas**-2.0).float()
        else:
            timesteps = idx.to(dev)
            noisy = self.noise.add_noise(latents, noise, timesteps)
            pred = unet(noisy, timesteps, **cond).sample
            kind = self.noise.config.prediction_type
            target = (
                self.noise.get_velocity(latents, noise, timesteps)
                if kind == "v_prediction"
                else noise
            )
        per = (pred.float() - target.float()) ** 2
        if weighting is not None:
            per = weighting * per
        per = per.reshape(bsz, -1).mean(dim=1)
        if not self.classes:
            return per.mean()
        half = bsz // 2
        return per[:half].mean() + self.request["prior_loss_weight"] * per[half:].mean()

    def _scale(self, latents: Any) -> Any:
        vae = self.model.pipe.vae.config
        mean, std = getattr(vae, "latents_mean", None), getattr(vae, "latents_std", None)
        if self.edm and mean is not None and std is not None:
            import torch

            m = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            s = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            return (latents - m) * vae.scaling_factor / s
        return latents * vae.scaling_factor

    def _condition(self, batch: list[Example]) -> dict[str, Any]:
        import torch

        embeds, pooled = [], []
        grad = self.request["train_text_encoder"]
        for e in batch:
            pe, pp = self.encode(e.prompt, grad)
            embeds.append(pe)
            pooled.append(pp)
        out: dict[str, Any] = {"encoder_hidden_states": torch.cat(embeds)}
        if self.sdxl:
            out["added_cond_kwargs"] = {
                "text_embeds": torch.cat(pooled),
                "time_ids": torch.cat([e.time_ids for e in batch]).to(self.device),
            }
        return out

    def encode(self, prompt: str, grad: bool) -> tuple[Any, Any]:
        """The prompt's embeddings (and SDXL's pooled ones), with gradients through the
        text encoders' LoRA when they train; cached when they do not."""
        import torch

        cache: dict[str, tuple[Any, Any]] = self.__dict__.setdefault("_embeds", {})
        if not grad and prompt in cache:
            return cache[prompt]
        with torch.set_grad_enabled(grad):
            out = self.model.pipe.encode_prompt(
                prompt,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        result = (out[0], out[2] if self.sdxl else None)
        if not grad:
            cache[prompt] = result
        return result

    # -- the end -------------------------------------------------------------------------

    def restore(self) -> None:
        """The base as before: the adapters unloaded, flags and modes as they were."""
        pipe = self.model.pipe
        pipe.unload_lora_weights()
        if pipe.unet.is_gradient_checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        for m in [pipe.unet, pipe.vae, *self.encoders]:
            for p in m.parameters():
                p.requires_grad_(self._flags.get(id(p), True))
            m.eval()
        self.optimizer.zero_grad(set_to_none=True)


def _mix(seed: int, n: int) -> int:
    """A generator seed for draw ``n`` of a training seeded ``seed`` (64-bit mix)."""
    x = (seed * 0x9E3779B97F4A7C15 + (n + 2**31) * 0xBF58476D1CE4E5B9) % 2**64
    x ^= x >> 31
    return (x * 0x94D049BB133111EB) % 2**63


def latent_dist(model: Any, images: list[Any]) -> list[tuple[Any, Any]]:
    """The VAE's latent distribution (mean, std) of each image, computed once."""
    import numpy as np
    import torch

    vae = model.pipe.vae
    out = []
    with torch.no_grad():
        for img in images:
            arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
            x = arr.permute(2, 0, 1).unsqueeze(0).to(model.device, vae.dtype)
            dist = vae.encode(x).latent_dist
            out.append((dist.mean.float().cpu(), dist.std.float().cpu()))
    return out


def time_ids(original: tuple[int, int], crop: tuple[int, int], res: int) -> Any:
    import torch

    return torch.tensor([[*original, *crop, res, res]], dtype=torch.float32)
