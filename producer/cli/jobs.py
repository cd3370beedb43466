"""``atelier jobs``: the caller's jobs, newest first, a page at a time (``Client.list``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, cast

from producer.cli.common import EXIT_OK
from producer.client import Client
from producer.core.contract import Kind, Record, Status
from producer.core.normalized import GenerateRequest, TrainingRequest
from producer.core.settings import Settings
from producer.jobs.joblist import DEFAULT_LIMIT


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    owner = args.owner
    if args.key:
        from producer.api.keys import key_digest, key_id

        owner = key_id(key_digest(args.key))
    with Client(settings) as client:
        page = client.list(
            owner=owner,
            status=args.status,
            model=args.model,
            kind=args.kind,
            limit=args.limit,
            cursor=args.cursor,
        )
    if args.json:
        print(json.dumps(page, indent=2, ensure_ascii=False))
        return EXIT_OK
    for r in page["data"]:
        shown = sum(1 for o in r["outputs"] if o.get("url"))
        print(
            f"{r['id']}  {r['created_at']}  {r['status']:<9}  {r['request']['model']:<18}"
            f"  {shown} image(s)  {_prompt(r)[:40]!r}"
        )
    if not page["data"]:
        print("no jobs")
    if page["next_cursor"]:
        print(f"more: atelier jobs --cursor {page['next_cursor']}", file=sys.stderr)
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """``atelier jobs``, on the subcommands ``sub``."""
    p = sub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--status", choices=[str(x) for x in Status])
    p.add_argument("--model")
    p.add_argument("--kind", choices=[str(x) for x in Kind])
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="1-100 (default 20)")
    p.add_argument("--cursor", help="start after this (a 'more:' line gives it)")
    whose = p.add_mutually_exclusive_group()
    whose.add_argument(
        "--owner",
        help="an API key's jobs, by its id (key_...); default: jobs submitted without a key",
    )
    whose.add_argument("--key", help="an API key's jobs, by the key")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)


def _prompt(record: Record) -> str:
    """What a job was asked for: a generation's prompt, a training's instance prompt."""
    if record.get("kind") == Kind.TRAIN:
        return cast(TrainingRequest, record["request"])["instance_prompt"]
    return cast(GenerateRequest, record["request"])["prompt"]
