"""The published OpenAPI document, checked against the running API by schemathesis.

A real uvicorn (``atelier api``) on its own Redis database, no workers: jobs stay
queued, and a stand-in cancels each one within a second so that its event stream
(which lasts until the job ends) ends too.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import redis

from producer.core import keys as K
from producer.core.contract import Status
from producer.jobs.store import JobStore
from tests.helpers import data_uri, png, settings_env
from tests.servers import Process, RedisServer

pytestmark = pytest.mark.slow

KEY = "key-openapi-0123456789"
#: A separate database: no worker of the shared stack takes these jobs.
DB = 9

#: Every route's positive (schema-valid) cases must be taken: schemathesis's own ST202
#: judges each route with its default statuses. The submits' 400 and 422 are judged by
#: tests/openapi_hooks.py instead, which lets through only a refusal for what JSON Schema
#: cannot say (a model's own limits, rules between fields, images that must decode) and
#: fails any other as ST202.
HOOKS = Path(__file__).with_name("openapi_hooks.py")
CONFIG = """
[[operations]]
include-operation-id-regex = "^(submit_(job|training)|openai_images_(generate|edit))$"
[operations.checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "422", "429", "5xx"]

# (Each table selects by operation id: schemathesis ORs the keys of one table, so a path
# and a method would select every POST.) A job the OpenAI-compatible routes take is
# cancelled by the stand-in below, and answered 409 (a stream: an error event after its
# 200); each waits for that cancel, so fewer examples keep the case short.
[[operations]]
include-operation-id-regex = "^openai_images_"
[operations.generation]
max-examples = 8
"""

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)
#: The four schema-valid requests schemathesis 4.32 found refused (ST202) before the
#: schema said what the checks say: each is outside the schema now, and still refused.
ISSUE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/jobs", {"prompt": "0", "steps": 1, "strength": 0.0, "expires_in_s": 1, "timeout_s": 1}),
    ("/v1/trainings", {"images": [""], "instance_prompt": "0", "captions": []}),
    ("/v1/images/generations", {"prompt": "0", "output_format": "gif"}),
    ("/v1/images/edits", {"prompt": "0", "output_format": "gif"}),
]


class Canceller(threading.Thread):
    """Cancels every queued job, as a user would: the workers that would end them never
    come here."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.store = JobStore.from_url(url)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            for key in self.store.redis.scan_iter(K.JOB + "*", count=1000):
                job_id = key.decode().removeprefix(K.JOB)
                if self.store.redis.hget(key, "status") == Status.QUEUED.value.encode():
                    self.store.request_cancel(job_id)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.store.redis.close()


@pytest.fixture(scope="module")
def store_url(redis_server: RedisServer) -> Iterator[str]:
    """This module's Redis database, emptied before and after its tests."""
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    yield url
    r.flushdb()
    r.close()


@pytest.fixture(scope="module")
def api_server_env(store_url: str, models_file: str) -> dict[str, str]:
    return {
        **settings_env(
            redis_url=store_url,
            models_file=models_file,
            api_keys=KEY,
            admin_api_keys=KEY,
            rate_limit_per_s=0,
            sse_heartbeat_s=0.5,
        ),
        "PATH": "/usr/bin:/bin",
    }


@pytest.fixture(scope="module")
def api_url(api_server: Process, store_url: str) -> Iterator[str]:
    """The module's API process (tests/conftest.py: ``api_server``), and a canceller."""
    canceller = Canceller(store_url)
    canceller.start()
    try:
        yield f"http://127.0.0.1:{api_server.port}"
    finally:
        canceller.stop()


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_every_reference_resolves_and_jobs_link_to_their_routes(api_url: str) -> None:
    spec = httpx.get(f"{api_url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    refs = set(_refs(spec))
    assert "#/components/schemas/LoraRef" in refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    links = spec["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"]
    operations = {op["operationId"] for ops in spec["paths"].values() for op in ops.values()}
    assert (
        {link["operationId"] for link in links.values()}
        == {"get_job", "cancel_job", "job_events"}
        <= operations
    )
    assert all(link["parameters"] == {"job_id": "$response.body#/id"} for link in links.values())
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if op.get("security"):  # behind a key: no key, the rate limit, Redis down
                assert {"401", "429", "503"} <= set(op["responses"]), (method, path)


def test_each_model_lists_what_a_submit_for_it_takes(api_url: str) -> None:
    """``GET /v1/models`` names each model's ControlNets, reference modes and LoRAs: a
    submit for the model naming them is taken (the stand-in cancels its job), and a
    ControlNet or LoRA listed for other families only is refused by field."""
    image = data_uri(png((200, 30, 60), (16, 16)))
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=api_url, headers=headers, timeout=30) as api:
        models = {m["name"]: m for m in api.get("/v1/models").json()["models"]}
        schemas = api.get("/openapi.json").json()["components"]["schemas"]
        documented = set(schemas["ModelItem"]["properties"])
        assert {"controlnets", "max_controls", "ip_adapter", "loras"} <= documented
        assert all(set(m) == documented for m in models.values())  # the wire, key for key
        for m in models.values():
            modes = m["ip_adapter"]["modes"] if m["ip_adapter"] else []
            body = {
                "prompt": "a fox",
                "model": m["name"],
                "loras": [{"name": lora["name"]} for lora in m["loras"]],
                "references": [{"image": image, "mode": mode} for mode in modes],
            }
            for cn in m["controlnets"]:
                for pre in cn["preprocess"]:
                    control = [{"name": cn["name"], "image": image, "preprocess": pre}]
                    res = api.post("/v1/jobs", json={**body, "control": control})
                    assert res.status_code == 202, (m["name"], res.text)
        for model, key in (("tiny-sdxl", "controlnets"), ("tiny-sd15", "loras")):
            own = {x["name"] for x in models[model][key]}
            others = {x["name"] for m in models.values() for x in m[key]} - own
            assert others, (model, key)
            for name in sorted(others):
                entry: dict[str, Any] = {"name": name}
                field = "loras"
                if key == "controlnets":
                    entry, field = {"name": name, "image": image}, "control"
                res = api.post("/v1/jobs", json={"prompt": "a fox", "model": model, field: [entry]})
                assert res.status_code == 422, res.text
                fields = [f["field"] for f in res.json()["error"]["fields"]]
                assert fields == [f"{field}.0.name"], (model, name, fields)


def test_the_refused_requests_of_the_issue_are_outside_the_schema(api_url: str) -> None:
    spec = httpx.get(f"{api_url}/openapi.json").json()
    auth = {"Authorization": f"Bearer {KEY}"}
    expected = {"/v1/jobs": {"strength"}, "/v1/trainings": {"images", "captions"}}
    for path, body in ISSUE_CASES:
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        media, schema = next(iter(content.items()))
        validator = jsonschema_rs.Draft202012Validator(
            {**schema["schema"], "components": spec["components"]}
        )
        as_sent = {**body, "image": "a picture"} if media.startswith("multipart/") else body
        named = {str(e.instance_path[0]) for e in validator.iter_errors(as_sent) if e.instance_path}
        assert named == expected.get(path, {"output_format"}), (path, named)
        if media.startswith("multipart/"):
            answer = httpx.post(
                api_url + path, data=body, files={"image": ("a.png", PNG)}, headers=auth
            )
        else:
            answer = httpx.post(api_url + path, json=body, headers=auth)
        assert answer.status_code in (400, 422), (path, answer.text)


def _statuses(log: str, path: str) -> set[int]:
    """The statuses uvicorn's access log shows for ``POST path``."""
    return {int(m) for m in re.findall(rf'"POST {re.escape(path)} HTTP/1.1" (\d+)', log)}


def test_schemathesis_finds_nothing(api_server: Process, api_url: str, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    binary = Path(sys.executable).parent / "schemathesis"
    argv = [str(binary), "--config-file", str(config), "run", f"{api_url}/openapi.json"]
    argv += ["--checks", "all", "--header", f"Authorization: Bearer {KEY}"]
    argv += ["--max-examples", "20", "--seed", "1", "--workers", "1"]
    argv += ["--request-timeout", "10", "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    try:  # ~25 s when nothing is found; shrinking what is found takes longer
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"schemathesis ran past 240 s:\n{str(exc.stdout)[-6000:]}")
    out = res.stdout + res.stderr
    assert "nresolvable" not in out, out[-6000:]
    assert res.returncode == 0, out[-6000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", out)
    tested = re.search(r"Tested: (\d+)", out)
    assert selected and tested, out[-3000:]
    assert int(selected[1]) == int(selected[2]) == int(tested[1]) == 15, out[-3000:]
    # The stateful phase followed the links from a created job to its routes.
    stateful = re.search(
        r"Stateful \(in.*?Scenarios: +(\d+).*?API Links: +(\d+) covered", out, re.DOTALL
    )
    assert stateful and int(stateful[1]) > 0 and int(stateful[2]) >= 3, out[-3000:]
    # Each submit took generated bodies (an OpenAI one's job is cancelled: 409, or a
    # stream's 200), not only refused them.
    log = api_server.log()
    assert 202 in _statuses(log, "/v1/jobs") and 202 in _statuses(log, "/v1/trainings")
    for path in ("/v1/images/generations", "/v1/images/edits"):
        assert {200, 409} & _statuses(log, path), (path, _statuses(log, path))
