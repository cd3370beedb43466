"""``atelier``: a thin command line over :class:`producer.Client`.

Exit codes: 0 done (a job that ``--wait``-ed ended ``succeeded``), 1 the job ended
otherwise, 2 bad usage or a refused request, 3 a dependency unavailable, 4 no such job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from producer.cli.common import (
    EXIT_JOB_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_request_args,
    download_outputs,
    follow_with_progress,
    need_worker_extra,
    print_json,
    request_from_args,
)
from producer.cli.jobs import add_parser as add_jobs_parser
from producer.cli.models import add_parser as add_models_parser
from producer.client import Client
from producer.core.contract import Kind, Record, Status
from producer.core.errors import InvalidRequest, JobNotFound, Unavailable
from producer.core.registry import Registry
from producer.core.settings import Settings, get_settings

# -- commands --------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    with Client(settings) as client:
        job_id = client.submit(request_from_args(args))
        if not args.wait:
            print_json({"id": job_id}) if args.json else print(job_id)
            return EXIT_OK
        record = follow_with_progress(client, job_id, quiet=args.json)
        return _report(settings, record, args)


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from producer.cli import train as train_cli

    with Client(settings) as client:
        job_id = client.train(train_cli.request_from_args(args))
        if not args.wait:
            print_json({"id": job_id}) if args.json else print(job_id)
            return EXIT_OK
        record = follow_with_progress(client, job_id, quiet=args.json)
        return _report(settings, record, args)


def _report(settings: Settings, record: Record, args: argparse.Namespace) -> int:
    paths = []
    if getattr(args, "out", None) and record["status"] == Status.SUCCEEDED:
        if record.get("kind") == Kind.TRAIN:
            from producer.cli.train import download

            paths = download(settings, record, Path(args.out))
        else:
            paths = download_outputs(settings, record, Path(args.out))
    if args.json:
        print_json(dict(record, files=[str(p) for p in paths]) if paths else record)
    else:
        print(f"{record['id']} {record['status']}")
        if error := record.get("error"):
            print(f"  error {error['code']}: {error['message']}")
        shown: list[Any] = list(paths) or [o["url"] or "(withheld)" for o in record["outputs"]]
        for p in shown:
            print(f"  {p}")
    return EXIT_OK if record["status"] == Status.SUCCEEDED else EXIT_JOB_FAILED


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    with Client(settings) as client:
        record = client.get(args.id)
        deliveries = client.store.deliveries(args.id)
    if args.json:
        print_json(dict(record, webhook_deliveries=deliveries))
    else:
        p = record["progress"]
        print(
            f"{record['id']} {record['status']} step {p['step']}/{p['total']}"
            f" attempts {record['attempts']}"
        )
        for o in record["outputs"]:
            print(f"  {o['url'] or '(withheld)'}")
        if error := record.get("error"):
            print(f"  error {error['code']}: {error['message']}")
        for d in deliveries:
            print(
                f"  webhook {d['type']} attempt {d['attempt']}: {d['outcome']} "
                f"{d['status'] or d['error']}"
            )
    return EXIT_OK


def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    with Client(settings) as client:
        for ev in client.events(args.id, after=args.after):
            if args.json:
                print(json.dumps(ev, ensure_ascii=False), flush=True)
            else:
                data = {k: v for k, v in ev["data"].items() if k != "job"}
                print(f"{ev['id']} {ev['type']} {json.dumps(data) if data else ''}", flush=True)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    with Client(settings) as client:
        record = client.cancel(args.id)
    print_json(record) if args.json else print(f"{record['id']} {record['status']}")
    return EXIT_OK


def cmd_queues(args: argparse.Namespace, settings: Settings) -> int:
    from producer.core.redis_url import redis_client
    from producer.jobs.fleet import queue_report

    with Client(settings) as client:
        broker = redis_client(settings.effective_broker_url, "ATELIER_BROKER_URL")
        try:
            report = queue_report(client.store, broker, client.registry)
        finally:
            broker.close()
    if args.json:
        print_json(report)
    else:
        print(f"{'model':<18} {'kind':<8} {'depth':>6} {'queued':>6}  oldest")
        for q in report:
            age = f"{q['oldest_age_s']:.1f} s" if q["oldest_age_s"] is not None else "-"
            print(f"{q['model']:<18} {q['kind']:<8} {q['depth']:>6} {q['queued']:>6}  {age}")
    return EXIT_OK


def cmd_workers(args: argparse.Namespace, settings: Settings) -> int:
    from producer.jobs.fleet import live_workers

    with Client(settings) as client:
        workers = live_workers(client.store.redis)
    if args.host:
        # A worker pod's readiness probe: this host's worker has loaded its models and
        # beats (the heartbeat starts just before it consumes).
        workers = [w for w in workers if w.get("host") == args.host]
        if not workers:
            print(f"no live worker on {args.host}", file=sys.stderr)
            return EXIT_NOT_FOUND
    if args.json:
        print_json(workers)
    else:
        if not workers:
            print("no live workers")
        for w in workers:
            current = ",".join(w.get("current_jobs") or []) or "-"
            print(
                f"{w['id']:<32} {w['state']:<6} {','.join(w['models'])} on {w['device']}"
                f"  done {w['jobs_done']}  current {current}"
            )
    return EXIT_OK


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from producer.api import main as api_main

    return api_main(settings, args.host, args.port)


def cmd_dispatcher(args: argparse.Namespace, settings: Settings) -> int:
    from producer.services.dispatcher import main as dispatcher_main

    try:
        return dispatcher_main(settings)
    except ValueError as exc:
        print(f"atelier: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    # The producer never imports the worker: it hands this process over to it.
    need_worker_extra()
    argv = [sys.executable, "-m", "worker"]
    for m in args.model or []:
        argv += ["--model", m]
    if args.device:
        argv += ["--device", args.device]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    if args.train:
        argv += ["--train"]
    os.execv(sys.executable, argv)
    return EXIT_OK  # pragma: no cover


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from producer.cli.demo import run_demo

    return run_demo(args)


def cmd_studio(args: argparse.Namespace, settings: Settings) -> int:
    from producer.cli.studio import run_studio

    return run_studio(args)


def _add_embedded_parsers(sub: Any) -> None:
    """demo and studio: the commands that start the embedded stack."""
    p = sub.add_parser("demo", help="run one job on a private redis-server and worker")
    add_request_args(p, ["steps", "seed", "width", "height"])
    p.add_argument("--model", default="tiny-sdxl")
    p.add_argument("--out", default="atelier-output")
    p.add_argument("--device")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "studio", help="the studio web page on a private redis-server, worker and API, until Ctrl-C"
    )
    p.add_argument("--model", default="tiny-sdxl")
    p.add_argument("--device")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.set_defaults(func=cmd_studio)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atelier", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    _add_embedded_parsers(sub)

    p = sub.add_parser("submit", help="submit a job")
    add_request_args(p)
    p.add_argument("--wait", action="store_true", help="follow it with a progress bar")
    p.add_argument("--out", help="with --wait: download the images into this folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_submit)

    from producer.cli.train import add_parser as add_train_parser

    add_train_parser(sub, cmd_train)

    _add_job_parsers(sub)
    _add_process_parsers(sub)
    return parser


def _add_job_parsers(sub: Any) -> None:
    """status, cancel, jobs, events; models, queues, workers: the commands that read."""
    for name, func, helptext in (
        ("status", cmd_status, "show a job"),
        ("cancel", cmd_cancel, "cancel a job"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("id")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("events", help="print a job's events until it ends")
    p.add_argument("id")
    p.add_argument("--after", help="resume after this event id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_events)

    add_jobs_parser(sub)
    add_models_parser(sub)
    for name, func, helptext in (
        ("queues", cmd_queues, "queue depth per model"),
        ("workers", cmd_workers, "live workers (heartbeats)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
        if name == "workers":
            p.add_argument("--host", help="only workers on this host; exit 4 if there is none")


def _add_process_parsers(sub: Any) -> None:
    """api, dispatcher, worker: the commands that become a long-running process."""
    p = sub.add_parser("api", help="run the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("dispatcher", help="run a webhook dispatcher")
    p.set_defaults(func=cmd_dispatcher)

    p = sub.add_parser("worker", help="run a GPU worker (needs atelier[worker])")
    p.add_argument("--model", action="append")
    p.add_argument("--device")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--train", action="store_true", help="also run the models' trainings")
    p.set_defaults(func=cmd_worker)


def main(argv: list[str] | None = None) -> int:
    import redis
    from kombu.exceptions import OperationalError

    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
        Registry.load(settings.models_file)  # a broken models file is a usage error
    except (ValueError, OSError) as exc:
        print(f"atelier: bad settings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args, settings))
    except redis.ResponseError as exc:  # e.g. a malformed --after event id
        print(f"atelier: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (redis.RedisError, OperationalError) as exc:
        print(f"atelier: Redis unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except TimeoutError as exc:
        print(f"atelier: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except InvalidRequest as exc:
        print(f"atelier: {exc.code}:", file=sys.stderr)
        for f in exc.fields:
            print(f"  {f['field']}: {f['message']}", file=sys.stderr)
        return EXIT_USAGE
    except JobNotFound as exc:
        print(f"atelier: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except Unavailable as exc:
        print(f"atelier: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
