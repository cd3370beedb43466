"""The deploy files checked against the code and by the tools that read them:
docker-compose.yml, the Dockerfiles and the Kubernetes manifests in deploy/k8s (Docker and
a cluster cannot run here). docker-compose checks the compose file against the compose
schema, kubernetes-validate the core kinds against Kubernetes' schemas, jsonschema the
KEDA objects against KEDA's CRDs. tests/test_deploy_processes.py runs what they rely on.
"""

from __future__ import annotations

import copy
import hashlib
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from producer.core import keys as K
from producer.core.contract import Kind
from producer.core.redis_url import is_sentinel
from producer.core.settings import Settings
from tests.deploy_files import (
    API_DOCKERFILE,
    COMPOSE,
    K8S,
    KEDA_CRDS,
    KUBERNETES_VERSION,
    WORKER_DOCKERFILE,
    arg_after,
    compose,
    compose_config,
    compose_or_skip,
    config_sources,
    container_env,
    core_kinds,
    deployments,
    duration_s,
    is_keda,
    keda_errors,
    kubernetes_validate,
    manifests,
    of_kind,
    only_container,
    port_of,
    redis_target,
    service_env,
    services,
    settings_from,
    worker_deployments,
)
from tests.helpers import settings_env
from tests.servers import ROOT

#: What only the worker extra may bring in; the light image must have none of it.
HEAVY = {"torch", "diffusers", "transformers", "accelerate", "safetensors", "peft"}


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
        lane = K.lane(model, Kind.TRAIN if "--train" in c["command"] else Kind.GENERATE)
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


def test_settings_env_round_trip() -> None:
    # settings_from reads what settings_env writes: the helper above is sound.
    env = settings_env(job_timeout_s=123, worker_concurrency=3, metrics_port=9100)
    s = settings_from(env)
    assert (s.job_timeout_s, s.worker_concurrency, s.metrics_port) == (123, 3, 9100)


# -- checked by the tools -------------------------------------------------------------------


def test_compose_config_validates() -> None:
    res = compose_config(compose_or_skip(), COMPOSE)
    assert res.returncode == 0, res.stderr


def test_compose_config_refuses_a_broken_copy(tmp_path: Path) -> None:
    text = COMPOSE.read_text()
    assert "\nservices:\n" in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace("\nservices:\n", "\nservices:\n  bogus:\n    imagee: x\n", 1))
    res = compose_config(compose_or_skip(), broken)
    assert res.returncode != 0 and "imagee" in res.stderr, res.stderr


def test_k8s_core_kinds_validate() -> None:
    res = kubernetes_validate(*sorted(K8S.glob("*.yaml")))
    assert res.returncode == 0, res.stdout + res.stderr
    version = re.escape(KUBERNETES_VERSION.rsplit(".", 1)[0])
    passed = re.findall(
        rf"passed for resource (\S+)/(\S+) against version {version}$", res.stdout, re.M
    )
    expected = [(d["kind"].lower(), d["metadata"]["name"]) for d in core_kinds()]
    assert len(expected) >= 7 and sorted(passed) == sorted(expected), res.stdout
    # what it has no schema for: KEDA's kinds (checked below) and kustomize's
    unknown = set(re.findall(r"Couldn't find schema for kind (\S+)", res.stdout))
    assert unknown <= {d["kind"] for _, d in manifests() if is_keda(d)} | {"Kustomization"}


def _unknown_field(c: dict[str, Any]) -> None:
    c["imagePullPolicyy"] = "Always"


def _port_as_string(c: dict[str, Any]) -> None:
    c["ports"][0]["containerPort"] = str(c["ports"][0]["containerPort"])


@pytest.mark.parametrize(
    ("break_it", "message"),
    [(_unknown_field, "imagePullPolicyy"), (_port_as_string, "is not of type 'integer'")],
)
def test_kubernetes_validate_refuses_a_broken_copy(
    tmp_path: Path, break_it: Callable[[dict[str, Any]], None], message: str
) -> None:
    docs = list(yaml.safe_load_all((K8S / "api.yaml").read_text()))
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    break_it(dep["spec"]["template"]["spec"]["containers"][0])
    broken = tmp_path / "api.yaml"
    broken.write_text(yaml.safe_dump_all(docs))
    res = kubernetes_validate(broken)
    assert res.returncode != 0, res.stdout
    assert "did not validate for resource deployment/atelier-api" in res.stdout
    assert message in res.stdout, res.stdout


#: The CEL rules (x-kubernetes-validations) of KEDA's CRDs, which jsonschema cannot run:
#: each is checked by hand in test_keda_objects_validate; a new one fails it until it is.
MIN_LE_MAX = (
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount)"
    " ? self.maxReplicaCount : 100)"
)


def test_keda_objects_validate() -> None:
    keda = [(path, d) for path, d in manifests() if is_keda(d)]
    assert {d["kind"] for _, d in keda} >= {"ScaledObject", "TriggerAuthentication"}
    rules: list[str] = []
    for path, doc in keda:
        assert keda_errors(doc, rules) == [], f"{path.name}: {doc['kind']}"
    assert set(rules) == {MIN_LE_MAX}, "KEDA's CRDs have a new CEL rule: check it here"
    for so in of_kind("ScaledObject").values():
        assert so["spec"].get("minReplicaCount", 0) <= so["spec"].get("maxReplicaCount", 100)


def test_keda_crds_are_kedas() -> None:
    """The CRD files are byte for byte the release's: their git blob ids are the ones the
    README there lists (``git rev-parse <tag>:<path>`` in KEDA's repository)."""
    readme = (KEDA_CRDS / "README.md").read_text()
    crds = sorted(KEDA_CRDS.glob("*.yaml"))
    assert len(crds) >= 2
    for path in crds:
        data = path.read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert f"`{blob}`" in readme and path.name in readme, path.name


def _so(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]


BROKEN_KEDA: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("ScaledObject", lambda d: _so(d).update(minReplicas=0), "'minReplicas' was unexpected"),
    ("ScaledObject", lambda d: _so(d).pop("scaleTargetRef"), "'scaleTargetRef' is a required"),
    (
        "ScaledObject",  # trigger metadata is a map of strings
        lambda d: _so(d)["triggers"][0]["metadata"].update(databaseIndex=0),
        "spec.triggers.0.metadata.databaseIndex: 0 is not of type 'string'",
    ),
    (
        "TriggerAuthentication",
        lambda d: _so(d)["secretTargetRef"][0].pop("key"),
        "spec.secretTargetRef.0: 'key' is a required property",
    ),
]


@pytest.mark.parametrize(("kind", "break_it", "message"), BROKEN_KEDA)
def test_keda_schemas_refuse_a_broken_copy(
    kind: str, break_it: Callable[[dict[str, Any]], object], message: str
) -> None:
    doc = copy.deepcopy(next(iter(of_kind(kind).values())))
    assert keda_errors(doc) == []
    break_it(doc)
    errors = keda_errors(doc)
    assert any(message in e for e in errors), errors
