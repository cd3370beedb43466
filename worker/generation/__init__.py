"""Generation, the work of a ``generate`` job: the stages the lifecycle drives.

Before the GPU, :meth:`Generation.prepare` fetches the input images (``inputs.fetch``).
Then :meth:`Generation.__call__`, holding the GPU:

1. Decode the inputs: the init image and mask at the output size (``inputs.decode``).
2. Generate: the pipeline call, progress and cancel through the run (``generate``).
3. Check safety: flag images, to be blurred or withheld (``outputs.check_safety``).
4. Release the GPU, so the next job generates while this one is post-processed
   (``ATELIER_OVERLAP_POSTPROCESS=false`` keeps it through 5-7: for comparison only).
5. Encode and upload every image, a ``job.output`` event each (``outputs.store_images``;
   the last one's goes with step 7's write).
6. Write the manifest (``outputs.manifest``).
7. Succeed: one compare-and-set that only this run's token can make.
"""

from __future__ import annotations

import time
from typing import Any, cast

from producer.core.contract import Kind, Output, Status, denoise_steps
from producer.core.errors import InternalError
from producer.core.normalized import GenerateRequest, NormalizedRequest
from producer.core.settings import Settings
from producer.core.storage import LocalStorage, S3Storage
from producer.jobs.store import JobStore
from worker.diffusion.loras import LoraCache
from worker.diffusion.pipelines import LoadedModel, library_versions
from worker.diffusion.safety import SafetyChecker
from worker.generation import inputs, outputs
from worker.generation.conditioning import Conditioning
from worker.generation.generate import generate
from worker.run import Run

__all__ = ["Generation"]


class Generation:
    """The process's models and what their jobs need beside them (storage, LoRAs, the
    safety checker); one instance serves every generation job."""

    kind = Kind.GENERATE

    def __init__(
        self,
        settings: Settings,
        models: dict[str, LoadedModel],
        store: JobStore,
        storage: LocalStorage | S3Storage,
        loras: LoraCache | None = None,
        safety: SafetyChecker | None = None,
        conditioning: Conditioning | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.store = store  # inline input images
        self.storage = storage
        self.safety = safety
        self.versions = library_versions()
        self._loras = loras
        self._conditioning = conditioning

    @property
    def loras(self) -> LoraCache:
        if self._loras is None:
            from producer.core.registry import Registry

            self._loras = LoraCache(
                self.settings, Registry.load(self.settings.models_file), self.storage
            )
        return self._loras

    @property
    def conditioning(self) -> Conditioning:
        """ControlNets and IP-Adapters, made on the first job that uses them."""
        if self._conditioning is None:
            from producer.core.registry import Registry

            self._conditioning = Conditioning(
                self.settings, Registry.load(self.settings.models_file)
            )
        return self._conditioning

    def total(self, request: NormalizedRequest) -> int:
        return denoise_steps(cast(GenerateRequest, request))

    def prepare(self, request: NormalizedRequest) -> inputs.Fetched | None:
        # Before the GPU: a slow image server delays only this job, while the other
        # slot's job keeps the GPU busy.
        return inputs.fetch(cast(GenerateRequest, request), self.settings, self.store)

    def __call__(self, run: Run, fetched: inputs.Fetched | None) -> Status | None:
        req = cast(GenerateRequest, run.request)
        model = self.models.get(req["model"])
        if model is None:  # the queue name guarantees this; a broken deployment may not
            raise InternalError(f"this worker has not loaded model {req['model']!r}")
        run.stage = "generation"
        t0 = time.perf_counter()

        # 1. Decode the inputs
        decoded = inputs.decode(req, fetched)

        # 2. Generate
        images = self._generate(run, model, decoded)

        # 3. Check safety
        action = model.spec.safety_action or self.settings.safety_action
        verdicts = outputs.check_safety(self.safety, action, images)
        inference_ms = _ms(time.perf_counter() - t0)

        # 4. Release the GPU
        self._release_device(run)

        # 5. Encode and upload every image
        stored, encode_s, upload_s = outputs.store_images(
            run,
            self.storage,
            outputs.items(req, images, verdicts),
            self.settings.png_compress_level,
        )

        # 6. Write the manifest
        timings = {"inference_ms": inference_ms, "encode_ms": _ms(encode_s)}
        manifest_s = self._write_manifest(run, model, decoded, verdicts, stored, timings)
        timings["upload_ms"] = _ms(upload_s + manifest_s)

        # 7. Succeed
        return run.succeed(stored, timings, events=outputs.last_event(stored))

    def _generate(self, run: Run, model: LoadedModel, decoded: inputs.Inputs) -> list[Any]:
        """Step 2: the pipeline call (with the job's LoRAs, ControlNets and IP-Adapters),
        progress and cancel through the run."""
        req = run.request
        conditioned = req.get("control") or req.get("references")
        images = generate(
            run,
            model,
            decoded,
            self.loras if req.get("loras") else None,
            self.settings.preview_max_side,
            self.conditioning if conditioned else None,
        )
        run.check_deadline()  # the VAE decode ran past it
        return images

    def _release_device(self, run: Run) -> None:
        """Step 4. The deliberate oddity: with overlap (the default) the steps after this
        run while the other slot's job generates; the naive worker
        (ATELIER_OVERLAP_POSTPROCESS=false, bench/duty_cycle.py's baseline) keeps the GPU
        waiting through them, to measure what the overlap saves."""
        if self.settings.overlap_postprocess:
            run.release_device()
        run.stage = "post-processing"

    def _write_manifest(
        self,
        run: Run,
        model: LoadedModel,
        decoded: inputs.Inputs,
        verdicts: outputs.Verdicts | None,
        stored: list[Output],
        timings: dict[str, int],
    ) -> float:
        """Step 6: ``manifest.json`` beside the images; returns the seconds it took."""
        t0 = time.perf_counter()
        manifest = outputs.manifest(
            run,
            model_source=model.source,
            versions=self.versions,
            worker=run.record["worker"],
            checker=self.settings.safety_checker,
            inputs=decoded,
            verdicts=verdicts,
            outputs=stored,
            timings=timings,
        )
        run.check_fence()  # the manifest names this run's attempt: never the winner's
        self.storage.put(
            self.storage.key(run.job_id, "manifest.json"), manifest, "application/json"
        )
        return time.perf_counter() - t0


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
