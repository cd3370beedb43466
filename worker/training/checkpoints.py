"""A training's checkpoints: every ``checkpoint_every`` steps, under
``{prefix}/{job_id}/checkpoints/{step:08d}/``:

- ``lora.safetensors``: the trainable (LoRA) parameters, by name;
- ``optimizer.safetensors``: AdamW's moments and step counts, ``{param}.{name}``;
- ``state.json``: the step, the loss curve, the optimizer's parameter groups, the LR
  scheduler's state, and the data position. The random state is the step itself: each
  step draws from a generator seeded by ``(seed, step)``, so nothing else is needed.

No pickle, no ``torch.save``. The newest checkpoint is named in the job's record
(``checkpoint: {step, key}``), which the next attempt reads; the two newest are kept.
"""

from __future__ import annotations

import json
from typing import Any

from producer.core.contract import EventType
from worker.run import Run
from worker.training.loop import Trainer

KEEP = 2


def _prefix(storage: Any, job_id: str, step: int) -> str:
    return str(storage.key(job_id, f"checkpoints/{step:08d}"))


def save(run: Run, storage: Any, trainer: Trainer, step: int) -> None:
    """Write the checkpoint after ``step`` optimizer steps, then name it in the record
    (with a ``job.checkpoint`` event) and prune the older ones."""
    from safetensors.torch import save as st_save

    prefix = _prefix(storage, run.job_id, step)
    lora = {name: p.detach().cpu().contiguous() for name, p in trainer.named_trainable()}
    opt = trainer.optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for name, value in entry.items():
            if hasattr(value, "detach"):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    state = {
        "step": step,
        "losses": trainer.losses,
        "optimizer_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "lr_scheduler": {k: v for k, v in trainer.lr.state_dict().items() if k != "lr_lambdas"},
        "data_position": step * run.request["gradient_accumulation"] * run.request["batch_size"],
        "rng": "per step: torch.Generator seeded from (seed, step); per epoch order: (seed, epoch)",
        # fp16 on CUDA: the loss scale and its growth tracker (floats and ints), so a
        # resumed run scales (and skips overflowing steps) as the first one would have.
        "loss_scaler": _scaler_state(trainer),
    }
    run.check_fence()
    storage.put(f"{prefix}/lora.safetensors", st_save(lora), "application/octet-stream")
    storage.put(
        f"{prefix}/optimizer.safetensors",
        st_save(tensors) if tensors else b"",
        "application/octet-stream",
    )
    key = f"{prefix}/state.json"
    storage.put(key, json.dumps(state, sort_keys=True).encode(), "application/json")
    kept = [*run.record.get("checkpoints", []), step][-KEEP:]
    old = [s for s in run.record.get("checkpoints", []) if s not in kept]
    run.emit(
        EventType.CHECKPOINT,
        {"step": step, "key": key},
        checkpoint={"step": step, "key": key},
        checkpoints=kept,
    )
    for s in old:
        for name in ("lora.safetensors", "optimizer.safetensors", "state.json"):
            try:
                storage.delete(f"{_prefix(storage, run.job_id, s)}/{name}")
            except Exception:  # noqa: BLE001 - pruning is best effort
                pass


def load(run: Run, storage: Any, trainer: Trainer) -> int | None:
    """Continue from the newest checkpoint the record names; its step (None: none)."""
    import torch
    from safetensors.torch import load as st_load

    ref = run.record.get("checkpoint")
    if not ref:
        return None
    prefix = ref["key"].rsplit("/", 1)[0]
    state = json.loads(storage.get(ref["key"]))
    lora = st_load(storage.get(f"{prefix}/lora.safetensors"))
    with torch.no_grad():
        for name, p in trainer.named_trainable():
            p.copy_(lora[name])
    raw = storage.get(f"{prefix}/optimizer.safetensors")
    tensors = st_load(raw) if raw else {}
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    for idx, extra in state["optimizer_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(extra)
    trainer.optimizer.load_state_dict(
        {"state": opt_state, "param_groups": state["optimizer_groups"]}
    )
    sched = trainer.lr.state_dict()
    sched.update(state["lr_scheduler"])
    trainer.lr.load_state_dict(sched)
    scaler = getattr(trainer.accelerator, "scaler", None)
    if state.get("loss_scaler") and scaler is not None:
        scaler.load_state_dict(state["loss_scaler"])
    trainer.losses[:] = state["losses"]
    return int(state["step"])


def _scaler_state(trainer: Trainer) -> dict[str, Any] | None:
    """accelerate's GradScaler state (fp16 only; None otherwise)."""
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in scaler.state_dict().items()}
