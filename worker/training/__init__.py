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
from typing import Any, cast

from producer.core.contract import Kind, Status
from producer.core.errors import InternalError
from producer.core.normalized import NormalizedRequest, TrainingRequest
from producer.core.settings import Settings
from producer.jobs.store import JobStore
from worker.diffusion.pipelines import LoadedModel, library_versions
from worker.run import Run
from worker.training import checkpoints, inputs, outputs
from worker.training.classes import class_images
from worker.training.loop import Example, Trainer, latent_dist, time_ids

__all__ = ["Training"]


class Training:
    """Trainings on the process's loaded models; one instance serves every one."""

    kind = Kind.TRAIN

    def __init__(
        self,
        settings: Settings,
        models: dict[str, LoadedModel],
        store: JobStore,
        storage: Any,
        device: str = "cpu",
        generation: Any = None,
    ) -> None:
        self.settings, self.models, self.store, self.storage = settings, models, store, storage
        self.device = device
        self.versions = library_versions()

    def total(self, request: NormalizedRequest) -> int:
        return int(request["steps"])

    def prepare(self, request: NormalizedRequest) -> list[tuple[str, bytes]]:
        return inputs.fetch(cast(TrainingRequest, request), self.settings, self.store, self.storage)

    def __call__(self, run: Run, fetched: list[tuple[str, bytes]]) -> Status | None:
        req = cast(TrainingRequest, run.request)
        model = self.models.get(req["model"])
        if model is None:
            raise InternalError(f"this worker has not loaded model {req['model']!r}")
        run.stage = "training"
        t0 = time.perf_counter()
        with run.watched():
            # 1. Decode and crop the images
            instances = inputs.decode(req, fetched)
            # 2. Encode them once (the class images too); add the LoRA layers
            trainer, made = self._trainer(run, model, instances)
            try:
                # 3. Train, from the newest checkpoint of an earlier attempt if any
                resumed = self._train(run, trainer)
                train_ms = _ms(time.perf_counter() - t0)
                # 4. Save the adapter; make the validation images with it
                adapter, images = self._validate(run, trainer)
            finally:
                # 5. Restore the base exactly, whatever happened
                trainer.restore()
        run.release_device()
        run.stage = "post-processing"
        # 6. Store the outputs and the manifest; succeed
        stored = outputs.store(
            run, self.storage, adapter, images, self.settings.png_compress_level, model.spec
        )
        timings = {
            "inference_ms": train_ms,
            "validation_ms": _ms(time.perf_counter() - t0) - train_ms,
        }
        manifest = outputs.manifest(
            run,
            trainer=trainer,
            model_source=model.source,
            versions=self.versions,
            image_sha256=[i.sha256 for i in instances],
            outputs=stored,
            timings=timings,
            resumed_from=resumed,
            class_images=made,
        )
        self.storage.put(
            self.storage.key(run.job_id, "manifest.json"), manifest, "application/json"
        )
        return run.succeed(stored, timings)

    def _trainer(
        self, run: Run, model: LoadedModel, instances: list[inputs.Instance]
    ) -> tuple[Trainer, dict[str, int] | None]:
        """Step 2: the instance images (and, with prior preservation, the class images,
        made or read back) encoded once; the trainer, its LoRA layers added to the base.
        Also how many class images were made and reused (None without them)."""
        req = cast(TrainingRequest, run.request)
        examples = _examples(
            model,
            [i.image for i in instances],
            [i.caption for i in instances],
            [(i.original_size, i.crop_top_left) for i in instances],
            req["resolution"],
        )
        classes: list[Example] = []
        made: dict[str, int] | None = None
        if req["prior_preservation"]:
            images, fresh = class_images(run, model, self.storage, self.settings.png_compress_level)
            res, prompt = req["resolution"], req["class_prompt"]
            assert prompt is not None  # required with prior_preservation
            classes = _examples(
                model,
                images,
                [prompt] * len(images),
                [((res, res), (0, 0))] * len(images),
                res,
            )
            made = {"made": fresh, "reused": len(images) - fresh}
        return Trainer(model, req, examples, classes), made

    def _validate(self, run: Run, trainer: Trainer) -> tuple[bytes, list[Any]]:
        """Step 4: the adapter's bytes, and the validation images made with it."""
        req = run.request
        adapter = outputs.adapter_bytes(trainer)
        run.report(
            req["steps"],
            req["steps"],
            phase="validation",
            loss=trainer.losses[-1],
            lr=trainer.lr.get_last_lr()[0],
        )
        return adapter, outputs.validation_images(run, trainer)

    def _train(self, run: Run, trainer: Trainer) -> int | None:
        """Step 3: the optimizer steps, checkpointed; the step resumed from (None: from 0)."""
        req = run.request
        resumed = checkpoints.load(run, self.storage, trainer)
        if resumed is not None:
            with run.lock:  # written with the next progress event
                run.record = {**run.record, "resumed_from_step": resumed}
        every = req["checkpoint_every"]
        for step in range(resumed or 0, req["steps"]):
            run.check()
            loss = trainer.step(step)
            run.report(
                step + 1,
                req["steps"],
                phase="training",
                loss=round(loss, 6),
                lr=trainer.lr.get_last_lr()[0],
            )
            if (step + 1) % every == 0 and step + 1 < req["steps"]:
                checkpoints.save(run, self.storage, trainer, step + 1)
        return resumed


def _examples(
    model: LoadedModel,
    images: list[Any],
    prompts: list[str],
    sizes: list[tuple[tuple[int, int], tuple[int, int]]],
    res: int,
) -> list[Example]:
    """Images ready to train on: their latent distributions (the VAE runs once each)."""
    dists = latent_dist(model, images)
    return [
        Example(mean, std, prompt, time_ids(orig, crop, res))
        for (mean, std), prompt, (orig, crop) in zip(dists, prompts, sizes, strict=True)
    ]


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
