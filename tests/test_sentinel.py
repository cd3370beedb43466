"""Redis through Sentinel: ``sentinel://`` URLs for the job store and the Celery broker,
with a real redis-server and a real Sentinel (both with passwords), a worker
subprocess, the client, the CLI and the API."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
import redis

from producer.core.redis_url import check_redis_url, kombu_broker, parse_sentinel_url
from producer.core.settings import Settings
from producer.jobs.broker import celery_config
from tests.helpers import generation_queues, wait_until, worker_env
from tests.servers import ROOT, Process, Worker, api_process, free_port

SERVICE = "atelier-main"
PASSWORD = "p@ss:word/1"  # every character a URL needs escaped
PASSWORD_Q = "p%40ss%3Aword%2F1"
SENTINEL_PASSWORD = "sentinel-secret"
API_KEY = "sentinel-test-key"


# -- parsing ------------------------------------------------------------------------------


def test_parse_sentinel_url() -> None:
    s = parse_sentinel_url(
        f"sentinel://:{PASSWORD_Q}@10.0.0.1:26380,sentinel-b,[::1]:26381/"
        f"{SERVICE}/3?sentinel_password=x"
    )
    assert s.sentinels == [("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381)]
    assert (s.service_name, s.db, s.username, s.password, s.sentinel_password) == (
        SERVICE,
        3,
        None,
        PASSWORD,
        "x",
    )
    assert PASSWORD not in repr(s)
    s = parse_sentinel_url("sentinel://user:pw@h/svc/")
    assert (s.username, s.password, s.db) == ("user", "pw", 0)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://h1:26379", "no service name"),
        ("sentinel:///svc/0", "no sentinel address"),
        ("sentinel://h1:port/svc", "no valid port"),
        ("sentinel://h1,,h2/svc", "has no host"),
        ("sentinel://h1/svc/zero", "is not a number"),
        ("sentinel://h1/svc/0/extra", "too many path segments"),
        ("sentinel://secret@h1/svc", "credentials must be"),
        ("sentinel://h1/svc?master=x", "unknown option(s) master"),
        ("http://h1:6379/0", "must start with redis://"),
    ],
)
def test_bad_urls_are_refused_naming_the_setting(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=r"^ATELIER_BROKER_URL") as err:
        check_redis_url(url, "ATELIER_BROKER_URL")
    assert says in str(err.value)
    assert "secret" not in str(err.value)  # a password is never echoed
    # Settings refuse them at start, with the same message.
    with pytest.raises(pydantic.ValidationError, match="ATELIER_REDIS_URL") as err2:
        Settings(redis_url=url)
    assert says in str(err2.value)


def test_kombu_form() -> None:
    url, options = kombu_broker(
        f"sentinel://:{PASSWORD_Q}@h1:26379,h2:26380/{SERVICE}/2"
        f"?sentinel_password={SENTINEL_PASSWORD}"
    )
    assert url == (f"sentinel://:{PASSWORD_Q}@h1:26379/2;sentinel://:{PASSWORD_Q}@h2:26380/2")
    assert options["master_name"] == SERVICE
    assert options["sentinel_kwargs"]["password"] == SENTINEL_PASSWORD
    assert options["sentinel_kwargs"]["retry"].get_retries() == 0  # on to the next Sentinel
    assert kombu_broker("redis://h:6379/0") == ("redis://h:6379/0", {})
    conf = celery_config(Settings(redis_url="redis://h/0", broker_url=f"sentinel://h1/{SERVICE}/1"))
    assert conf["broker_url"] == "sentinel://h1:26379/1"
    opts = conf["broker_transport_options"]
    assert opts["master_name"] == SERVICE and opts["priority_steps"] == list(range(10))


# -- a real Sentinel ----------------------------------------------------------------------------


class Sentinel:
    """A password-protected redis-server and one Sentinel monitoring it (its own
    password too), each a subprocess on a free port, stopped by pid."""

    def __init__(self, workdir: Path, replica: bool = False) -> None:
        self.workdir = workdir
        self.master_port, self.port = free_port(), free_port()
        self.replica_port = free_port() if replica else None
        self.master: Process | None = None
        self.replica: Process | None = None
        self.sentinel: Process | None = None
        self.probe: redis.Redis | None = None

    def _redis(self, binary: str, port: int, name: str, *extra: str) -> Process:
        data = self.workdir / name
        data.mkdir(exist_ok=True)
        return Process(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data),
                "--requirepass",
                PASSWORD,
                "--masterauth",
                PASSWORD,
                "--maxmemory-policy",
                "noeviction",
                *extra,
            ],
            {},
            self.workdir / f"{name}.log",
            port=port,
        ).start()

    def start(self) -> Sentinel:
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.master = self._redis(binary, self.master_port, "master")
        if self.replica_port is not None:
            self.replica = self._redis(
                binary,
                self.replica_port,
                "replica",
                "--replicaof",
                "127.0.0.1",
                str(self.master_port),
            )
        conf = self.workdir / "sentinel.conf"  # Sentinel rewrites its file: ours, writable
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 1\n"
            f'sentinel auth-pass {SERVICE} "{PASSWORD}"\n'
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
        )
        self.sentinel = Process(
            [binary, str(conf), "--sentinel"], {}, self.workdir / "sentinel.log", port=self.port
        ).start()
        self.probe = redis.Redis(port=self.port, password=SENTINEL_PASSWORD)
        probe = self.probe
        wait_until(
            lambda: probe.sentinel_get_master_addr_by_name(SERVICE) is not None,
            30,
            interval=0.1,
            message="the Sentinel knows its master",
        )
        return self

    def wait_replicated(self) -> None:
        """The replica has everything the master has, and the Sentinel knows it."""
        assert self.replica_port is not None
        master = redis.Redis(port=self.master_port, password=PASSWORD)
        replica = redis.Redis(port=self.replica_port, password=PASSWORD)
        offset = master.info("replication")["master_repl_offset"]
        wait_until(
            lambda: replica.info("replication").get("slave_repl_offset", -1) >= offset,
            30,
            interval=0.1,
            message="the replica catches up",
        )
        master.close()
        replica.close()
        probe: Any = self.probe
        wait_until(
            lambda: any(
                r["port"] == self.replica_port and "s_down" not in r["flags"]
                for r in probe.sentinel_slaves(SERVICE)
            ),
            30,
            interval=0.1,
            message="the Sentinel sees the replica",
        )

    def wait_failover(self) -> int:
        """The port of the new master, once the Sentinel has finished the failover and
        shows it healthy (GET-MASTER-ADDR-BY-NAME names the promoted replica earlier,
        while the master is still flagged down and clients find no master)."""
        probe: Any = self.probe

        def done() -> bool:
            state = probe.sentinel_master(SERVICE)
            return bool(state["port"] != self.master_port and state["flags"] == "master")

        wait_until(done, 60, interval=0.1, message="the Sentinel finishes a failover")
        return int(probe.sentinel_master(SERVICE)["port"])

    def url(self, db: int) -> str:
        # A dead Sentinel first: clients must move on to the next one.
        return (
            f"sentinel://:{PASSWORD_Q}@127.0.0.1:{free_port()},127.0.0.1:{self.port}/"
            f"{SERVICE}/{db}?sentinel_password={SENTINEL_PASSWORD}"
        )

    def direct(self, db: int) -> redis.Redis:
        """A plain client on the master, to look behind the Sentinel clients' back."""
        return redis.Redis(port=self.master_port, password=PASSWORD, db=db)

    def stop(self) -> None:
        if self.probe is not None:
            self.probe.close()
        for proc in (self.sentinel, self.replica, self.master):
            if proc is not None:
                proc.stop()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Sentinel]:
    pair = Sentinel(tmp_path / "sentinel")
    try:
        yield pair.start()
    finally:
        pair.stop()


def client_job(settings: Settings, out: Path) -> str:
    """The Python client: submit, then follow the job to its end."""
    from producer import Client

    with Client(settings) as client:
        job_id = client.submit(prompt="through sentinel", steps=2, seed=7)
        record = client.wait(job_id, timeout=120)
    assert record["status"] == "succeeded", record
    assert Path(out / str(record["outputs"][0]["key"])).is_file()
    return job_id


def api_job(port: int | None) -> str:
    """The HTTP API (sync and async clients through Sentinel)."""
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        timeout=30,
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as http:
        assert http.get("/readyz").status_code == 200
        res = http.post("/v1/jobs", json={"prompt": "via the api", "steps": 2, "seed": 8})
        assert res.status_code == 202, res.text
        api_id: str = res.json()["id"]
        # The event stream (the API's asyncio client) runs to the terminal event.
        with http.stream("GET", f"/v1/jobs/{api_id}/events") as stream:
            body = "".join(stream.iter_text())
        assert "event: job.succeeded" in body
        assert http.get(f"/v1/jobs/{api_id}").json()["status"] == "succeeded"
        queues = generation_queues(http.get("/v1/queues").json()["queues"])
        assert queues["tiny-sdxl"]["depth"] == 0
    return api_id


def check_the_cli(env: dict[str, str]) -> None:
    """The CLI: queues (the broker client), and the worker readiness probe."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "producer.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    assert cli("queues", "--json").returncode == 0
    assert cli("workers", "--host", socket.gethostname()).returncode == 0
    missing = cli("workers", "--host", "no-such-host")
    assert missing.returncode == 4 and "no live worker" in missing.stderr


@pytest.mark.slow
def test_store_and_broker_through_sentinel(
    sentinel: Sentinel, tmp_path: Path, models_dir: Path, models_file: str
) -> None:
    values: dict[str, Any] = {
        "redis_url": sentinel.url(0),
        "broker_url": sentinel.url(1),
        "storage_url": f"file://{tmp_path / 'out'}",
        "models_dir": str(models_dir),
        "models_file": models_file,
        "default_model": "tiny-sdxl",
        "device": "cpu",
        "torch_threads": 1,
        "job_timeout_s": 60,
        "restore_interval_s": 1,
        "api_keys": API_KEY,
        "rate_limit_per_s": 0,
    }
    settings = Settings(**values)
    env = worker_env(values)
    worker = Worker(env, tmp_path / "worker.log", ["tiny-sdxl"])
    api = api_process(env, tmp_path / "api.log")
    try:
        worker.start()
        api.start()
        # 1. The Python client.
        job_id = client_job(settings, tmp_path / "out")
        # 2. The HTTP API.
        api_id = api_job(api.port)
        # 3. The CLI.
        check_the_cli(env)
        # 4. Behind the clients' back: the store wrote db 0, Celery's queues live in db 1.
        store_db, broker_db = sentinel.direct(0), sentinel.direct(1)
        assert store_db.exists(f"atelier:job:{job_id}", f"atelier:job:{api_id}") == 2
        assert broker_db.exists("_kombu.binding.atelier.tiny-sdxl")
        assert not store_db.exists("_kombu.binding.atelier.tiny-sdxl")
        assert not broker_db.keys("atelier:job:*")
    finally:
        api.stop()
        worker.stop()


@pytest.mark.slow
def test_clients_follow_a_failover(tmp_path: Path, models_file: str) -> None:
    """The master dies; Sentinel promotes its replica; the same client objects (store,
    Celery producer) carry on against the new master without being rebuilt."""
    pair = Sentinel(tmp_path / "sentinel", replica=True).start()
    try:
        settings = Settings(
            redis_url=pair.url(0), default_model="tiny-idle", models_file=models_file
        )
        from producer import Client
        from producer.jobs.broker import queue_depth

        with Client(settings) as client:
            before = client.submit(prompt="before the failover")
            pair.wait_replicated()
            assert pair.master is not None
            pair.master.kill()  # SIGKILL: no goodbye to the Sentinel
            new_port = pair.wait_failover()
            assert new_port == pair.replica_port
            after = client.submit(prompt="after the failover")
            assert client.get(before)["status"] == client.get(after)["status"] == "queued"
        direct = redis.Redis(port=new_port, password=PASSWORD)
        assert queue_depth(direct, "tiny-idle") == 2
        assert direct.exists(f"atelier:job:{before}", f"atelier:job:{after}") == 2
    finally:
        pair.stop()
