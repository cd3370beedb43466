"""Prompts beyond CLIP's 77 tokens, and A1111-style weighting: ``(word:1.3)``.

diffusers truncates a prompt to 77 tokens (start, 75 tokens, end) and reads no syntax.
Here, a prompt that is longer or carries weighting syntax is encoded in windows of 75
tokens, each wrapped in start/end/padding like a normal prompt and encoded on its own;
the windows' hidden states are concatenated along the sequence (the UNet's
cross-attention takes any length). The pooled embedding (SDXL) is the first window's.
Weights multiply each token's hidden state, then the window is rescaled to its
original mean (as A1111 does), for both SDXL text encoders.

Syntax (A1111's): ``(text)`` ×1.1, ``[text]`` ÷1.1, ``(text:1.3)`` ×1.3, nesting
multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets.

A prompt without syntax that fits in 75 tokens is left to diffusers, untouched, so its
images stay bit-identical to a bare pipeline's.
"""

from __future__ import annotations

import re
from typing import Any

ROUND = 1.1
_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""",
    re.X,
)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "(a:.)": not a number, so plain text
        return None


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``text`` as (fragment, weight) runs; adjacent runs of one weight are merged."""
    res: list[list[Any]] = []
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) > 1:
            res.append([tok[1:], 1.0])
        elif tok == "(":
            rounds.append(len(res))
        elif tok == "[":
            squares.append(len(res))
        elif weight is not None and rounds and _number(weight) is not None:
            multiply(rounds.pop(), float(weight))
        elif tok == ")" and rounds:
            multiply(rounds.pop(), ROUND)
        elif tok == "]" and squares:
            multiply(squares.pop(), 1 / ROUND)
        else:
            res.append([tok, 1.0])
    for pos in rounds:  # unclosed brackets reach to the end, as in A1111
        multiply(pos, ROUND)
    for pos in squares:
        multiply(pos, 1 / ROUND)
    merged: list[list[Any]] = []
    for frag, w in res:
        if merged and merged[-1][1] == w:
            merged[-1][0] += frag
        else:
            merged.append([frag, w])
    return [(f, float(w)) for f, w in merged] or [("", 1.0)]


def _tokens(tokenizer: Any, runs: list[tuple[str, float]]) -> tuple[list[int], list[float]]:
    ids: list[int] = []
    weights: list[float] = []
    for frag, w in runs:
        if not frag:
            continue
        t = tokenizer(frag, add_special_tokens=False, truncation=False).input_ids
        ids += t
        weights += [w] * len(t)
    return ids, weights


def window(tokenizer: Any) -> int:
    return int(tokenizer.model_max_length) - 2


def needs_encoding(prompt: str, tokenizers: list[Any]) -> bool:
    """Whether ``prompt`` needs this module: syntax, or more tokens than one window."""
    runs = parse_weights(prompt)
    if runs != [(prompt, 1.0)]:
        return True
    if prompt.isascii() and all(len(prompt) <= window(tok) for tok in tokenizers):
        # No token is shorter than one character (byte-level BPE; lower-casing ASCII
        # keeps its length): it fits, and tokenizing it twice more per job, while the
        # job holds the GPU, would only say so.
        return False
    return any(len(_tokens(tok, runs)[0]) > window(tok) for tok in tokenizers)


def _chunks(
    tokenizer: Any, prompt: str, n_chunks: int | None = None
) -> tuple[list[list[int]], list[list[float]]]:
    ids, weights = _tokens(tokenizer, parse_weights(prompt))
    size = window(tokenizer)
    n = max(1, -(-len(ids) // size))
    if n_chunks is not None:
        n = max(n, n_chunks)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out_ids, out_w = [], []
    for c in range(n):
        part, pw = ids[c * size : (c + 1) * size], weights[c * size : (c + 1) * size]
        fill = size - len(part)
        out_ids.append([bos, *part, eos] + [pad] * fill)
        out_w.append([1.0, *pw, 1.0] + [1.0] * fill)
    return out_ids, out_w


def n_chunks(tokenizer: Any, prompt: str) -> int:
    return len(_chunks(tokenizer, prompt)[0])


def _encode(encoder: Any, tokenizer: Any, prompt: str, n: int, hidden: str) -> tuple[Any, Any]:
    """(hidden states of every window concatenated, the first window's pooled output)."""
    import torch

    ids, weights = _chunks(tokenizer, prompt, n)
    device = encoder.device
    states, pooled = [], None
    for chunk_ids, chunk_w in zip(ids, weights, strict=True):
        out = encoder(torch.tensor([chunk_ids], device=device), output_hidden_states=True)
        z = out.hidden_states[-2] if hidden == "penultimate" else out[0]
        if pooled is None:
            pooled = out[0]
        if any(w != 1.0 for w in chunk_w):
            w = torch.tensor(chunk_w, device=device, dtype=z.dtype)
            before = z.mean()
            z = z * w.reshape(1, -1, 1)
            z = z * (before / z.mean())
        states.append(z)
    return torch.cat(states, dim=1), pooled


def encode_sdxl(pipe: Any, prompt: str, negative: str) -> dict[str, Any]:
    """Keyword arguments for an SDXL pipeline: embeddings in place of the prompts."""
    import torch

    toks = [pipe.tokenizer, pipe.tokenizer_2]
    encs = [pipe.text_encoder, pipe.text_encoder_2]
    n = max(n_chunks(t, p) for t in toks for p in (prompt, negative))

    def both(text: str) -> tuple[Any, Any]:
        parts = [_encode(e, t, text, n, "penultimate") for e, t in zip(encs, toks, strict=True)]
        return torch.cat([parts[0][0], parts[1][0]], dim=-1), parts[1][1]

    embeds, pooled = both(prompt)
    out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if negative or not pipe.config.force_zeros_for_empty_prompt:
        neg, neg_pooled = both(negative)
        out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    # else diffusers fills zeros of the same shape, as it does for a plain prompt
    return out


def encode_sd15(pipe: Any, prompt: str, negative: str) -> dict[str, Any]:
    """Keyword arguments for a Stable Diffusion 1.x pipeline (one encoder, no pooling)."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    n = max(n_chunks(tok, prompt), n_chunks(tok, negative))
    embeds, _ = _encode(enc, tok, prompt, n, "last")
    neg, _ = _encode(enc, tok, negative, n, "last")
    return {"prompt_embeds": embeds, "negative_prompt_embeds": neg}


ENCODERS = {"sdxl": encode_sdxl, "sd15": encode_sd15}


def conditioning(family: str, pipe: Any, prompt: str, negative: str) -> dict[str, Any] | None:
    """Embeddings to pass instead of ``prompt``/``negative_prompt``, or None when diffusers
    can take the text as it is (no syntax, one window): then nothing changes."""
    encode = ENCODERS.get(family)
    if encode is None:
        return None
    toks = [
        t
        for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
        if t is not None
    ]
    if not any(needs_encoding(p, toks) for p in (prompt, negative) if p):
        return None
    return encode(pipe, prompt, negative)
