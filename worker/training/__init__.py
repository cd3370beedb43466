"""Training, the work of a ``train`` job (DreamBooth LoRA): the stages the lifecycle
drives.

Before the device, :meth:`Training.prepare` fetches the instance images
(``inputs.fetch``). Then :meth:`Training.__call__`, holding the device:

1. Decode and crop the images to ``resolution`` (``inputs.decode``).
2. Encode them once with the VAE; add the LoRA layers to the loaded base (``loop``).
3. Train: ``steps`` optimizer steps, progress ``{step, total, phase, loss, lr}`` and
   cancel, deadline and fence checked at every one.
4. Save the adapter; make the validation images with it.
5. Restore the base exactly (adapters unloaded), release the device.
6. Store the outputs and the manifest; succeed.
"""

from __future__ import annotations

import time
from typing import Any

from producer.contract import Status
from producer.errors import InternalError
from producer.settings import Settings
from producer.store import JobStore
from worker.lifecycle import TRAIN
from worker.pipelines import LoadedModel, library_versions
from worker.run import Run
from worker.training import checkpoints, inputs, outputs
from worker.training.loop import Example, Trainer, latent_dist, time_ids

__all__ = ["Training"]


class Training:
    """Trainings on the process's loaded models; one instance serves every one."""

    kind = TRAIN

    def __init__(self, settings: Settings, models: dict[str, LoadedModel], store: JobStore,
                 storage: Any, device: str = "cpu", generation: Any = None) -> None:
        self.settings, self.models, self.store, self.storage = settings, models, store, storage
        self.device = device
        self.versions = library_versions()

    def total(self, request: dict[str, Any]) -> int:
        return int(request["steps"])

    def prepare(self, request: dict[str, Any]) -> list[tuple[str, bytes]]:
        return inputs.fetch(request, self.settings, self.store, self.storage)

    def __call__(self, run: Run, fetched: list[tuple[str, bytes]]) -> Status | None:
        req = run.request
        model = self.models.get(req["model"])
        if model is None:
            raise InternalError(f"this worker has not loaded model {req['model']!r}")
        run.stage = "training"
        t0 = time.perf_counter()
        # 1-2. Decode, encode once, add the LoRA layers.
        instances = inputs.decode(req, fetched)
        examples = [Example(mean, std, inst.caption,
                            time_ids(inst.original_size, inst.crop_top_left, req["resolution"]))
                    for inst, (mean, std) in zip(
                        instances, latent_dist(model, [i.image for i in instances]), strict=True)]
        trainer = Trainer(model, req, examples)
        try:
            # 3. Train, from the newest checkpoint of an earlier attempt if there is one.
            resumed = checkpoints.load(run, self.storage, trainer)
            if resumed is not None:
                with run.lock:  # written with the next progress event
                    run.record = dict(run.record, resumed_from_step=resumed)
            every = req["checkpoint_every"]
            with run.watched():
                for step in range(resumed or 0, req["steps"]):
                    run.check()
                    loss = trainer.step(step)
                    run.report(step + 1, req["steps"], phase="training", loss=round(loss, 6),
                               lr=trainer.lr.get_last_lr()[0])
                    if (step + 1) % every == 0 and step + 1 < req["steps"]:
                        checkpoints.save(run, self.storage, trainer, step + 1)
                train_ms = _ms(time.perf_counter() - t0)
                # 4. The adapter, and validation images made with it.
                adapter = outputs.adapter_bytes(trainer)
                run.report(req["steps"], req["steps"], phase="validation",
                           loss=trainer.losses[-1], lr=trainer.lr.get_last_lr()[0])
                images = outputs.validation_images(run, trainer)
        finally:
            # 5. The base as it was, whatever happened.
            trainer.restore()
        run.release_device()
        run.stage = "post-processing"
        # 6. Outputs and manifest.
        stored = outputs.store(run, self.storage, adapter, images,
                               self.settings.png_compress_level, model.spec)
        timings = {"inference_ms": train_ms,
                   "validation_ms": _ms(time.perf_counter() - t0) - train_ms}
        manifest = outputs.manifest(
            run, trainer=trainer, model_source=model.source, versions=self.versions,
            image_sha256=[i.sha256 for i in instances], outputs=stored, timings=timings,
            resumed_from=resumed)
        self.storage.put(self.storage.key(run.job_id, "manifest.json"), manifest,
                         "application/json")
        return run.succeed(stored, timings)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
