"""What the built-in builders share (:mod:`worker.builtin.tiny` and
:mod:`worker.builtin.refs`): the seed, the marker of a complete build, the atomic write of a
model folder, and the tokenizer.

The tokenizer is byte-level BPE with no merges (every byte is a token), written from
scratch because no tokenizer files can be downloaded here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEED = 20261121
# Files whose presence means a complete build (written last, atomically renamed).
MARKER = "model_index.json"


def bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves,
    # the rest to code points above 255, so every byte is a visible character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def byte_tokenizer(max_length: int = 77) -> tuple[Any, int]:
    """A ``CLIPTokenizer`` over the 256 bytes (and their end-of-word forms), and its
    vocabulary size."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length), len(vocab)


def save_pretrained(pipe: Any, dest: Path, *extra: Any) -> Path:
    """``save_pretrained`` (safetensors) into place; ``extra`` objects (a processor
    config) are saved beside it."""

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for obj in extra:
            obj.save_pretrained(tmp)

    return write_folder(dest, write)


def write_folder(dest: Path, write: Callable[[Path], None]) -> Path:
    """``write`` fills a temporary folder beside ``dest``, which is then renamed into
    place: a reader never sees half a model, and a failed build leaves nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        write(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
