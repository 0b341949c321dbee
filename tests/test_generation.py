"""blip2lab.decoding.generation: parity with transformers' generate on a tiny random OPT, and toy cases."""

import pytest
import torch
from transformers import DynamicCache, OPTConfig, OPTForCausalLM

from blip2lab.config import ConfigError
from blip2lab.decoding.generation import DecodingConfig, decode_sequences, generate, kv_reorder

PAD = 1
VOCAB = 50


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: extra threads only add contention (4 s instead of 20 s on a shared box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=PAD, bos_token_id=2,
        eos_token_id=2, init_std=0.5,  # peaky distributions: no near-ties between candidates
    )
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (3, 5), generator=g)  # (B=3, T0=5), no padding


def opt_step(model):
    """StepFn over OPT with a KV cache; state = (cache or None, attention mask so far)."""

    def step(new_ids, state):
        cache, mask = state
        if cache is not None:  # the prompt's mask came with the state; later tokens are real
            mask = torch.cat([mask, mask.new_ones(new_ids.shape)], 1)
        out = model(input_ids=new_ids, attention_mask=mask, cache=cache, use_cache=True)
        return out.logits[:, -1], (out.cache, mask)

    return step


def ours(model, ids, cfg, eos, mask=None, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    return generate(opt_step(model), ids, (None, mask), cfg, eos_token_id=eos, pad_token_id=PAD, **kw)


def hf(model, ids, eos, mask=None, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD, **kw)
    return out[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def eos(model, prompts):
    """An id that greedy decoding actually emits early in some rows but not all."""
    free = ours(model, prompts, DecodingConfig(max_new_tokens=12), eos=[])
    for tok in free[0, 1:6].tolist():
        rows_with = [(free[r] == tok).any().item() for r in range(3)]
        if not all(rows_with):
            return tok
    pytest.fail("no early-stopping eos for this seed")


def test_greedy_matches_transformers(model, prompts, eos):
    got = ours(model, prompts, DecodingConfig(max_new_tokens=12), eos)
    want = hf(model, prompts, eos, do_sample=False, max_new_tokens=12)
    assert torch.equal(got, want)
    ended = (got == eos).any(1)
    assert ended.any() and not ended.all()  # some rows stopped early, then padded
    r = int(ended.nonzero()[0])
    stop = int((got[r] == eos).nonzero()[0])
    assert (got[r, stop + 1:] == PAD).all()


def test_greedy_left_padded_matches_transformers(model, eos):
    ids = torch.tensor([[PAD, PAD, 7, 8, 9], [4, 5, 6, 7, 8]])
    mask = (ids != PAD).long()
    mask[1] = 1
    for flags in ({}, {"repetition_penalty": 1.5}):
        # Pads are -1 in the history: ignored, like transformers' prompt_ignore_length.
        got = ours(model, ids, DecodingConfig(max_new_tokens=10, **flags), eos, mask=mask,
                   history_ids=ids.masked_fill(mask == 0, -1))
        want = hf(model, ids, eos, mask=mask, do_sample=False, max_new_tokens=10, **flags)
        assert torch.equal(got, want), flags


@pytest.mark.parametrize("length_penalty", [1.0, -1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_matches_transformers(model, prompts, eos, length_penalty, early_stopping):
    cfg = DecodingConfig(strategy="beam", num_beams=4, max_new_tokens=12, length_penalty=length_penalty,
                         early_stopping=early_stopping)
    got = ours(model, prompts, cfg, eos)
    want = hf(model, prompts, eos, do_sample=False, num_beams=4, max_new_tokens=12,
              length_penalty=length_penalty, early_stopping=early_stopping)
    assert torch.equal(got, want)


@pytest.mark.parametrize("flags", [
    {"repetition_penalty": 1.5},
    {"no_repeat_ngram_size": 2},
    {"min_new_tokens": 5},
    {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 5},
])
@pytest.mark.parametrize("beams", [1, 4])
def test_processors_match_transformers(model, prompts, eos, flags, beams):
    strategy = "beam" if beams > 1 else "greedy"
    cfg = DecodingConfig(strategy=strategy, num_beams=beams, max_new_tokens=12, **flags)
    got = ours(model, prompts, cfg, eos)
    want = hf(model, prompts, eos, do_sample=False, num_beams=beams, max_new_tokens=12, **flags)
    assert torch.equal(got, want)


def test_min_new_tokens_bites(model, prompts, eos):
    free = ours(model, prompts, DecodingConfig(max_new_tokens=12), eos)
    held = ours(model, prompts, DecodingConfig(max_new_tokens=12, min_new_tokens=5), eos)
    assert not (held[:, :5] == eos).any()
    assert not torch.equal(free, held)


def test_sampling_matches_transformers_under_global_seed(model, prompts, eos):
    flags = dict(temperature=0.7, top_k=10, top_p=0.9)
    torch.manual_seed(123)
    got = ours(model, prompts, DecodingConfig(strategy="sample", max_new_tokens=12, **flags), eos)
    torch.manual_seed(123)
    want = hf(model, prompts, eos, do_sample=True, max_new_tokens=12, **flags)
    assert torch.equal(got, want)


def test_sampling_seed_reproducible(model, prompts, eos):
    def run(seed, **kw):
        return ours(model, prompts, DecodingConfig(strategy="sample", max_new_tokens=12, seed=seed, **kw), [])

    assert torch.equal(run(0), run(0))
    assert any(not torch.equal(run(0), run(s)) for s in (1, 2, 3))
    greedy = ours(model, prompts, DecodingConfig(max_new_tokens=12), [])
    assert torch.equal(run(5, top_k=1), greedy)
    assert torch.equal(run(6, top_p=1e-6), greedy)


# ---- toy step functions: exact control over the logits ---------------------------------

EOS = 0


def toy_step(prefer_eos, vocab=8, calls=None):
    """Logits favour EOS (or never pick it) and otherwise token 3; counts calls."""

    def step(new_ids, state):
        if calls is not None:
            calls.append(new_ids.shape)
        logits = torch.zeros(new_ids.shape[0], vocab)
        logits[:, 3] = 2.0
        logits[:, EOS] = 5.0 if prefer_eos else -5.0
        return logits, state

    return step


@pytest.mark.parametrize("strategy,beams", [("greedy", 1), ("sample", 1), ("beam", 3)])
def test_max_new_tokens_exact(strategy, beams):
    cfg = DecodingConfig(strategy=strategy, num_beams=beams, max_new_tokens=7, seed=0)
    calls = []
    out = generate(toy_step(False, calls=calls), torch.zeros(2, 4, dtype=torch.long), None, cfg,
                   eos_token_id=EOS, pad_token_id=PAD, reorder=lambda s, i: s)
    assert out.shape == (2, 7) and out.dtype == torch.long
    assert len(calls) == 7 and calls[0] == (2, 4) and calls[1][1] == 1  # prompt once, then one token


@pytest.mark.parametrize("strategy,beams", [("greedy", 1), ("sample", 1), ("beam", 3)])
def test_min_new_tokens_forbids_eos(strategy, beams):
    cfg = DecodingConfig(strategy=strategy, num_beams=beams, max_new_tokens=10, min_new_tokens=4, seed=0)
    out = generate(toy_step(True), torch.zeros(2, 3, dtype=torch.long), None, cfg,
                   eos_token_id=[EOS], pad_token_id=PAD, reorder=lambda s, i: s)
    assert out.shape == (2, 5)
    assert (out[:, -1] == EOS).all() and not (out[:, :-1] == EOS).any()


def test_stops_when_all_rows_finished_and_greedy_never_reorders():
    calls = []

    def reorder(state, index):
        raise AssertionError("greedy must not reorder")

    out = generate(toy_step(True, calls=calls), torch.zeros(3, 2, dtype=torch.long), "state",
                   DecodingConfig(max_new_tokens=20), eos_token_id=EOS, pad_token_id=PAD, reorder=reorder)
    assert out.tolist() == [[EOS]] * 3 and len(calls) == 1


def test_beam_reorders_only_when_parents_change():
    """After the prompt, every beam has one dominant continuation: parents never change."""
    index_calls = []

    def step(new_ids, state):
        if new_ids.shape[1] > 1:  # the prompt: three distinct good first tokens
            logits = torch.full((new_ids.shape[0], 6), -30.0)
            logits[:, 2:5] = torch.tensor([4.0, 3.0, 2.0])
        else:
            logits = torch.full((new_ids.shape[0], 6), -30.0)
            logits[:, 5] = 10.0
        return logits, state

    def reorder(state, index):
        index_calls.append(index.tolist())
        return state

    out = generate(step, torch.zeros(2, 2, dtype=torch.long), None,
                   DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=5), eos_token_id=EOS,
                   pad_token_id=PAD, reorder=reorder)
    assert out.tolist() == [[2, 5, 5, 5, 5]] * 2
    assert index_calls == [[0, 0, 0, 1, 1, 1]]  # only the expansion from B prompt rows to B*K beams


def test_decode_sequences():
    toks = torch.tensor([[5, 6, 0, 1, 1], [7, 0, 0, 1, 1], [4, 4, 4, 4, 1], [9, 9, 9, 9, 9]])
    want = [[5, 6], [7], [4, 4, 4, 4], [9, 9, 9, 9, 9]]
    assert decode_sequences(toks, eos_token_id=0, pad_token_id=1) == want
    assert decode_sequences(toks, eos_token_id=[0, 9], pad_token_id=1)[3] == []


def test_kv_reorder_nested_and_cache():
    idx = torch.tensor([1, 1, 0])
    a, b = torch.arange(2), torch.arange(4).view(2, 2)
    out = kv_reorder({"a": a, "t": (b, None, 3), "l": [torch.tensor(7.0)]}, idx)
    assert out["a"].tolist() == [1, 1, 0] and out["t"][0].tolist() == [[2, 3], [2, 3], [0, 1]]
    assert out["t"][1:] == (None, 3) and out["l"][0].item() == 7.0

    cache = DynamicCache()
    k = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 3, 4).contiguous()
    cache.update(k, k.clone(), 0)
    cache = kv_reorder(cache, idx)
    assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("bad,field", [
    ({"num_beams": 0}, "num_beams"),
    ({"strategy": "sample", "top_p": 0.0}, "top_p"),
    ({"strategy": "sample", "temperature": 0.0}, "temperature"),
    ({"strategy": "nucleus"}, "strategy"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"min_new_tokens": 40}, "min_new_tokens"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"seed": 1.5}, "seed"),
])
def test_config_validation_names_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        DecodingConfig(**bad)
    assert issubclass(ConfigError, ValueError)
