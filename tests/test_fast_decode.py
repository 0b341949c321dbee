"""fast_lm's decode paths give the tokens transformers' own forward gives: the eager lean
decoder, and the static path (buffers reused across calls, the CUDA-graph runner's logic
replayed eagerly on the CPU), for OPT, Llama and T5, greedy and beam, with padding."""

import contextlib

import pytest
import torch
from conftest import tiny_config

from blip2lab.config import LLMConfig
from blip2lab.decoding.fast_lm import FastDecoder, FastOPT, FastT5, StaticSteps
from blip2lab.decoding.generation import DecodingConfig
from blip2lab.model.blip2 import Blip2

EOS, PAD = 5, 0


def _lm(family: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    if family == "opt":
        lm = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                      num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                      bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD))
    elif family == "llama":
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD))
    else:
        lm = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                 num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                                                 pad_token_id=PAD, eos_token_id=EOS, tie_word_embeddings=False))
    with torch.no_grad():  # decisive logits: choices far from ties
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return lm


def _model(family: str) -> Blip2:
    lm = _lm(family)
    cfg = tiny_config()
    cfg.llm = LLMConfig(kind="encoder_decoder" if lm.config.is_encoder_decoder else "decoder", name_or_path="(test)")
    torch.manual_seed(1)
    return Blip2(cfg, language_model=lm).eval()


def _inputs(family: str, B: int = 3):
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(B, 3, 32, 32, generator=g)
    prompt = torch.randint(6, 64, (B, 5), generator=g)
    # decoder-only prompts are left-padded, T5's encoder prompt right-padded
    mask = torch.ones_like(prompt)
    if family == "t5":
        mask[0, 3:] = 0
    else:
        mask[0, :2] = 0
        prompt[:, 2] = 1  # BOS after the padding of row 0
    return pixels, prompt.masked_fill(mask == 0, PAD), mask


def _generate(model, image, prompt, mask, strategy, new_tokens=7):
    decoding = DecodingConfig(strategy=strategy, num_beams=3, max_new_tokens=new_tokens)
    return model.generate_text(image, prompt, mask, decoding, eos_token_id=EOS, pad_token_id=PAD).tolist()


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
@pytest.mark.parametrize("family", ["opt", "llama", "t5"])
@torch.no_grad()
def test_lean_and_static_paths_equal_transformers(family, strategy):
    model = _model(family)
    pixels, prompt, mask = _inputs(family)
    image = model.encode_image(pixels)
    llm = model.llm
    llm.static_decode = False
    eager = _generate(model, image, prompt, mask, strategy)
    llm.static_decode = True
    static = _generate(model, image, prompt, mask, strategy)
    # A second call of the same shape reuses the buffers (stale values from the first call there).
    buffers = {key: runner.state["k"].data_ptr() for key, runner in llm.fast_decoder()._static.items()}
    static_again = _generate(model, image, prompt, mask, strategy)
    assert {key: runner.state["k"].data_ptr() for key, runner in llm.fast_decoder()._static.items()} == buffers
    llm.use_fast_decode = False
    reference = _generate(model, image, prompt, mask, strategy)
    assert eager == static == static_again == reference


@torch.no_grad()
def test_static_state_has_beam_rows_and_steps_through_the_runner():
    model = _model("opt")
    pixels, prompt, mask = _inputs("opt", B=2)
    image = model.encode_image(pixels)
    model.llm.static_decode = True
    calls = []
    original = StaticSteps.__call__

    def counting(self, ids):
        calls.append(ids.shape[0])
        return original(self, ids)

    StaticSteps.__call__ = counting
    try:
        _generate(model, image, prompt, mask, "beam", new_tokens=6)
    finally:
        StaticSteps.__call__ = original
    fast = model.llm.fast_decoder()
    assert isinstance(fast, FastOPT)
    (runner,) = fast._static.values()
    assert runner.state["k"].shape[0] == 2 * 3  # B * K rows, allocated once
    assert calls == [6] * 5  # every step after the prompt's, on the beam rows
    assert runner.state["length"] == prompt.shape[1] + model.config.qformer.num_queries + 5


@torch.no_grad()
def test_static_shapes_are_bounded():
    model = _model("t5")
    pixels, prompt, mask = _inputs("t5")
    image = model.encode_image(pixels)
    model.llm.static_decode = True
    for new_tokens in (3, 4, 5):
        _generate(model, image, prompt, mask, "greedy", new_tokens=new_tokens)
    fast = model.llm.fast_decoder()
    assert isinstance(fast, FastT5)
    assert [key[1] for key in fast._static] == [4, 5]  # capacities kept: the two most recent


@torch.no_grad()
def test_t5_step_logits_equal_transformers():
    """The first decoder steps' logits, against T5ForConditionalGeneration on the same encoder
    output, with padding in the encoder input."""
    lm = _lm("t5").eval()
    fast = FastT5(lm)
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 6, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    encoder_out = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    state = fast.new_state(2, 4, encoder_out.dtype, encoder_out.device, source_len=6)
    fast.begin(state, encoder_out, mask)
    ids = torch.tensor([[0, 7, 9, 11], [0, 8, 10, 12]])
    reference = lm(encoder_outputs=(encoder_out,), attention_mask=mask, decoder_input_ids=ids).logits  # (2, 4, V)
    for t in range(4):
        torch.testing.assert_close(fast.step(ids[:, t:t + 1], state), reference[:, t], atol=1e-5, rtol=1e-5)


def test_static_buffers_outlive_inference_mode():
    """Buffers allocated under torch.inference_mode serve a later call under no_grad."""
    model = _model("opt")
    pixels, prompt, mask = _inputs("opt")
    model.llm.static_decode = True
    with torch.inference_mode():
        image = model.encode_image(pixels)
        first = _generate(model, image, prompt, mask, "greedy")
    with torch.no_grad():
        again = _generate(model, image.clone(), prompt, mask, "greedy")
    assert first == again


class EagerRecorder:
    """CudaGraphRecorder's stand-in off CUDA: recording keeps the function (which, like a
    capture, does not run it), a replay runs it. Everything around the CUDA calls is real."""

    def __init__(self, fail: bool = False):
        self.fail, self.recorded, self.replays = fail, 0, 0

    def warm_up(self):
        return contextlib.nullcontext()

    def record(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.recorded += 1

        def replay():
            self.replays += 1
            fn()

        return replay


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
@pytest.mark.parametrize("family", ["opt", "t5"])
@torch.no_grad()
def test_recorded_steps_replay_to_the_same_tokens(monkeypatch, family, strategy):
    model = _model(family)
    pixels, prompt, mask = _inputs(family)
    image = model.encode_image(pixels)
    model.llm.static_decode = False
    eager = _generate(model, image, prompt, mask, strategy, new_tokens=6)
    recorder = EagerRecorder()
    monkeypatch.setattr(FastDecoder, "recorder_for", lambda self, device: recorder)
    model.llm.static_decode = True
    assert _generate(model, image, prompt, mask, strategy, new_tokens=6) == eager
    assert recorder.recorded == recorder.replays == 5  # one recording per cache length, the 5 steps after the prompt
    assert _generate(model, image, prompt, mask, strategy, new_tokens=6) == eager
    assert (recorder.recorded, recorder.replays) == (5, 10)  # the second call replays only


@torch.no_grad()
def test_failed_recording_falls_back_to_eager_steps(monkeypatch):
    model = _model("opt")
    pixels, prompt, mask = _inputs("opt")
    image = model.encode_image(pixels)
    eager = _generate(model, image, prompt, mask, "beam")
    monkeypatch.setattr(FastDecoder, "recorder_for", lambda self, device: EagerRecorder(fail=True))
    model.llm.static_decode = True
    with pytest.warns(UserWarning, match="decoding eagerly"):
        assert _generate(model, image, prompt, mask, "beam") == eager
    (runner,) = model.llm.fast_decoder()._static.values()
    assert runner.recorder is None and "not permitted" in runner.graph_error and not runner.graphs


@torch.no_grad()
def test_release_drops_static_state():
    model = _model("opt")
    pixels, prompt, mask = _inputs("opt")
    model.llm.static_decode = True
    image = model.encode_image(pixels)
    first = _generate(model, image, prompt, mask, "greedy")
    fast = model.llm.fast_decoder()
    assert fast._static
    fast.release()
    assert not fast._static
    assert _generate(model, image, prompt, mask, "greedy") == first and fast._static
