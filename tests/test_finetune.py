"""LoRA fine-tuning of a tiny official-layout checkpoint (tests/published.py), adapters on the
LLM and the Q-Former: only the adapters change, the result exports to a Hugging Face folder
(merged, or base weights with one peft adapter beside them, the Q-Former's fused qkv adapter
split into transformers' query, key and value) that transformers opens with the outputs of
blip2lab's model."""

import pytest
import torch
import train_data as D
from published import tiny_checkpoint

import blip2lab
from blip2lab.training import run as R
from blip2lab.training.export import export_trained
from blip2lab.training.finetune import LORA_TARGETS, QFORMER_LORA_TARGETS, lora_targets

Q = 32  # the published num_query_tokens


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    rows = D.write_images(root / "images", D.scenes(8))
    D.write_csv(root / "images" / "captions.csv", rows)
    source = tiny_checkpoint("blip2-opt-2.7b", root / "official")
    cfg = R.resolve("finetune", None, (f"data.path={root / 'images'}", f"out={root / 'out'}", f"model.source={source}",
                                       "finetune.mode=lora", "finetune.lora.targets=llm,qformer",
                                       "train.max_steps=2", "train.batch_size=4",
                                       "train.lr=1e-2", "train.warmup_steps=0", "progress=false"))
    summary = R.run(cfg)
    return root, source, summary


def test_only_the_adapters_train(trained):
    root, source, summary = trained
    assert set(summary["parameters"]["by_part"]) == {"llm.model", "qformer"}
    from safetensors.torch import load_file

    stored = load_file(str(root / "out" / "train" / "checkpoint" / R.TRAINABLE_NAME))
    assert stored and all("lora_" in k for k in stored)
    assert {k.split(".")[-3] for k in stored} == {"lora_A", "lora_B"}
    names = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in stored}
    assert names == set(LORA_TARGETS["opt"]) | set(QFORMER_LORA_TARGETS)
    before, after = blip2lab.load(str(source)).model.state_dict(), blip2lab.load(str(root / "out")).model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.split(".")[-2] in names for k in changed)  # merged into those only
    assert any(k.startswith("qformer.") and k.endswith("qkv.weight") for k in changed)


@torch.no_grad()
def _hf_logits(hf, pixels, ids):
    B = ids.shape[0]
    hf_ids = torch.cat([torch.full((B, Q), hf.config.image_token_index), ids], dim=1)
    return hf(pixel_values=pixels, input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids)).logits


@torch.no_grad()
def _our_logits(model, pixels, ids):
    visual = model.llm.visual_prompt(model.query_outputs(model.encode_image(pixels)))
    embeds = torch.cat([visual, model.llm.embed(ids)], dim=1)
    return model.llm.model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits


def test_export_merged_and_as_a_peft_adapter_reopen_in_transformers(trained, tmp_path):
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    root, source, _ = trained
    ours = blip2lab.load(str(root / "out")).model
    g = torch.Generator().manual_seed(0)
    pixels, ids = torch.randn(2, 3, 224, 224, generator=g), torch.randint(3, 50, (2, 5), generator=g)
    mine = _our_logits(ours, pixels, ids)
    merged = Blip2ForConditionalGeneration.from_pretrained(str(export_trained(root / "out", tmp_path / "m")),
                                                          dtype=torch.float32).eval()
    torch.testing.assert_close(_hf_logits(merged, pixels, ids), mine, atol=1e-4, rtol=1e-4)
    base = Blip2ForConditionalGeneration.from_pretrained(
        str(export_trained(root / "out", tmp_path / "a", adapter=True)), dtype=torch.float32).eval()
    original = Blip2ForConditionalGeneration.from_pretrained(str(source), dtype=torch.float32).eval()
    for k, v in original.state_dict().items():  # the unmerged base is the checkpoint trained from
        torch.testing.assert_close(base.state_dict()[k], v.float(), atol=1e-5, rtol=1e-5, msg=k)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "a" / "adapter")).eval()
    torch.testing.assert_close(_hf_logits(adapted, pixels, ids), mine, atol=1e-4, rtol=1e-4)
    layer0 = "qformer.encoder.layer.0."  # our fused qkv adapter as transformers' three projections, and the rest
    qformer = {f"{layer0}attention.attention.{n}" for n in ("query", "key", "value")} | \
              {f"{layer0}crossattention.attention.{n}" for n in ("query", "key", "value")} | \
              {f"{layer0}attention.output.dense", f"{layer0}crossattention.output.dense"}
    assert qformer <= {n.removeprefix("base_model.model.") for n, m in adapted.named_modules() if hasattr(m, "lora_A")}


def test_lora_targets_by_family(trained):
    _, source, _ = trained
    model = blip2lab.load(str(source)).model
    assert lora_targets(model, R.FinetuneConfig().lora) == {"llm": ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert LORA_TARGETS["llama"][-1] == "o_proj" and LORA_TARGETS["t5"] == ("q", "k", "v", "o")

