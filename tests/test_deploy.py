"""The deploy files checked against the code: docker-compose.yml, the Dockerfiles and the
Kubernetes manifests in deploy/k8s (Docker and a cluster cannot run here, so these read
the files), and the Redis lists KEDA scales on, against a real redis-server and worker.
"""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from producer.core import keys as K
from producer.core.redis_url import is_sentinel, parse_sentinel_url
from producer.core.settings import Settings
from producer.jobs.broker import queue_depth
from tests.helpers import settings_env, wait_until, worker_env
from tests.servers import ROOT, RedisServer, Worker

COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
API_DOCKERFILE = ROOT / "deploy" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "deploy" / "worker.Dockerfile"
#: What only the worker extra may bring in; the light image must have none of it.
HEAVY = {"torch", "diffusers", "transformers", "accelerate", "safetensors", "peft"}


# -- reading the files ------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves <<: merge keys
    return doc


def services() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = compose()["services"]
    return out


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", …] form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d.get("kind") == kind}


def config_sources() -> dict[tuple[str, str], dict[str, str]]:
    """ConfigMaps and Secrets by (kind, name), their data as strings."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for name, cm in of_kind("ConfigMap").items():
        out[("ConfigMap", name)] = {k: str(v) for k, v in (cm.get("data") or {}).items()}
    for name, secret in of_kind("Secret").items():
        out[("Secret", name)] = {k: str(v) for k, v in (secret.get("stringData") or {}).items()}
    return out


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """What a container sees: envFrom sources (which must exist), then env."""
    sources = config_sources()
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        kind, ref = (
            ("ConfigMap", src["configMapRef"])
            if "configMapRef" in src
            else ("Secret", src["secretRef"])
        )
        assert (kind, ref["name"]) in sources, f"{container['name']}: no {kind} {ref['name']}"
        env.update(sources[(kind, ref["name"])])
    for item in container.get("env") or []:
        env[item["name"]] = str(item["value"])
    return env


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings a process with exactly ``env`` would build (ATELIER_* only)."""
    values: dict[str, Any] = {
        k.removeprefix("ATELIER_").lower(): v for k, v in env.items() if k.startswith("ATELIER_")
    }
    return Settings(**values)


def deployments() -> dict[str, dict[str, Any]]:
    return of_kind("Deployment")


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def arg_after(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def duration_s(text: str | int) -> float:
    """A compose duration (``1260s``, ``21m``, ``1h2m3s``) in seconds."""
    if isinstance(text, int):
        return float(text)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?", text.strip())
    assert parts and any(parts.groups()), f"not a duration: {text!r}"
    h, m, s = (int(x or 0) for x in parts.groups())
    return float(h * 3600 + m * 60 + s)


def port_of(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    assert port in named, f"no container port named {port!r}"
    return int(named[port])


# -- settings names -----------------------------------------------------------------------


def all_atelier_env() -> list[tuple[str, str]]:
    """(where, NAME) for every ATELIER_* name the deploy files set."""
    found = [(f"compose {n}", k) for n, svc in services().items() for k in service_env(svc)]
    for (kind, name), data in config_sources().items():
        found += [(f"{kind} {name}", k) for k in data]
    for name, dep in deployments().items():
        found += [(f"Deployment {name}", e["name"]) for e in only_container(dep).get("env") or []]
    for path in (API_DOCKERFILE, WORKER_DOCKERFILE):
        found += [(path.name, k) for k in re.findall(r"\b(ATELIER_[A-Z0-9_]+)=", path.read_text())]
    found += [(f"compose {COMPOSE.name} x-", k) for k in compose().get("x-atelier-env", {})]
    return [(where, k) for where, k in found if k.startswith("ATELIER_")]


def test_every_atelier_env_name_is_a_setting() -> None:
    names = all_atelier_env()
    assert len(names) > 20  # the files were read
    fields = set(Settings.model_fields)
    unknown = [(where, k) for where, k in names if k.removeprefix("ATELIER_").lower() not in fields]
    assert not unknown, f"not Settings fields: {unknown}"


def test_every_service_env_is_valid_settings() -> None:
    checked = 0
    for svc in services().values():
        env = service_env(svc)
        if any(k.startswith("ATELIER_") for k in env):
            settings_from(env)  # raises, naming the field, if a value is refused
            checked += 1
    for dep in deployments().values():
        settings_from(container_env(only_container(dep)))
        checked += 1
    assert checked >= 6


# -- docker-compose.yml -----------------------------------------------------------------------


def test_compose_api_port_lines_up() -> None:
    api = services()["api"]
    port = int(arg_after(api["command"], "--port"))
    assert arg_after(api["command"], "--host") == "0.0.0.0"  # reachable from outside
    container_ports = {int(str(p).rsplit(":", 1)[1]) for p in api["ports"]}
    assert port in container_ports
    assert f":{port}/readyz" in " ".join(api["healthcheck"]["test"])


def test_compose_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    used = set()
    for svc in services().values():
        for v in svc.get("volumes") or []:
            source = v.split(":", 1)[0] if isinstance(v, str) else v.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                used.add(source)
    assert used, "no named volume found"
    assert used <= declared, f"undeclared volumes: {used - declared}"


def test_compose_depends_on() -> None:
    svcs = services()
    seen = set()
    for name, svc in svcs.items():
        for target, cond in (svc.get("depends_on") or {}).items():
            assert target in svcs, f"{name} depends on unknown {target}"
            condition = cond["condition"]
            seen.add(condition)
            if condition == "service_healthy":
                assert "healthcheck" in svcs[target], f"{name} waits for {target}'s health"
            elif condition == "service_completed_successfully":
                assert "healthcheck" not in svcs[target] and not svcs[target].get("restart")
            else:
                pytest.fail(f"{name}: depends_on {target} with {condition}")
    assert seen == {"service_healthy", "service_completed_successfully"}
    # Each long-running atelier process waits for a healthy Redis.
    for name in ("api", "dispatcher", "worker"):
        assert svcs[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "healthcheck" in svcs[name]


def test_compose_redis_keeps_jobs() -> None:
    cmd = services()["redis"]["command"]
    assert arg_after(cmd, "--appendonly") == "yes"
    assert arg_after(cmd, "--appendfsync") == "everysec"
    assert arg_after(cmd, "--maxmemory-policy") == "noeviction"
    # Every atelier process points at this Redis.
    for name in ("api", "dispatcher", "worker"):
        assert urlsplit(service_env(services()[name])["ATELIER_REDIS_URL"]).hostname == "redis"


def test_compose_worker_gpu_and_grace_period() -> None:
    worker = services()["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("count", 0) >= 1 for d in devices)
    env = service_env(worker)
    assert env["ATELIER_DEVICE"].startswith("cuda")
    floor = settings_from(env).visibility_floor_s
    assert duration_s(worker["stop_grace_period"]) >= floor
    model = arg_after(worker["command"], "--model")
    assert model == env["ATELIER_DEFAULT_MODEL"]
    assert worker["build"]["dockerfile"] == "deploy/worker.Dockerfile"


def test_compose_images_by_role() -> None:
    svcs = services()
    for name in ("api", "dispatcher"):
        assert svcs[name]["build"]["dockerfile"] == "deploy/api.Dockerfile"
    assert svcs["dispatcher"]["command"] == ["atelier", "dispatcher"]
    flower = svcs["flower"]
    assert flower["profiles"] == ["ops"]
    broker = arg_after([a for arg in flower["command"] for a in arg.split("=", 1)], "--broker")
    assert broker == service_env(svcs["worker"])["ATELIER_REDIS_URL"]


def compose_command() -> list[str] | None:
    """``docker compose`` (the plugin), else the standalone ``docker-compose``; neither
    needs a Docker engine to validate a file against the compose schema."""
    docker = shutil.which("docker")
    if (
        docker is not None
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_compose_config_validates() -> None:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    res = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "--profile", "ops", "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr


# -- images ---------------------------------------------------------------------------------


def _pip_installs(dockerfile: Path) -> list[str]:
    """Every ``pip install …`` command of the file's RUN lines."""
    text = dockerfile.read_text().replace("\\\n", " ")
    runs = [line.strip() for line in text.splitlines() if line.strip().startswith("RUN ")]
    return [
        cmd.strip() for run in runs for cmd in re.split(r"&&|;", run[4:]) if "pip install" in cmd
    ]


def test_api_image_installs_no_torch() -> None:
    installs = _pip_installs(API_DOCKERFILE)
    assert installs == ["pip install ."], installs  # the package, no extra
    assert "FROM python:3.11-slim" in API_DOCKERFILE.read_text()
    # …and the package's own dependencies bring none of it either.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert not deps & HEAVY, deps & HEAVY
    assert HEAVY - {"safetensors", "accelerate"} <= {
        re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower()
        for d in project["optional-dependencies"]["worker"]
    }


def test_worker_image_on_cuda_keeps_base_torch() -> None:
    text = WORKER_DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", text, re.M)
    assert base and "cuda" in base.group(1)
    assert _pip_installs(WORKER_DOCKERFILE) == ['pip install ".[worker]" "torch==${TORCH}"']
    assert "HF_HOME=/models" in text and 'VOLUME ["/models"]' in text
    assert services()["worker"]["volumes"] == ["hf-cache:/models"]


@pytest.mark.parametrize("dockerfile", [API_DOCKERFILE, WORKER_DOCKERFILE])
def test_images_run_as_non_root(dockerfile: Path) -> None:
    users = re.findall(r"^USER (\S+)", dockerfile.read_text(), re.M)
    assert users and users[-1] not in {"0", "root"}


def test_dockerignore_keeps_the_venv_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# -- Kubernetes ---------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    for _, doc in manifests():
        assert "namespace" not in doc.get("metadata", {}), "manifests are namespace-agnostic"


def test_k8s_api_ports_line_up() -> None:
    dep = deployments()["atelier-api"]
    c = only_container(dep)
    port = int(arg_after(c["command"], "--port"))
    assert arg_after(c["command"], "--host") == "0.0.0.0"
    assert port in {p["containerPort"] for p in c["ports"]}
    assert port_of(c, c["readinessProbe"]["httpGet"]["port"]) == port
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert port_of(c, c["livenessProbe"]["httpGet"]["port"]) == port
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    svc = of_kind("Service")["atelier-api"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert [port_of(c, p["targetPort"]) for p in svc["spec"]["ports"]] == [port]
    assert int(dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == port


def test_k8s_metrics_ports() -> None:
    expected = {"atelier-dispatcher": 9101}
    expected.update({n: 9100 for n in deployments() if n.startswith("atelier-worker-")})
    assert len(expected) >= 2
    for name, port in expected.items():
        dep = deployments()[name]
        c = only_container(dep)
        assert settings_from(container_env(c)).metrics_port == port
        assert port in {p["containerPort"] for p in c["ports"]}
        assert int(dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == port


def worker_deployments() -> dict[str, dict[str, Any]]:
    out = {n: d for n, d in deployments().items() if n.startswith("atelier-worker-")}
    assert out, "no worker Deployment"
    return out


def test_k8s_workers_gpu_and_grace_period() -> None:
    for name, dep in worker_deployments().items():
        spec = dep["spec"]["template"]["spec"]
        c = only_container(dep)
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        env = container_env(c)
        settings = settings_from(env)
        assert settings.device.startswith("cuda")
        assert spec["terminationGracePeriodSeconds"] >= settings.visibility_floor_s, name
        model = arg_after(c["command"], "--model")
        assert dep["metadata"]["labels"]["atelier.dev/model"] == model
        assert "livenessProbe" not in c  # a long job must not restart its worker
        assert "--host" in " ".join(c["readinessProbe"]["exec"]["command"])
        # KEDA owns the replica count: a re-apply must not reset it.
        assert "replicas" not in dep["spec"]


def redis_target(env: dict[str, str]) -> tuple[str, int, int, str | None]:
    """(host, port, db, password) of the broker a worker with ``env`` uses."""
    url = settings_from(env).effective_broker_url
    if is_sentinel(url):
        s = parse_sentinel_url(url)
        return s.sentinels[0][0], s.sentinels[0][1], s.db, s.password
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    return parts.hostname or "", parts.port or 6379, db, parts.password


def test_scaled_objects_sum_the_model_queue() -> None:
    scaled = of_kind("ScaledObject")
    workers = worker_deployments()
    assert set(scaled) == set(workers), "one ScaledObject per worker Deployment"
    auths = of_kind("TriggerAuthentication")
    secrets = {name: data for (kind, name), data in config_sources().items() if kind == "Secret"}
    for so in scaled.values():
        spec = so["spec"]
        dep = workers[spec["scaleTargetRef"]["name"]]
        c = only_container(dep)
        model = arg_after(c["command"], "--model")
        triggers = spec["triggers"]
        # The ten lists of the model's Celery queue (a training worker: of its trainings'
        # queue, atelier.train.<model>), each exactly once.
        lane = K.lane(model, "train" if "--train" in c["command"] else "generate")
        assert [t["metadata"]["listName"] for t in triggers] == K.queue_keys(lane)
        assert spec["minReplicaCount"] == 0
        assert spec["maxReplicaCount"] >= 1
        mods = spec["advanced"]["scalingModifiers"]
        names = [t["name"] for t in triggers]
        assert len(set(names)) == len(names) == 10
        terms = [t.strip() for t in mods["formula"].split("+")]
        assert sorted(terms) == sorted(names), "the formula must be the plain sum"
        assert mods["metricType"] == "AverageValue"
        assert int(mods["target"]) >= 1 and int(mods["activationTarget"]) == 0
        # Every trigger reads the Redis the worker's broker URL names.
        env = container_env(c)
        host, port, db, password = redis_target(env)
        kind = "redis-sentinel" if is_sentinel(settings_from(env).effective_broker_url) else "redis"
        # The CRD types these as strings (trigger metadata is a map of strings).
        assert all(isinstance(mods[k], str) for k in ("formula", "target", "activationTarget"))
        for t in triggers:
            assert all(isinstance(v, str) for v in t["metadata"].values()), t["metadata"]
            assert t["type"] == kind
            # redis: the server; redis-sentinel: the Sentinels (the URL's first among them)
            addresses = t["metadata"].get("address") or t["metadata"]["addresses"]
            assert f"{host}:{port}" in addresses.split(",")
            assert int(t["metadata"].get("databaseIndex", 0)) == db
            auth = auths[t["authenticationRef"]["name"]]
            refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
            if password is not None:
                ref = refs["password"]
                assert secrets[ref["name"]][ref["key"]] == password


# -- the key KEDA reads holds the queued jobs (real redis-server, real worker) ----------------

KEDA_MODEL = "playground-v2.5"
# The example model's name with tiny weights: a worker that serves the very queue the
# manifest names, on the CPU.
TINY_AS_KEDA_MODEL = f"""
[models."{KEDA_MODEL}"]
source = "builtin:tiny-sdxl"
dtype = "fp32"
scheduler = "euler"
schedulers = ["euler"]
steps = 2
guidance_scale = 5.0
width = 64
height = 64
max_side = 512
max_pixels = 262144
"""


def scaled_object_lists(model: str) -> list[str]:
    for so in of_kind("ScaledObject").values():
        dep = deployments()[so["spec"]["scaleTargetRef"]["name"]]
        if arg_after(only_container(dep)["command"], "--model") == model:
            return [t["metadata"]["listName"] for t in so["spec"]["triggers"]]
    raise AssertionError(f"no ScaledObject for {model}")


@pytest.fixture
def keda_stack(tmp_path: Path, models_dir: Path) -> Iterator[tuple[RedisServer, dict[str, Any]]]:
    """A private Redis, and settings for a worker serving the example model's queue."""
    models_file = tmp_path / "models.toml"
    models_file.write_text(TINY_AS_KEDA_MODEL)
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield (
            server,
            {
                "redis_url": server.url,
                "storage_url": f"file://{tmp_path / 'out'}",
                "models_file": str(models_file),
                "models_dir": str(models_dir),
                "default_model": KEDA_MODEL,
                "device": "cpu",
                "torch_threads": 1,
            },
        )
    finally:
        server.stop()


@pytest.mark.slow
def test_keda_lists_hold_exactly_the_queued_jobs(
    tmp_path: Path, keda_stack: tuple[RedisServer, dict[str, Any]]
) -> None:
    lists = scaled_object_lists(KEDA_MODEL)
    server, base = keda_stack
    worker = None
    try:
        values = {**base, "job_timeout_s": 60, "restore_interval_s": 1}
        settings = Settings(**values)
        r = redis.Redis.from_url(server.url)

        def lengths() -> list[int]:
            return [int(r.llen(k)) for k in lists]

        from producer import Client

        priorities = [p % 10 for p in range(23)]  # every priority, some twice or thrice
        with Client(settings) as client:
            ids = [
                client.submit(prompt=f"job {i}", priority=p, seed=i)
                for i, p in enumerate(priorities)
            ]
            # No worker yet: every job waits in exactly one of the lists KEDA reads, the
            # one of its priority (list i holds atelier priority 9 - i).
            assert sum(lengths()) == len(ids) == queue_depth(r, KEDA_MODEL)
            assert lengths() == [priorities.count(9 - i) for i in range(10)]
            # Nothing else of the model's queue is anywhere else KEDA does not look.
            keys: Any = r.keys(f"{K.queue_name(KEDA_MODEL)}*")
            assert not [k for k in keys if k.decode() not in lists]

            worker = Worker(worker_env(values), tmp_path / "worker.log", [KEDA_MODEL])
            worker.start()
            samples = [sum(lengths())]

            def drained() -> bool:
                samples.append(sum(lengths()))
                return samples[-1] == 0

            if samples[-1]:
                wait_until(drained, 180, interval=0.1, message=lambda: f"{samples[-20:]} drain")
            # Taken messages leave the lists (they sit in kombu's unacked hash while the
            # job runs): the sum drains to zero, never rising, as the worker takes them.
            assert samples[-1] == 0, samples[-20:]
            assert all(a >= b for a, b in itertools.pairwise(samples))
            records = [client.wait(i, timeout=180) for i in ids]
        assert {rec["status"] for rec in records} == {"succeeded"}
        assert sum(lengths()) == 0 == queue_depth(r, KEDA_MODEL)
    finally:
        if worker is not None:
            worker.stop()


def test_settings_env_round_trip() -> None:
    # settings_from reads what settings_env writes: the helper above is sound.
    env = settings_env(job_timeout_s=123, worker_concurrency=3, metrics_port=9100)
    s = settings_from(env)
    assert (s.job_timeout_s, s.worker_concurrency, s.metrics_port) == (123, 3, 9100)


@pytest.mark.slow
def test_sigterm_lets_the_running_job_finish(
    tmp_path: Path, keda_stack: tuple[RedisServer, dict[str, Any]]
) -> None:
    """What the grace periods rely on: SIGTERM (compose stop, a pod's termination) lets
    the job a worker is running finish and be stored, takes no new one, and exits."""
    server, base = keda_stack
    worker = None
    try:
        values = {**base, "job_timeout_s": 120, "worker_concurrency": 1, "progress_interval_s": 0.1}
        settings = Settings(**values)
        worker = Worker(worker_env(values), tmp_path / "worker.log", [KEDA_MODEL])
        worker.start()
        from producer import Client

        with Client(settings) as client:
            long_job = client.submit(prompt="a long one", steps=60, seed=1)
            waiting = client.submit(prompt="waits its turn", steps=2, seed=2)
            for event in client.events(long_job):
                if event["type"] == "job.progress":  # generating now
                    break
            assert worker.proc is not None
            worker.proc.send_signal(signal.SIGTERM)
            assert worker.proc.wait(timeout=120) == 0
            done = client.get(long_job)
            assert done["status"] == "succeeded" and done["attempts"] == 1
            assert Path(tmp_path / "out" / done["outputs"][0]["key"]).is_file()
            # The job it had not taken is still queued, in the lists KEDA reads.
            assert client.get(waiting)["status"] == "queued"
            r = redis.Redis.from_url(server.url)
            assert queue_depth(r, KEDA_MODEL) == 1
            assert sum(int(r.llen(k)) for k in scaled_object_lists(KEDA_MODEL)) == 1
        assert "Warm shutdown" in worker.log()
    finally:
        if worker is not None:
            worker.stop()
