"""A training's outputs: ``adapter.safetensors`` (the format ``save_lora_weights``
writes and ``load_lora_weights`` reads), validation images made with the adapter, and
``manifest.json``."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from producer.core.contract import EventType, Kind, Output
from worker.diffusion import encode as encoding
from worker.run import Run
from worker.training.loop import ADAPTER, Trainer


def adapter_bytes(trainer: Trainer) -> bytes:
    """The trained LoRA as diffusers' DreamBooth scripts save it."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe = trainer.model.pipe
    layers: dict[str, Any] = {
        "unet_lora_layers": convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER)
        )
    }
    if trainer.request["train_text_encoder"]:
        names = ["text_encoder_lora_layers", "text_encoder_2_lora_layers"]
        for name, enc in zip(names, trainer.encoders, strict=False):
            layers[name] = convert_state_dict_to_diffusers(
                get_peft_model_state_dict(enc, adapter_name=ADAPTER)
            )
    with tempfile.TemporaryDirectory(prefix="atelier-lora-") as tmp:
        type(pipe).save_lora_weights(tmp, safe_serialization=True, **layers)
        return (Path(tmp) / "pytorch_lora_weights.safetensors").read_bytes()


def validation_images(run: Run, trainer: Trainer) -> list[Any]:
    """``num_validation_images`` pictures of ``validation_prompt`` with the adapter on,
    seeds ``seed + i``, at ``resolution``, with the model's default steps and scheduler."""
    import torch

    req, model = run.request, trainer.model
    n = req["num_validation_images"]
    if not n:
        return []
    pipe = model.pipe
    pipe.scheduler = model.scheduler(model.spec.scheduler)
    images = []
    with torch.inference_mode():
        for i in range(n):
            run.check()
            gen = torch.Generator("cpu").manual_seed(req["seed"] + i)
            images += pipe(
                prompt=req["validation_prompt"],
                num_inference_steps=model.spec.steps,
                guidance_scale=model.spec.guidance_scale,
                width=req["resolution"],
                height=req["resolution"],
                generator=[gen],
                output_type="pil",
            ).images
    return images


def store(
    run: Run, storage: Any, adapter: bytes, images: list[Any], level: int, spec: Any
) -> list[Output]:
    """Validation images ``{index}.png`` then the adapter, a ``job.output`` event each."""
    req = run.request
    outputs: list[Output] = []
    items: list[tuple[str, bytes, str, Any]] = []
    # What the PNGs record: the generation that made them (the adapter on).
    made = {
        "prompt": req["validation_prompt"],
        "negative_prompt": "",
        "model": req["model"],
        "steps": spec.steps,
        "scheduler": spec.scheduler,
        "guidance_scale": spec.guidance_scale,
        "width": req["resolution"],
        "height": req["resolution"],
        "output_format": "png",
        "quality": 90,
        "loras": [{"name": f"job:{run.job_id}", "scale": 1.0}],
    }
    for i, image in enumerate(images):
        items.append(
            (
                f"{i}.png",
                encoding.encode(image, made, req["seed"] + i, level),
                "image/png",
                image.size,
            )
        )
    items.append(("adapter.safetensors", adapter, "application/octet-stream", (0, 0)))
    for index, (name, data, ctype, size) in enumerate(items):
        key = storage.key(run.job_id, name)
        run.check_fence()
        storage.put(key, data, ctype)
        entry: Output = {
            "index": index,
            "key": key,
            "url": storage.url(key),
            "seed": req["seed"] + index if ctype == "image/png" else None,
            "width": size[0],
            "height": size[1],
            "content_type": ctype,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        if name == "adapter.safetensors":
            entry["adapter"] = True
        outputs.append(entry)
        run.emit(EventType.OUTPUT, {"output": entry}, outputs=list(outputs))
    return outputs


def manifest(
    run: Run,
    *,
    trainer: Trainer,
    model_source: dict[str, Any],
    versions: dict[str, str],
    image_sha256: list[str],
    outputs: list[Output],
    timings: dict[str, int],
    resumed_from: int | None,
    class_images: dict[str, int] | None = None,
) -> bytes:
    body = {
        "job_id": run.job_id,
        "kind": Kind.TRAIN.value,
        "hyperparameters": {k: v for k, v in run.request.items() if k != "images"},
        "training_images_sha256": image_sha256,
        "model": model_source,
        "edm": trainer.edm,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "loss": trainer.losses,
        "resumed_from_step": resumed_from,
        "class_images": class_images,
        "versions": versions,
        "worker": run.record["worker"],
        "attempt": run.record["attempts"],
        "timings": timings,
        "outputs": [{k: v for k, v in o.items() if k != "url"} for o in outputs],
    }
    return json.dumps(body, indent=2, sort_keys=True).encode()
