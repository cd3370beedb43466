"""``atelier models``: the registry's models, their defaults, and the ControlNets,
reference modes and LoRAs each model's requests may name (what ``GET /v1/models`` says)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from producer.cli.common import EXIT_OK
from producer.core.registry import Registry
from producer.core.settings import Settings


def model_lines(view: dict[str, Any]) -> list[str]:
    """A model's view in a few lines: its defaults first, then one indented line for each
    of ``control``, ``references`` and ``loras`` it takes."""
    d = view["defaults"]
    lines = [
        f"{view['name']:<18} {view['source']}  {d['width']}×{d['height']} "
        f"{d['steps']} steps cfg {d['guidance_scale']} {d['scheduler']}"
    ]
    if view["controlnets"]:
        names = ", ".join(f"{c['name']} ({c['kind']})" for c in view["controlnets"])
        lines.append(f"  controlnets  {names}")
    if view["ip_adapter"]:
        lines.append(f"  references   modes {', '.join(view['ip_adapter']['modes'])}")
    if view["loras"]:
        lines.append(f"  loras        {', '.join(lora['name'] for lora in view['loras'])}")
    return lines


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    registry = Registry.load(settings.models_file)  # no Redis needed, unlike a Client
    models = [registry.view(spec) for spec in registry]
    if args.json:
        print(json.dumps(models, indent=2, ensure_ascii=False))
    else:
        for m in models:
            print("\n".join(model_lines(m)))
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """``atelier models``, on the subcommands ``sub``."""
    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
