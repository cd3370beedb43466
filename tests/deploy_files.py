"""Reading the deploy files (docker-compose.yml, the Dockerfiles, deploy/k8s) and the
tools and schemas that check them, for tests/test_deploy.py and
tests/test_deploy_processes.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from producer.core.redis_url import is_sentinel, parse_sentinel_url
from producer.core.settings import Settings
from tests.servers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
#: KEDA's CRDs as its release ships them (the README there names the source).
KEDA_CRDS = K8S / "schemas" / "keda"
API_DOCKERFILE = ROOT / "deploy" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "deploy" / "worker.Dockerfile"
#: The Kubernetes release the core kinds are validated against (kubernetes-validate's
#: newest).
KUBERNETES_VERSION = "1.37.0"
#: kubernetes-validate as installed with the dev extra, in this interpreter's environment.
KUBERNETES_VALIDATE = [sys.executable, "-m", "kubernetes_validate"]


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


def worker_deployments() -> dict[str, dict[str, Any]]:
    out = {n: d for n, d in deployments().items() if n.startswith("atelier-worker-")}
    assert out, "no worker Deployment"
    return out


def redis_target(env: dict[str, str]) -> tuple[str, int, int, str | None]:
    """(host, port, db, password) of the broker a worker with ``env`` uses."""
    url = settings_from(env).effective_broker_url
    if is_sentinel(url):
        s = parse_sentinel_url(url)
        return s.sentinels[0][0], s.sentinels[0][1], s.db, s.password
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    return parts.hostname or "", parts.port or 6379, db, parts.password


def scaled_object_lists(model: str) -> list[str]:
    for so in of_kind("ScaledObject").values():
        dep = deployments()[so["spec"]["scaleTargetRef"]["name"]]
        if arg_after(only_container(dep)["command"], "--model") == model:
            return [t["metadata"]["listName"] for t in so["spec"]["triggers"]]
    raise AssertionError(f"no ScaledObject for {model}")


# -- the tools and schemas ------------------------------------------------------------------


def compose_or_skip() -> list[str]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed: `make prereqs` "
            "installs it (apt-get install docker-compose)"
        )
    return cmd


def compose_config(cmd: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    """``config -q`` of ``path`` as if it were the repository's compose file."""
    args = ["--project-directory", str(ROOT), "-f", str(path), "--profile", "ops", "config", "-q"]
    return subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def core_kinds() -> list[dict[str, Any]]:
    """The manifests the API server itself knows (neither KEDA's nor kustomize's)."""
    return [d for _, d in manifests() if not is_keda(d) and d["kind"] != "Kustomization"]


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    """``kubernetes-validate --strict`` (an unknown field is an error) of ``paths``."""
    return subprocess.run(
        [*KUBERNETES_VALIDATE, "--strict", "-k", KUBERNETES_VERSION, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def is_keda(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).startswith("keda.sh/")


def keda_crds() -> dict[tuple[str, str], dict[str, Any]]:
    """The openAPIV3Schema of every served version of KEDA's CRDs, by (apiVersion, kind)."""
    out = {}
    for path in sorted(KEDA_CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def strict_json_schema(schema: dict[str, Any], rules: list[str]) -> dict[str, Any]:
    """A CRD's structural schema as JSON Schema (draft 4, the base of OpenAPI 3.0's), as
    strict as the API server's strict field validation (kubectl's default): an object
    with properties refuses any other field unless it preserves unknown fields;
    ``nullable`` admits null, ``x-kubernetes-int-or-string`` either type. The CEL rules
    (``x-kubernetes-validations``), which jsonschema cannot run, are added to ``rules``."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    out.pop("nullable", None)
    rules += [v["rule"] for v in schema.get("x-kubernetes-validations") or []]
    if "properties" in out:
        out["properties"] = {k: strict_json_schema(v, rules) for k, v in out["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict_json_schema(out[key], rules)
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict_json_schema(s, rules) for s in out[key]]
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    return out


def keda_errors(doc: dict[str, Any], rules: list[str] | None = None) -> list[str]:
    """What KEDA's CRD schema refuses in ``doc`` (its path: the message), none if valid;
    the schema's CEL rules are added to ``rules``."""
    crds = keda_crds()
    key = (doc["apiVersion"], doc["kind"])
    assert key in crds, f"no CRD in {KEDA_CRDS} serves {key}; add it from KEDA's release"
    schema = strict_json_schema(crds[key], rules if rules is not None else [])
    jsonschema.Draft4Validator.check_schema(schema)
    errors = jsonschema.Draft4Validator(schema).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in errors)
