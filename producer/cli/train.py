"""``atelier train``: submit a training from local photos, a folder, a zip or URLs, and
(with ``--wait``) follow its loss and download its adapter and validation images."""

from __future__ import annotations

import argparse
import base64
import mimetypes
from pathlib import Path
from typing import Any

from producer.core.contract import Record
from producer.core.settings import Settings
from producer.core.train_contract import IMAGE_SUFFIXES

#: Training fields the CLI takes as options: name → argparse keywords.
TRAIN_OPTIONS: dict[str, dict[str, Any]] = {
    "model": {},
    "class_prompt": {},
    "num_class_images": {"type": int},
    "steps": {"type": int},
    "learning_rate": {"type": float},
    "rank": {"type": int},
    "resolution": {"type": int},
    "batch_size": {"type": int},
    "gradient_accumulation": {"type": int},
    "lr_scheduler": {"choices": ["constant", "constant_with_warmup", "linear", "cosine"]},
    "lr_warmup_steps": {"type": int},
    "checkpoint_every": {"type": int},
    "seed": {"type": int},
    "validation_prompt": {},
    "num_validation_images": {"type": int},
    "priority": {"type": int},
    "timeout_s": {"type": int},
}


def add_parser(sub: Any, func: Any) -> None:
    p = sub.add_parser("train", help="submit a DreamBooth LoRA training")
    p.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="DIR|ZIP|URL",
        help="a folder of images, image files, one .zip, https URLs or storage:<key>",
    )
    p.add_argument("--prompt", required=True, help='the instance prompt, e.g. "a photo of sks dog"')
    for name, kw in TRAIN_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, **kw)
    p.add_argument("--prior-preservation", action="store_true")
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--wait", action="store_true", help="follow it with a progress bar")
    p.add_argument("--out", help="with --wait: download the adapter and images here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    req: dict[str, Any] = {"images": images_from_args(args.images), "instance_prompt": args.prompt}
    for name in TRAIN_OPTIONS:
        if getattr(args, name, None) is not None:
            req[name] = getattr(args, name)
    for flag in ("prior_preservation", "train_text_encoder"):
        if getattr(args, flag):
            req[flag] = True
    return req


def images_from_args(values: list[str]) -> list[str]:
    """Local paths become data: URIs (a folder: its images, in name order); URLs and
    ``storage:`` keys stay as they are."""
    out: list[str] = []
    for value in values:
        if value.startswith(("https://", "http://", "storage:", "data:")):
            out.append(value)
            continue
        path = Path(value)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise SystemExit(f"atelier: {value}: no .png, .jpg or .webp image in it")
            out += [data_uri(p) for p in files]
        elif path.is_file():
            out.append(data_uri(path))
        else:
            raise SystemExit(f"atelier: {value}: no such file or folder")
    return out


def data_uri(path: Path) -> str:
    if path.suffix.lower() == ".zip":
        mime = "application/zip"
    else:
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def download(settings: Settings, record: Record, out_dir: Path) -> list[Path]:
    """A finished training's outputs (adapter and validation images) into ``out_dir``."""
    from producer.core.storage import storage_from_settings

    storage = storage_from_settings(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for output in record["outputs"]:
        if key := output.get("key"):
            path = out_dir / f"{record['id']}-{key.rsplit('/', 1)[-1]}"
            path.write_bytes(storage.get(key))
            paths.append(path)
    return paths
