"""Long prompts and (word:1.3) weighting: the parser, exactness, and the worker's images."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from producer.core.contract import Status
from tests.helpers import (
    Stack,
    bare_run,
    data_uri,
    mask_image,
    pixels,
    png,
    run_job,
    s3_get,
)
from worker.diffusion.prompts import conditioning, needs_encoding, parse_weights


@pytest.mark.parametrize(
    ("text", "runs"),
    [
        ("a red fox", [("a red fox", 1.0)]),
        ("a (red:1.3) fox", [("a ", 1.0), ("red", 1.3), (" fox", 1.0)]),
        ("(red)", [("red", 1.1)]),
        ("[red]", [("red", 1 / 1.1)]),
        ("((red))", [("red", 1.1 * 1.1)]),
        ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
        (r"\(not weighted\)", [("(not weighted)", 1.0)]),
        ("(open to the end", [("open to the end", 1.1)]),
        ("a: b", [("a: b", 1.0)]),
        ("(x:.)", [("x:.)", 1.1)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_weights(text: str, runs: list[tuple[str, float]]) -> None:
    got = parse_weights(text)
    assert [f for f, _ in got] == [f for f, _ in runs]
    assert [w for _, w in got] == pytest.approx([w for _, w in runs])


def test_plain_short_prompts_are_left_to_diffusers(bare_pipe: Any) -> None:
    toks = [bare_pipe.tokenizer, bare_pipe.tokenizer_2]
    assert not needs_encoding("a red fox", toks)
    assert needs_encoding("a (red:1.3) fox", toks)
    assert needs_encoding("fox " * 80, toks)  # tiny tokenizer: a byte per token
    assert conditioning("sdxl", bare_pipe, "a red fox", "fog") is None


def test_one_window_with_unit_weights_equals_diffusers_encoding(bare_pipe: Any) -> None:
    """The windowed encoder, given what diffusers can read, computes what diffusers does."""
    import torch

    from worker.diffusion.prompts import encode_sdxl

    with torch.inference_mode():
        ours = encode_sdxl(bare_pipe, "a red fox", "fog")
        pe, ne, pp, npp = bare_pipe.encode_prompt("a red fox", negative_prompt="fog", device="cpu")
        zeros = encode_sdxl(bare_pipe, "a (red:1.2) fox", "")
    assert torch.equal(ours["prompt_embeds"], pe)
    assert torch.equal(ours["negative_prompt_embeds"], ne)
    assert torch.equal(ours["pooled_prompt_embeds"], pp)
    assert torch.equal(ours["negative_pooled_prompt_embeds"], npp)
    assert "negative_prompt_embeds" not in zeros  # diffusers zeroes an empty negative


def test_long_prompt_keeps_two_windows(bare_pipe: Any) -> None:
    import torch

    from worker.diffusion.prompts import encode_sdxl

    with torch.inference_mode():
        out = encode_sdxl(bare_pipe, "fox " * 30, "short negative")  # 90 tokens
    assert out["prompt_embeds"].shape[1] == 2 * 77
    assert out["negative_prompt_embeds"].shape == out["prompt_embeds"].shape


HEAD = "a lighthouse on a cliff above a stormy sea " * 3  # > 75 tokens: one per letter


@pytest.mark.slow
def test_worker_reads_past_77_tokens_and_weights(stack: Stack, bare_pipe: Any) -> None:
    tail_a, tail_b = HEAD + "with red roofs", HEAD + "with blue roofs"
    req = {"seed": 12, "steps": 3}
    a, _ = run_job(stack, prompt=tail_a, **req)
    b, _ = run_job(stack, prompt=tail_b, **req)
    # diffusers alone truncates both to the same 77 tokens: the same image
    kw = {"num_inference_steps": 3, "guidance_scale": 5.0, "width": 64, "height": 64}
    assert pixels(bare_run(bare_pipe, 12, prompt=tail_a, **kw)) == pixels(
        bare_run(bare_pipe, 12, prompt=tail_b, **kw)
    )
    # the worker reads the tail
    assert a["status"] == b["status"] == Status.SUCCEEDED
    assert a["outputs"][0]["sha256"] != b["outputs"][0]["sha256"]

    plain, _ = run_job(stack, prompt="a red fox", **req)
    weighted, _ = run_job(stack, prompt="a (red:1.3) fox", **req)
    unit, _ = run_job(stack, prompt="a (red:1.0) fox", **req)

    def px(record: dict[str, Any]) -> bytes:
        return pixels(Image.open(io.BytesIO(s3_get(stack, record["outputs"][0]["key"]))))

    assert px(weighted) != px(plain)
    assert px(unit) == px(plain)  # weight 1 through the windowed path: the same pixels
    assert px(plain) == pixels(bare_run(bare_pipe, 12, prompt="a red fox", **kw))

    # embeddings reach img2img and inpainting too (the same modules, other pipelines)
    image = data_uri(png((90, 160, 60)))
    extras: tuple[dict[str, Any], ...] = ({}, {"mask": data_uri(mask_image())})
    for extra in extras:
        w, _ = run_job(
            stack,
            prompt="a (red:1.3) fox",
            negative_prompt="(fog:1.2)",
            image=image,
            **req,
            **extra,
        )
        p, _ = run_job(
            stack, prompt="a red fox", negative_prompt="fog", image=image, **req, **extra
        )
        assert px(w) != px(p)
