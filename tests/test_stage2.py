"""Stage 2 with blip2lab's own models: the loss's label masking, a Llama-family LLM end to
end, checkpoints with an LLM inside, the question-aware queries switch."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_text, tiny_config

from blip2lab.config import LLMConfig, TrainConfig
from blip2lab.decoding.generation import DecodingConfig
from blip2lab.dtypes import pick_dtype
from blip2lab.formats.native import load_pretrained, save_pretrained
from blip2lab.model.blip2 import Blip2
from blip2lab.training.loop import train


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                        initializer_range=0.2))  # a frozen LM whose outputs depend on its input


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _model(lm, **kw):
    cfg = tiny_config()
    cfg.llm = LLMConfig(kind="encoder_decoder" if lm.config.is_encoder_decoder else "decoder", name_or_path="(in test)")
    for k, v in kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(1)
    return Blip2(cfg, language_model=lm)


def _decoder_batch(gen, B=4):
    # [BOS] prompt(2) text(3) "\n"(=5) pad: labels -100 on BOS, prompt and padding
    ids = torch.randint(6, 64, (B, 8), generator=gen)
    ids[:, 0] = 1
    ids[:, 6] = 5
    ids[:, 7] = 0
    mask = (ids != 0).long()
    labels = ids.clone()
    labels[:, :3] = -100
    labels[:, 7] = -100
    return dict(llm_ids=ids, llm_mask=mask, llm_labels=labels, pixels=torch.randn(B, 3, 32, 32, generator=gen))


def test_decoder_loss_masks_visual_prompt_and_padding(gen):
    model = _model(_llama()).eval()
    batch = _decoder_batch(gen)
    loss = model(losses=("lm",), **batch)["lm_loss"]
    # By hand: logits over [Q visual ; text]; only positions whose NEXT token has a label count.
    visual = model.llm.visual_prompt(model.query_outputs(model.encode_image(batch["pixels"])))
    embeds = torch.cat([visual, model.llm.embed(batch["llm_ids"])], 1)
    mask = torch.cat([torch.ones(4, 4, dtype=torch.long), batch["llm_mask"]], 1)
    logits = model.llm.model(inputs_embeds=embeds, attention_mask=mask).logits  # (B, 4 + 8, V)
    terms = []
    for b in range(4):
        for t in range(3, 7):  # text tokens 3, 4, 5 and "\\n" at 6 are the targets
            terms.append(-F.log_softmax(logits[b, 4 + t - 1], -1)[batch["llm_ids"][b, t]])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)


def test_per_item_lm_loss_through_the_training_loop(gen):
    # Row 0 has four targets, rows 1-3 one: per item the rows weigh alike, per token row 0 weighs 4/7.
    model = _model(_llama()).eval()
    batch = _decoder_batch(gen)
    batch["llm_labels"][1:, 3:6] = -100
    per_token = model(losses=("lm",), **batch)["lm_loss"]
    per_item = model(losses=("lm",), lm_per_item=True, **batch)["lm_loss"]
    rows = [model(losses=("lm",), **{k: v[b:b + 1] for k, v in batch.items()})["lm_loss"] for b in range(4)]
    assert per_item.item() == pytest.approx(torch.stack(rows).mean().item(), abs=1e-5)
    assert per_token.item() == pytest.approx(((4 * rows[0] + sum(rows[1:])) / 7).item(), abs=1e-5)
    assert abs(per_item.item() - per_token.item()) > 1e-3
    # TrainConfig.lm_per_item reaches the model: the first logged loss is the per-item one.
    history = train(model, (batch for _ in range(10**6)), TrainConfig(stage=2, losses=("lm",), lm_per_item=True,
                                                                     warmup_steps=1, max_steps=1))
    assert history[0]["lm_loss"] == pytest.approx(per_item.item(), abs=1e-5)


def test_llama_end_to_end_loss_falls_and_generates(gen):
    model = _model(_llama())
    batch = _decoder_batch(gen)
    cfg = TrainConfig(stage=2, losses=("lm",), lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=20)
    history = train(model, (batch for _ in range(10**6)), cfg)
    assert sum(h["lm_loss"] for h in history[-3:]) < 0.8 * sum(h["lm_loss"] for h in history[:3])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and not any(n.startswith(("llm.model.", "image_encoder.")) for n in trained)
    model.eval()
    prompt = torch.tensor([[1, 9, 10], [0, 1, 9]])  # left-padded second row
    out = model.generate_text(model.encode_image(batch["pixels"][:2]), prompt, (prompt != 0).long(),
                              DecodingConfig(max_new_tokens=5), eos_token_id=5, pad_token_id=0)
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 5


def test_left_padding_does_not_change_the_answer(gen):
    model = _model(_llama()).eval()
    image = model.encode_image(torch.randn(1, 3, 32, 32, generator=gen))
    plain = model.generate_text(image, torch.tensor([[1, 9, 10]]), torch.ones(1, 3, dtype=torch.long),
                                DecodingConfig(max_new_tokens=6), eos_token_id=5, pad_token_id=0)
    padded = model.generate_text(image, torch.tensor([[0, 0, 1, 9, 10]]), torch.tensor([[0, 0, 1, 1, 1]]),
                                 DecodingConfig(max_new_tokens=6), eos_token_id=5, pad_token_id=0)
    assert plain.tolist() == padded.tolist()


def test_t5_prefix_lm_loss(gen):
    model = _model(_t5()).eval()
    ids = torch.randint(3, 64, (2, 5), generator=gen)
    target = torch.randint(3, 64, (2, 4), generator=gen)
    target[:, -1] = 1
    out = model(pixels=torch.randn(2, 3, 32, 32, generator=gen), losses=("lm",), llm_ids=ids,
                llm_mask=torch.ones_like(ids), llm_labels=target, llm_target_ids=target,
                llm_target_mask=torch.ones_like(target))
    assert torch.isfinite(out["lm_loss"]) and out["lm_loss"] > 0


@pytest.mark.parametrize("make", [_llama, _t5])
def test_checkpoint_with_llm_round_trip(tmp_path, gen, make):
    model = _model(make()).eval()
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    image = model.encode_image(torch.randn(2, 3, 32, 32, generator=gen))
    prompt = torch.tensor([[1, 9, 10], [1, 11, 12]])
    kw = dict(decoding=DecodingConfig(max_new_tokens=5), eos_token_id=2, pad_token_id=0)
    assert model.generate_text(image, prompt, torch.ones_like(prompt), **kw).tolist() == \
        loaded.generate_text(image, prompt, torch.ones_like(prompt), **kw).tolist()


def test_question_enters_the_qformer_only_when_switched_on(gen):
    model = _model(_llama(), qformer_question=True).eval()
    image = model.encode_image(torch.randn(2, 3, 32, 32, generator=gen))
    q_ids, q_mask = random_text(2, 5, gen)
    with_q = model.query_outputs(image, q_ids, q_mask)
    without = model.query_outputs(image)
    assert with_q.shape == without.shape and not torch.allclose(with_q, without)
    off = _model(_llama()).eval()
    with pytest.raises(ValueError, match="qformer_question"):
        off.query_outputs(image, q_ids, q_mask)


def test_precision_policy():
    assert pick_dtype("auto", "decoder", "cpu") == torch.float32
    assert pick_dtype("auto", "encoder_decoder", "cpu") == torch.float32
    assert pick_dtype("bfloat16", "encoder_decoder", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="T5"):
        pick_dtype("float16", "encoder_decoder", "cuda")


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_lean_decoder_equals_transformers_forward(gen, strategy):
    """fast_lm's static-cache decode gives the tokens transformers' own forward gives,
    with left padding and grouped-query attention (Llama)."""
    model = _model(_llama()).eval()
    image = model.encode_image(torch.randn(3, 3, 32, 32, generator=gen))
    prompt = torch.tensor([[0, 0, 1, 9, 10], [1, 11, 12, 13, 14], [0, 1, 20, 21, 22]])
    kw = dict(decoding=DecodingConfig(strategy=strategy, num_beams=3, max_new_tokens=7), eos_token_id=5,
              pad_token_id=0)
    fast = model.generate_text(image, prompt, (prompt != 0).long(), **kw)
    model.llm.use_fast_decode = False
    slow = model.generate_text(image, prompt, (prompt != 0).long(), **kw)
    assert fast.tolist() == slow.tolist()
