"""The frozen LLM's precision at inference (`blip2lab.load(..., llm_dtype=...)`,
`Blip2Pipeline.set_llm_dtype`): only the LLM changes dtype, decoding still works and says
the same, "auto" follows the hardware, and what must be refused is."""

import pytest
import torch
from app_fixture import build_tiny_shapes_pipeline

import blip2lab
from blip2lab.dtypes import native_bf16
from blip2lab.worlds.shapes import world


def test_bf16_llm_captions_as_fp32_and_only_the_llm_changes_dtype():
    torch.manual_seed(0)
    images = list(world.render_batch(world.make_split("test", 8, seed=0)))
    fp32 = blip2lab.load("shapes-opt")
    assert fp32.set_llm_dtype(None) == torch.float32  # the default keeps the checkpoint's
    before = fp32.caption(images)
    bf16 = blip2lab.load("shapes-opt", llm_dtype="bfloat16")
    m = bf16.model
    assert {p.dtype for p in m.llm.model.parameters()} == {torch.bfloat16}
    assert m.llm.projection.weight.dtype == torch.float32  # trained parts keep theirs
    assert {p.dtype for p in m.qformer.parameters()} == {torch.float32}
    after = bf16.caption(images)
    # The shipped model's captions survive the rounding (32 of 32 test scenes on the project's
    # CPU); a broken cast or a stale fp32 decoder state would give noise or an error.
    assert sum(a == b for a, b in zip(before, after)) >= 6, (before, after)
    question = "how many objects are there?"
    assert bf16.answer(images[0], question) == fp32.answer(images[0], question)
    # Back to fp32: the lean decoder is rebuilt for the new dtype, and the captions are the first ones.
    assert bf16.set_llm_dtype("float32") == torch.float32
    assert bf16.caption(images) == before


def test_auto_is_bf16_exactly_where_the_device_runs_it_natively():
    pipe = blip2lab.load("shapes-opt", llm_dtype="auto")
    expected = torch.bfloat16 if native_bf16("cpu") else torch.float32
    assert pipe.model.llm.model.dtype == expected


def test_refused_precisions(tmp_path):
    pipe = blip2lab.load(build_tiny_shapes_pipeline(tmp_path / "tiny"))
    with pytest.raises(ValueError, match="llm_dtype"):
        pipe.set_llm_dtype("bfloat17")
    with pytest.raises(ValueError, match="llm_dtype"):
        pipe.set_llm_dtype("int8")
    with pytest.raises(ValueError, match="llm_dtype"):
        pipe.set_llm_dtype(torch.int8)
    assert pipe.set_llm_dtype(torch.float64) == torch.float64 and pipe.set_llm_dtype("float32") == torch.float32
    assert pipe.set_llm_dtype("bf16") == torch.bfloat16 and pipe.set_llm_dtype("torch.float32") == torch.float32
    t5 = pipe.model.llm
    t5.kind = "encoder_decoder"  # pick_dtype's rule for T5, without building one
    with pytest.raises(ValueError, match="float16"):
        pipe.set_llm_dtype("float16")
    assert pipe.model.llm.model.dtype == torch.float32  # nothing was cast
