"""``loras: [{"name": "job:<training id>"}]``: a generation using a training's adapter.

The request's shape is checked by :mod:`producer.requests.generate`; here, against the store:
the training exists, is a training, succeeded, and (through the API) belongs to the
caller. Every refusal names its ``loras.<i>.name``.
"""

from __future__ import annotations

from producer.core.contract import Kind, Record, Status
from producer.core.errors import InvalidRequest, JobNotFound
from producer.core.normalized import GenerateRequest
from producer.jobs.store import JobStore


def check_job_loras(
    normalized: GenerateRequest,
    store: JobStore,
    owner: str | None = None,
    check_owner: bool = False,
) -> None:
    """Raise :class:`InvalidRequest` naming each ``job:`` LoRA that cannot be used."""
    errors = []
    for i, ref in enumerate(normalized.get("loras") or []):
        name, field = ref["name"], f"loras.{i}.name"
        if not name.startswith("job:"):
            continue
        job_id = name.removeprefix("job:")
        try:
            record: Record | None = store.get(job_id)
        except JobNotFound:
            record = None
        if record is None or (check_owner and record.get("owner") != owner):
            errors.append({"field": field, "message": f"no training {job_id!r}"})
        elif record.get("kind") != Kind.TRAIN:
            errors.append({"field": field, "message": f"job {job_id} is not a training"})
        elif record["status"] != Status.SUCCEEDED:
            errors.append(
                {
                    "field": field,
                    "message": f"training {job_id} is "
                    f"{record['status']}, not succeeded: it has no adapter",
                }
            )
    if errors:
        raise InvalidRequest(errors)
