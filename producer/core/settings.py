"""Settings, read from the environment (prefix ``ATELIER_``) in this one place.

Every process builds one :class:`Settings` (``get_settings()``); tests build their own
and pass it in.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.core import keys as K
from producer.core.redis_url import check_redis_url


def _one_of(setting: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{setting} must be one of {', '.join(allowed)}")
    return value


#: The derived visibility timeout's least value: a day (leases do the prompt work).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
VISIBILITY_BACKSTOP_S = 24 * 3600
#: The longest a SigV4 presigned URL may live (S3's rule): 7 days.
SIGV4_MAX_EXPIRES_S = 7 * 24 * 3600


#: Above any CPU number Linux gives (its default NR_CPUS limit is 8192).
MAX_CPUS = 8192


def cpu_list(value: str) -> frozenset[int]:
    """A Linux CPU list (``3``, ``0,2``, ``2-3``) as a set; ValueError naming
    ATELIER_DEVICE_CPUS when it is not one."""
    cpus: set[int] = set()
    for part in (p.strip() for p in value.split(",")):
        if not part and not value.strip():
            continue
        first, sep, last = part.partition("-")
        last = last if sep else first
        if (
            not (first.isdigit() and last.isdigit())
            or int(last) < int(first)
            or int(last) >= MAX_CPUS
        ):
            raise ValueError(
                f"ATELIER_DEVICE_CPUS must be a CPU list such as 3, 0,2 or 2-3 (got {value!r})"
            )
        cpus.update(range(int(first), int(last) + 1))
    return frozenset(cpus)


def _default_models_dir() -> str:
    return str(Path.home() / ".cache" / "atelier" / "models")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATELIER_", extra="ignore")

    #: ``redis://``, ``rediss://``, ``unix://``, or ``sentinel://`` (producer/core/redis_url.py).
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Celery broker; defaults to ``redis_url``. Same forms.
    broker_url: str | None = None

    @field_validator("redis_url", "broker_url")
    @classmethod
    def _redis_urls(cls, v: str | None, info: ValidationInfo) -> str | None:
        # Checked here so that a bad URL stops the process at start, naming the setting,
        # rather than at its first connection.
        if v is not None:
            check_redis_url(v, f"ATELIER_{str(info.field_name).upper()}")
        return v

    #: ``s3://bucket/prefix`` or ``file:///path``.
    storage_url: str = "file://./atelier-output"
    s3_endpoint_url: str | None = None
    #: Presigned GET URLs for S3 outputs live this long (SigV4 allows at most 7 days);
    #: so do the signed URLs the API gives for ``file://`` outputs (up to 5 min more: they
    #: are rounded so that a record read twice gives the same URL, which browsers cache).
    presign_ttl_s: int = Field(default=24 * 3600, ge=60, le=SIGV4_MAX_EXPIRES_S)
    #: TOML file whose ``[models.NAME]`` tables add to or override the built-in registry.
    models_file: str | None = None
    default_model: str = "playground-v2.5"
    #: Where locally built models (``builtin:`` sources) are written.
    models_dir: str = Field(default_factory=_default_models_dir)
    #: ``auto`` (cuda when present, else cpu), ``cuda``, ``cuda:N``, ``cpu``.
    device: str = "auto"
    #: ``auto`` (the model's dtype on cuda, fp32 on cpu), ``fp16``, ``bf16``, ``fp32``.
    dtype: str = "auto"
    #: torch intra-op threads on the CPU (0: torch's default).
    torch_threads: int = Field(default=0, ge=0)
    #: The worker's ``sys.setswitchinterval``, in ms: how long the thread that feeds the
    #: device waits for the GIL when another thread (post-processing, Celery, the
    #: monitor) holds it. Python's default is 5 ms.
    gil_switch_interval_ms: float = Field(default=0.5, gt=0, le=100)
    #: CPUs for the thread that holds the device, e.g. ``3`` or ``2-3``: it runs there
    #: while it holds the device, every other worker thread on the worker's remaining
    #: CPUs (Linux). Empty: no pinning.
    device_cpus: str = ""
    api_keys: str = ""
    webhook_secret: str | None = None
    egress_allowlist: str = ""
    #: Default and ceiling of a job's ``timeout_s``.
    job_timeout_s: int = Field(default=600, ge=1)
    #: Default and ceiling of a training's ``timeout_s``.
    train_timeout_s: int = Field(default=4 * 3600, ge=1)
    #: A training's ``.zip`` of images: at most this many entries, and this many bytes
    #: uncompressed in all (each entry at most ``max_image_bytes``).
    train_zip_max_entries: int = Field(default=256, ge=1)
    train_zip_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    #: Runs of one job before it ends ``worker_lost``.
    max_attempts: int = Field(default=3, ge=1, le=100)
    #: Redis visibility timeout; 0 derives it (see ``effective_visibility_timeout_s``).
    visibility_timeout_s: int = Field(default=0, ge=0)
    #: Seconds between kombu's sweeps that return messages taken longer than the
    #: visibility timeout ago to their queue: the backstop behind leases.
    restore_interval_s: int = Field(default=10, ge=1)
    #: Seconds between two passes of the reconciler (one process at a time, fleet-wide):
    #: expired leases taken back, lost messages re-published, dead dispatcher consumers
    #: removed.
    reconcile_interval_s: float = Field(default=5.0, gt=0)
    #: A ``queued`` job must be at least this old before the reconciler looks for its
    #: message (a message a worker has just taken is briefly in neither place).
    reconcile_grace_s: float = Field(default=30.0, gt=0)
    #: Jobs a worker holds at once: one generates while the other is encoded and
    #: uploaded. 1 runs post-processing inline.
    worker_concurrency: int = Field(default=2, ge=1, le=8)
    #: Minimum seconds between two ``job.progress`` events of a job.
    progress_interval_s: float = Field(default=0.5, ge=0.0)
    #: Minimum seconds between two previews of a job (``preview: true``): a preview
    #: rides on a ``job.progress`` event, at most one per interval.
    preview_interval_s: float = Field(default=1.0, ge=0.0)
    #: Longest side of a preview, px (never larger than the image itself).
    preview_max_side: int = Field(default=256, ge=8, le=1024)
    #: Records and event logs of finished jobs are kept this long.
    result_ttl_s: int = Field(default=K.RESULT_TTL_S, ge=60)
    #: Largest init image accepted, encoded bytes.
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    #: Allow ``http://`` image and webhook URLs (tests, private networks).
    allow_http: bool = False
    #: Longest an init image download may take, in all.
    image_fetch_timeout_s: float = Field(default=30.0, gt=0)
    #: Seconds to keep retrying an upload before the job fails ``storage_unavailable``.
    storage_retry_s: float = Field(default=60.0, ge=0.0)
    #: PNG zlib level: 6 is Pillow's default; lower is faster and larger.
    png_compress_level: int = Field(default=6, ge=0, le=9)
    #: Host memory for recently used LoRA state dicts (MiB); 0 caches none.
    lora_cache_mb: int = Field(default=1024, ge=0)
    #: Device memory for ControlNet models a worker keeps loaded (MiB), least recently
    #: used out first; one larger than this still runs its job but is not kept.
    controlnet_cache_mb: int = Field(default=8192, ge=0)
    #: Optional safety checker: a folder or hub repo holding a diffusers
    #: StableDiffusionSafetyChecker (safetensors) and its CLIP image-processor config,
    #: or ``builtin:tiny-safety-checker``; empty: off.
    safety_checker: str = ""
    #: What becomes of a flagged image: ``blur`` (stored blurred) or ``withhold`` (not
    #: stored). A model's registry entry may override it (``safety_action``).
    safety_action: str = "blur"

    @field_validator("safety_action")
    @classmethod
    def _safety_action(cls, v: str) -> str:
        return _one_of("ATELIER_SAFETY_ACTION", v, ("blur", "withhold"))

    #: Encode and upload a job's images after releasing the GPU, so the next job
    #: generates meanwhile. false holds the GPU through post-processing too: the
    #: naive worker, kept to measure what the overlap gains (bench/duty_cycle.py).
    overlap_postprocess: bool = True
    #: Send Celery task events (``-E``) from the start. Off by default, as in Celery:
    #: Flower turns them on while it runs (its ``enable_events`` option, a remote
    #: control command every few seconds), and no one else reads them, while each job
    #: would publish three beside the GPU.
    task_events: bool = False

    # -- HTTP API ---------------------------------------------------------------------
    #: Keys that may also read ``/v1/workers`` (fleet-wide: it shows every worker's
    #: current job). Same format as ``api_keys``; each must also be in ``api_keys``.
    admin_api_keys: str = ""
    #: Requests per second each API key may make on average (0: no limit), shared by
    #: every API replica through Redis; ``rate_limit_burst`` may come at once.
    rate_limit_per_s: float = Field(default=20.0, ge=0.0)
    rate_limit_burst: int = Field(default=100, ge=1)
    #: Refuse new jobs (503, ``Retry-After``) while a model's queue holds this many
    #: messages (0: no limit).
    max_queue_depth: int = Field(default=0, ge=0)
    #: ``Retry-After`` of a refusal for a full queue.
    admission_retry_after_s: int = Field(default=10, ge=1)
    #: Largest request body accepted (a 10 MiB image as a data: URI is ~13.4 MiB).
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    #: An ``Idempotency-Key`` returns the same job for this long.
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=60)
    #: An event stream with nothing to say sends a comment this often.
    sse_heartbeat_s: float = Field(default=15.0, gt=0)
    #: Events an event stream may have waiting for its client; a client further behind
    #: (stalled) gets the end of its stream and resumes with ``Last-Event-ID``.
    sse_queue_max: int = Field(default=1000, ge=1)
    #: ``POST /v1/images/*`` (OpenAI-compatible) waits this long for its job before it
    #: answers 504 (the job goes on; ``X-Atelier-Job-Id`` names it).
    openai_wait_s: float = Field(default=300.0, gt=0)
    #: Model names OpenAI clients send, as ``alias=registry-model`` pairs, comma-separated
    #: (``gpt-image-1=playground-v2.5,dall-e-3=playground-v2.5``).
    openai_model_aliases: str = ""

    @field_validator("device_cpus")
    @classmethod
    def _device_cpus(cls, v: str) -> str:
        cpu_list(v)  # raises naming the variable
        return v

    @property
    def device_cpu_set(self) -> frozenset[int]:
        """``device_cpus`` as a set of CPU numbers (empty: no pinning)."""
        return cpu_list(self.device_cpus)

    @field_validator("openai_model_aliases")
    @classmethod
    def _aliases(cls, v: str) -> str:
        for pair in (p.strip() for p in v.split(",")):
            alias, sep, target = pair.partition("=")
            if pair and not (sep and alias.strip() and target.strip()):
                raise ValueError(
                    "ATELIER_OPENAI_MODEL_ALIASES must be comma-separated "
                    f"alias=model pairs (got {pair!r})"
                )
        return v

    @property
    def model_aliases(self) -> dict[str, str]:
        """``openai_model_aliases`` as a mapping, alias to registry model."""
        pairs = (p.partition("=") for p in self.openai_model_aliases.split(",") if p.strip())
        return {alias.strip(): target.strip() for alias, _, target in pairs}

    #: The API's address as its clients reach it (``https://atelier.example.com``), for
    #: the links it gives out; unset: the address each request came to.
    public_url: str | None = None
    #: HMAC key of the URLs at which the API serves ``file://`` outputs (at least 32
    #: characters; every replica needs the same one). Unset: a random one per process,
    #: so its URLs stop working when it restarts and on other replicas.
    file_url_secret: str | None = Field(default=None, repr=False)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        if v and not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError("ATELIER_PUBLIC_URL must be an http:// or https:// address")
        return v.rstrip("/") if v else None

    @field_validator("file_url_secret")
    @classmethod
    def _file_url_secret(cls, v: str | None) -> str | None:
        if v and len(v) < 32:
            raise ValueError("ATELIER_FILE_URL_SECRET must be at least 32 characters")
        return v or None

    # -- webhooks -----------------------------------------------------------------------
    #: Seconds to wait before each retry of a failed delivery (jitter ±20 % is added);
    #: after the last, the delivery is given up. Progress events are sent once.
    webhook_retry_schedule_s: str = "5,30,120,600,1800,7200,21600"
    webhook_connect_timeout_s: float = Field(default=5.0, gt=0)
    #: The whole response, headers and body, must arrive within this.
    webhook_read_timeout_s: float = Field(default=15.0, gt=0)
    #: Deliveries in flight at once per dispatcher.
    webhook_concurrency: int = Field(default=16, ge=1, le=256)
    #: An event a dispatcher took and has not finished for this long is taken over by
    #: another one (it must exceed connect + read timeouts).
    webhook_claim_idle_s: float = Field(default=60.0, gt=0)
    #: Worker heartbeats are written this often and expire after three periods.
    worker_heartbeat_s: float = Field(default=5.0, gt=0)

    # -- operations ---------------------------------------------------------------------
    #: The worker and the dispatcher serve Prometheus ``/metrics`` on this port when
    #: > 0 (the API serves ``/metrics`` on its own port).
    metrics_port: int = Field(default=0, ge=0, le=65535)
    #: ``text`` (human-readable lines) or ``json`` (one object per line, with the job
    #: id on every line logged while a job runs).
    log_format: str = "text"
    #: The level of every process's log (worker, API, dispatcher, CLI servers).
    log_level: str = "INFO"

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, v: str) -> str:
        return _one_of("ATELIER_LOG_FORMAT", v, ("text", "json"))

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        return _one_of("ATELIER_LOG_LEVEL", v.upper(), LOG_LEVELS)

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, v: str | None) -> str | None:
        if v is not None and v and not v.startswith("whsec_"):
            raise ValueError("ATELIER_WEBHOOK_SECRET must start with 'whsec_'")
        return v or None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return _one_of("ATELIER_DTYPE", v, ("auto", "fp16", "bf16", "fp32"))

    @field_validator("storage_url")
    @classmethod
    def _storage(cls, v: str) -> str:
        if not (v.startswith("s3://") or v.startswith("file://")):
            raise ValueError("ATELIER_STORAGE_URL must be s3://bucket/prefix or file:///path")
        return v

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _schedule(cls, v: str) -> str:
        try:
            delays = [float(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                "ATELIER_WEBHOOK_RETRY_SCHEDULE_S must be comma-separated seconds"
            ) from None
        if any(d < 0 for d in delays):
            raise ValueError("ATELIER_WEBHOOK_RETRY_SCHEDULE_S delays must be >= 0")
        return v

    @property
    def retry_schedule(self) -> list[float]:
        return [float(x) for x in self.webhook_retry_schedule_s.split(",") if x.strip()]

    @property
    def visibility_floor_s(self) -> int:
        """The longest a worker can hold a message before acknowledging it.

        A worker holds up to ``worker_concurrency`` jobs that take turns on the GPU, so
        the last can finish (concurrency × timeout) after it was taken; then its init
        image and mask fetches, and upload retries for up to 17 images (a sweep of 16 and its
        contact sheet) and the manifest.
        """
        return int(
            self.worker_concurrency * self.job_timeout_s
            + 18 * self.storage_retry_s
            + 2 * self.image_fetch_timeout_s
            + 30
        )

    @property
    def effective_visibility_timeout_s(self) -> int:
        # A message stays invisible to other workers this long after a worker takes it.
        # Leases bring a lost worker's messages back within seconds, so this is only the
        # backstop: a day by default. Below the floor, kombu hands a healthy long job's
        # message to a second worker, which drops it while the first run's lease lives.
        return self.visibility_timeout_s or max(VISIBILITY_BACKSTOP_S, self.visibility_floor_s)

    @property
    def lease_ttl_s(self) -> float:
        """A held job's lease lives this long unless its worker's heartbeat renews it."""
        return 3 * self.worker_heartbeat_s

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``: for a child process (the demo's
    worker) that reads its settings from the environment as every atelier process does."""
    return {**os.environ, **extra}


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
