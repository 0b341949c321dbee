"""Real-size BLIP-2 against transformers on one GPU, side by side in one run: random weights,
bf16, EVA ViT-g (1408 wide, 39 layers, 224 px, patch 14) + Q-Former (768 x 12, 32 queries)
+ OPT-2.7B or FlanT5-XL sizes. Run through benchmarks/gpu.sh:

    bash benchmarks/gpu.sh [OUT.json]          # CUDA, real sizes (default benchmarks/results/gpu.json)
    bash benchmarks/gpu.sh --tiny [OUT.json]   # CPU dry run of the same code at tiny sizes

Figures, each blip2lab vs transformers on the same weights and inputs, outputs checked, peak
GPU memory of each (the extra over the weights, measured on its first call; blip2lab's
includes the static cache and CUDA graphs it keeps for later calls):
  caption_opt_greedy, caption_opt_beam5, caption_t5_greedy, caption_t5_beam5: 30 new tokens
    at batch 32 (EOS forbidden until then), img/s including the ViT and Q-Former, share of
    the batch's sequences that are token-identical;
  itm: ITM logits including the ViT at batch 64 (Blip2ForImageTextRetrieval), pairs/s;
  qformer: the Q-Former's joint (ITM-style) pass at batch 32, img/s;
  vit: the frozen ViT (+ ln_vision, HF's post_layernorm) at batch 32, img/s.
And one figure against another peer: stage1, the stage-1 training step (ITC + ITM + ITG,
bf16 autocast) at the ViT-g + BERT-base Q-Former size against the LAVIS-style step
(benchmarks/stage1_step.py, run as a subprocess: ours on cached ViT features, the peer
recomputing the ViT every step; samples/s, the ratio, the ViT's share of the peer's step,
peak CUDA memory and the two loss curves' agreement). And fine-tuning at the real size, no
peer: finetune_paper, finetune_lora, finetune_lora_8bit, a few steps of `blip2lab train finetune`
(its own code, training/run.py) on random weights of Salesforce/blip2-opt-2.7b's exact shape,
Q-Former only (the paper's mode), LoRA on OPT, LoRA over 8-bit OPT (bitsandbytes); samples/s,
peak CUDA memory beside the --plan estimate (benchmarks/finetune_step.py, as a subprocess).

Precision as transformers runs BLIP-2: everything bf16 except the Q-Former box (query
tokens, Q-Former, its text embeddings), kept in fp32 as `_keep_in_fp32_modules` names it;
blip2lab likewise. The frozen LLM is one module shared by both models (`weights.from_hf`).

Random weights make every next-token distribution nearly flat: the top two of 50k logits
are typically 0.2 sigma apart, where bf16 rounding already reaches. A trained LM puts most
of its mass on a few tokens; `peaked_head` gives the random LM that shape (the output rows
of 64 fixed random tokens scaled 8x, same tensor for both models). The share of identical
sequences is reported with the peaked head (the timed runs) and, as a diagnostic, for the
plain random head (greedy), never assumed.

Each part runs under its own time budget, in order of importance (OPT captioning, FlanT5
captioning, stage 1, ITM, Q-Former, ViT, then fine-tuning, which needs a run of its own:
`--parts finetune`, about 4 minutes); a failure or timeout is recorded in the JSON, which is
rewritten after every figure, and the next part runs. The parts that run a subprocess (stage 1,
fine-tuning) run it in its own process group, stopped whole when the budget runs out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

STARTED = time.perf_counter()  # the --deadline counts from here (torch imported, the rest to come)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import interleaved_medians  # noqa: E402


@dataclass
class Size:
    vision: tuple  # width, layers, heads, mlp, image size, patch
    qformer: tuple  # width, layers, heads, ffn
    opt: dict  # OPTConfig fields
    t5: dict  # T5Config fields
    caption_batch: int
    itm_batch: int
    qformer_batch: int
    vit_batch: int
    new_tokens: int
    beams: int
    repeats: int  # timed runs per contender, after one untimed warm-up
    stage1: tuple  # benchmarks/stage1_step.py: size, batch, images, steps, warm-up steps
    finetune: str  # benchmarks/finetune_step.py's size (its SIZES: batch, steps, images)
    budgets: dict = field(default_factory=dict)  # part -> seconds
    queries: int = 32
    text_len: int = 32  # ITM / Q-Former caption length
    peaked_tokens: int = 64
    peaked_scale: float = 8.0


SIZES = {
    "real": Size(
        vision=(1408, 39, 16, 6144, 224, 14), qformer=(768, 12, 12, 3072),
        opt=dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240, vocab_size=50272),
        t5=dict(d_model=2048, num_layers=24, num_heads=32, d_kv=64, d_ff=5120, vocab_size=32128),
        caption_batch=32, itm_batch=64, qformer_batch=32, vit_batch=32, new_tokens=30, beams=5, repeats=3,
        # Stage 1 at batch 128: the paper's per-GPU batch is ~105 (1,680 on 16 A100s for ViT-g); at 64
        # (2026-11-27, H200: 182 vs 284 ms a step) the Q-Former step was bound by launches, not flops.
        stage1=("g", 128, 256, 30, 6), finetune="real",
        budgets=dict(caption_opt=150, caption_t5=140, stage1=150, itm=40, qformer=25, vit=25, finetune=330)),
    "tiny": Size(
        vision=(64, 2, 4, 128, 32, 8), qformer=(64, 2, 4, 128),
        opt=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=1000),
        t5=dict(d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128, vocab_size=1000),
        caption_batch=4, itm_batch=8, qformer_batch=4, vit_batch=4, new_tokens=30, beams=5, repeats=1,
        stage1=("tiny", 8, 32, 6, 2), finetune="tiny",
        budgets=dict(caption_opt=60, caption_t5=60, stage1=90, itm=30, qformer=30, vit=30, finetune=90),
        peaked_tokens=16),
}
PARTS = ("caption_opt", "caption_t5", "stage1", "itm", "qformer", "vit", "finetune")
FINETUNE_MODES = ("paper", "lora", "lora_8bit")
FIGURES = {"caption_opt": ("caption_opt_greedy", "caption_opt_beam5"),
           "caption_t5": ("caption_t5_greedy", "caption_t5_beam5"), "stage1": ("stage1",), "itm": ("itm",),
           "qformer": ("qformer",), "vit": ("vit",), "finetune": tuple(f"finetune_{m}" for m in FINETUNE_MODES)}
# The Q-Former box, which transformers keeps in fp32 (Blip2PreTrainedModel._keep_in_fp32_modules,
# plus the retrieval model's text embeddings that feed it).
HF_FP32_CHILDREN = ("qformer", "embeddings")


# ---------------------------------------------------------------------------------------
# Bookkeeping: budgets, the JSON, one line per figure
# ---------------------------------------------------------------------------------------


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_budget(seconds: float):
    """Raise PartTimeout in this (main) thread after `seconds`."""
    def expire(signum, frame):
        raise PartTimeout(f"over its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Report:
    """The results JSON, rewritten (atomically) after every figure and part."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta, "figures": {}, "parts": {}, "errors": {}}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)

    def figure(self, name: str, row: dict) -> None:
        self.data["figures"][name] = row
        self.write()
        unit = row["unit"]
        check = (f"identical {row['identical']}/{row['rows']}" if "identical" in row
                 else f"max|diff| {row['max_abs_diff']:.2e} (tol {row['tolerance']:g})")
        print(f"{name:20s} transformers {row['transformers_per_s']:8.1f} {unit}  blip2lab {row['blip2lab_per_s']:8.1f} "
              f"{unit}  ratio {row['ratio']:5.2f}x  {check}  peak extra GB {_gb(row['transformers_peak_gb'])} / "
              f"{_gb(row['blip2lab_peak_gb'])}", flush=True)


def _gb(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float | None]:
    """Run once: output, seconds, and the peak memory this call added over what was allocated
    before (None off CUDA)."""
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    return out, seconds, peak


def compare(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict:
    """First calls (outputs, memory, cold time), then interleaved timed runs after a warm-up."""
    out, cold, peak = {}, {}, {}
    for who, fn in fns.items():
        out[who], cold[who], peak[who] = first_call(fn, device)

    def synced(fn):
        return lambda: (fn(), sync(device))

    times = interleaved_medians({k: synced(f) for k, f in fns.items()}, repeats=repeats, warmup=1)
    return {"out": out, "cold_s": cold, "peak_gb": peak, "s": times}


def figure_row(result: dict, per_call: int, unit: str, **extra) -> dict:
    t, o = result["s"]["transformers"], result["s"]["blip2lab"]
    return {"unit": unit, "per_call": per_call, "transformers_per_s": per_call / t, "blip2lab_per_s": per_call / o,
            "ratio": t / o, "transformers_s": t, "blip2lab_s": o,
            "transformers_first_call_s": result["cold_s"]["transformers"],
            "blip2lab_first_call_s": result["cold_s"]["blip2lab"],
            "transformers_peak_gb": result["peak_gb"]["transformers"],
            "blip2lab_peak_gb": result["peak_gb"]["blip2lab"]} | extra


def identical_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    rows_a, rows_b = a.tolist(), b.tolist()
    return sum(x == y for x, y in zip(rows_a, rows_b))


# ---------------------------------------------------------------------------------------
# Models: transformers' BLIP-2 at a size, and blip2lab's converted from it
# ---------------------------------------------------------------------------------------


def hf_config(size: Size, lm: str | None):
    from transformers import Blip2Config, OPTConfig, T5Config

    width, layers, heads, mlp, image, patch = size.vision
    qw, ql, qh, qf = size.qformer
    text, image_token = None, None
    if lm == "opt":
        o = size.opt
        image_token = o["vocab_size"]  # one extra row for BLIP-2's image token
        text = OPTConfig(**(o | dict(vocab_size=o["vocab_size"] + 1)), word_embed_proj_dim=o["hidden_size"],
                         max_position_embeddings=2048, bos_token_id=2, eos_token_id=2, pad_token_id=1).to_dict()
    elif lm == "t5":
        t = size.t5
        image_token = t["vocab_size"]
        text = T5Config(**(t | dict(vocab_size=t["vocab_size"] + 1)), num_decoder_layers=t["num_layers"],
                        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                        tie_word_embeddings=False).to_dict()  # FlanT5's LM head is its own
    return Blip2Config(
        vision_config=dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=mlp, image_size=image, patch_size=patch),
        qformer_config=dict(hidden_size=qw, num_hidden_layers=ql, num_attention_heads=qh, intermediate_size=qf,
                            encoder_hidden_size=width, vocab_size=30523, use_qformer_text_input=lm is None),
        text_config=text, num_query_tokens=size.queries, image_token_index=image_token,
    )


def peaked_ids(vocab: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """The fixed random token ids whose output rows `peaked_head` scales."""
    # A CPU generator and device, explicitly: this runs inside build_pair's `with torch.device(cuda)`.
    return torch.randperm(vocab, generator=torch.Generator().manual_seed(seed), device="cpu")[:tokens]


def peaked_head(lm: torch.nn.Module, tokens: int, scale: float) -> None:
    """Give a random LM a trained LM's peaked next-token distribution: the output-embedding
    rows of `tokens` fixed random ids are multiplied by `scale` (in place; for OPT the input
    embeddings share the tensor). Each step then picks among those few tokens, with the
    runner-up far behind: near-ties, which bf16 rounding would decide, become rare."""
    head = lm.get_output_embeddings().weight  # (V, D)
    with torch.no_grad():
        head[peaked_ids(head.shape[0], tokens).to(head.device)] *= scale


def build_pair(size: Size, lm: str | None, device: torch.device, dtype: torch.dtype):
    """transformers' model (Blip2ForConditionalGeneration with `lm`, or Blip2ForImageTextRetrieval
    when lm is None) built directly on `device`, and blip2lab's model converted from it."""
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    from blip2lab.formats.hf import from_hf

    config = hf_config(size, lm)
    with torch.device(device):
        torch.manual_seed(0)
        hf = (Blip2ForConditionalGeneration if lm else Blip2ForImageTextRetrieval)(config).eval()
        for name, child in hf.named_children():
            if name not in HF_FP32_CHILDREN:
                child.to(dtype)
        if lm:
            peaked_head(hf.language_model, size.peaked_tokens, size.peaked_scale)
        ours = from_hf(hf).eval()
    ours.image_encoder.to(dtype)  # the frozen tower, as HF's vision_model
    ours.ln_vision.to(dtype)  # HF's post_layernorm, part of its vision_model
    if ours.llm is not None:
        ours.llm.projection.to(dtype)  # HF's language_projection
        ours.llm.static_decode = True  # static cache + CUDA graphs (eagerly replayed off CUDA)
    return hf, ours


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------


def part_caption(size: Size, lm: str, device: torch.device, dtype: torch.dtype, report: Report) -> None:
    from blip2lab.decoding.generation import DecodingConfig

    hf, ours = build_pair(size, lm, device, dtype)
    B, Q, L = size.caption_batch, size.queries, size.new_tokens
    image = size.vision[4]
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(B, 3, image, image, generator=g).to(device, dtype)
    text = hf.config.text_config
    eos, pad = text.eos_token_id, text.pad_token_id
    if lm == "opt":  # [Q visual][BOS], the captioning prompt of blip2-opt
        prompt = torch.full((B, 1), text.bos_token_id, dtype=torch.long, device=device)
    else:  # FlanT5: the encoder sees the visual prompt alone; the decoder starts at its start token
        prompt = torch.zeros(B, 0, dtype=torch.long, device=device)
    hf_ids = torch.cat([torch.full((B, Q), hf.config.image_token_index, device=device), prompt], 1)

    def runners(beams: int):
        @torch.inference_mode()
        def run_hf():
            out = hf.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids),
                              max_new_tokens=L, min_new_tokens=L, num_beams=beams, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad)
            return out[:, hf_ids.shape[1]:] if lm == "opt" else out[:, 1:]  # the new tokens only

        @torch.inference_mode()
        def run_ours():
            decoding = DecodingConfig(strategy="beam" if beams > 1 else "greedy", num_beams=beams,
                                      max_new_tokens=L, min_new_tokens=L)
            return ours.generate_text(ours.encode_image(pixels), prompt, torch.ones_like(prompt), decoding,
                                      eos_token_id=eos, pad_token_id=pad)

        return {"transformers": run_hf, "blip2lab": run_ours}

    # Diagnostic: greedy agreement with the plain random head (the peaked rows divided back out).
    # It is each model's very first generate call: blip2lab's records its CUDA graphs here.
    plain, plain_s = _plain_head_agreement(hf.language_model, size, runners(1), device)

    fast = ours.llm.fast_decoder()
    for beams, name in ((1, f"caption_{lm}_greedy"), (size.beams, f"caption_{lm}_beam5")):
        if fast is not None:
            fast.release()  # so the first call's peak memory counts the static cache and graphs it allocates
        result = compare(runners(beams), device, size.repeats)
        a, b = result["out"]["transformers"], result["out"]["blip2lab"]
        same = identical_rows(a, b) if a.shape == b.shape else 0
        graphs = sum(len(r.graphs) for r in fast._static.values()) if fast is not None else 0
        extra = {"identical": same, "rows": B, "identical_share": same / B, "new_tokens": L, "beams": beams,
                 "batch": B, "blip2lab_cuda_graphs": graphs,
                 "blip2lab_graph_error": next((r.graph_error for r in fast._static.values() if r.graph_error), None)}
        if beams == 1:
            extra |= {"identical_share_plain_head": plain, "transformers_very_first_call_s": plain_s["transformers"],
                      "blip2lab_very_first_call_s": plain_s["blip2lab"]}
        report.figure(name, figure_row(result, B, "img/s", **extra))


def _plain_head_agreement(lm_module: torch.nn.Module, size: Size, fns: dict,
                          device: torch.device) -> tuple[float, dict[str, float]]:
    """Greedy token agreement (share of rows) with the LM head as initialised, before the
    peaked rows: how close the two implementations' arithmetic is on flat distributions.
    Also the seconds of each call."""
    head = lm_module.get_output_embeddings().weight
    ids = peaked_ids(head.shape[0], size.peaked_tokens).to(head.device)
    with torch.no_grad():
        saved = head[ids].clone()
        head[ids] /= size.peaked_scale  # a power of two: exactly the initial rows again
    try:
        (a, ta, _), (b, tb, _) = first_call(fns["transformers"], device), first_call(fns["blip2lab"], device)
        share = identical_rows(a, b) / a.shape[0] if a.shape == b.shape else 0.0
        return share, {"transformers": ta, "blip2lab": tb}
    finally:
        with torch.no_grad():
            head[ids] = saved


_RETRIEVAL: dict = {}


def retrieval_pair(size: Size, device: torch.device, dtype: torch.dtype):
    """One Blip2ForImageTextRetrieval pair for the ITM, Q-Former and ViT parts."""
    if "pair" not in _RETRIEVAL:
        _RETRIEVAL["pair"] = build_pair(size, None, device, dtype)
    return _RETRIEVAL["pair"]


def _text(size: Size, B: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (B, size.text_len), generator=g).to(device)
    return ids, torch.ones_like(ids)


def part_itm(size: Size, device: torch.device, dtype: torch.dtype, report: Report) -> None:
    hf, ours = retrieval_pair(size, device, dtype)
    B, image = size.itm_batch, size.vision[4]
    pixels = torch.randn(B, 3, image, image, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    ids, mask = _text(size, B, device)

    @torch.inference_mode()
    def run_hf():
        return hf(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                  use_image_text_matching_head=True).logits_per_image  # (B, 2)

    @torch.inference_mode()
    def run_ours():
        return ours.itm_logits(ours.encode_image(pixels), ids, mask)  # (B, 2)

    result = compare({"transformers": run_hf, "blip2lab": run_ours}, device, size.repeats)
    a, b = result["out"]["transformers"].float(), result["out"]["blip2lab"].float()
    diff = (a - b).abs().max().item()
    tol = 5e-2 if dtype != torch.float32 else 1e-4  # HF's ITM head runs in bf16, ours in fp32
    report.figure("itm", figure_row(result, B, "pairs/s", max_abs_diff=diff, tolerance=tol, ok=diff <= tol,
                                    same_decision_share=(a.argmax(1) == b.argmax(1)).float().mean().item(),
                                    batch=B))


def part_qformer(size: Size, device: torch.device, dtype: torch.dtype, report: Report) -> None:
    hf, ours = retrieval_pair(size, device, dtype)
    B, Q = size.qformer_batch, size.queries
    width, _, _, _, image, patch = size.vision
    N = (image // patch) ** 2 + 1
    g = torch.Generator().manual_seed(2)
    features = torch.randn(B, N, width, generator=g).to(device)  # after ln_vision, fp32 as the Q-Former
    ids, mask = _text(size, B, device)

    @torch.inference_mode()
    def run_hf():
        embeds = hf.embeddings(input_ids=ids, query_embeds=hf.query_tokens.expand(B, -1, -1))
        full_mask = torch.cat([torch.ones(B, Q, dtype=mask.dtype, device=device), mask], dim=1)
        return hf.qformer(query_embeds=embeds, query_length=Q, attention_mask=full_mask,
                          encoder_hidden_states=features).last_hidden_state

    @torch.inference_mode()
    def run_ours():
        return ours.qformer.encode_joint(features, ids, mask, "itm").hidden

    result = compare({"transformers": run_hf, "blip2lab": run_ours}, device, size.repeats)
    diff = (result["out"]["transformers"].float() - result["out"]["blip2lab"].float()).abs().max().item()
    tol = 1e-3  # both fp32; different op order (fused q/k/v)
    report.figure("qformer", figure_row(result, B, "img/s", max_abs_diff=diff, tolerance=tol, ok=diff <= tol,
                                        batch=B, text_len=size.text_len))


def part_vit(size: Size, device: torch.device, dtype: torch.dtype, report: Report) -> None:
    hf, ours = retrieval_pair(size, device, dtype)
    B, image = size.vit_batch, size.vision[4]
    pixels = torch.randn(B, 3, image, image, generator=torch.Generator().manual_seed(3)).to(device, dtype)

    @torch.inference_mode()
    def run_hf():
        return hf.vision_model(pixel_values=pixels).last_hidden_state  # post_layernorm included

    @torch.inference_mode()
    def run_ours():
        return ours.encode_image(pixels)  # the tower + ln_vision (= HF's post_layernorm)

    result = compare({"transformers": run_hf, "blip2lab": run_ours}, device, size.repeats)
    diff = (result["out"]["transformers"].float() - result["out"]["blip2lab"].float()).abs().max().item()
    tol = 5e-2 if dtype != torch.float32 else 1e-4
    report.figure("vit", figure_row(result, B, "img/s", max_abs_diff=diff, tolerance=tol, ok=diff <= tol, batch=B))


def run_isolated(script: str, args: list[str]) -> None:
    """benchmarks/`script` in a subprocess in its own session (it may spawn processes of its
    own, for their own peak memory), so that a timeout stops all of them."""
    cmd = [os.environ.get("PYTHON", sys.executable), str(HERE / script), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate()
    except BaseException:  # the part's time budget (or ^C): stop the run and what it started
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{script} exited with {proc.returncode}:\n{log[-3000:]}")


def part_stage1(size: Size, device: torch.device, dtype: torch.dtype, report: Report) -> None:
    """benchmarks/stage1_step.py (one process per contender) against the LAVIS-style step."""
    name, batch, images, steps, warmup = size.stage1
    with tempfile.TemporaryDirectory(prefix="blip2lab-stage1-") as tmp:
        out = Path(tmp) / "stage1.json"
        run_isolated("stage1_step.py", [
            "--size", name, "--device", device.type, "--precision", "bf16" if dtype == torch.bfloat16 else "no",
            "--batch", str(batch), "--images", str(images), "--steps", str(steps), "--warmup", str(warmup),
            "--threads", str(min(8, os.cpu_count() or 1) if device.type == "cuda" else 1),  # the dry run: 1
            "--contenders", "ours,lavis", "--cache-dir", str(Path(tmp) / "cache"), "--json", str(out)])
        result = json.loads(out.read_text())
    ours, peer = result["runs"]["ours"], result["runs"]["lavis"]
    row = {"unit": "samples/s", "peer": "LAVIS-style step (benchmarks/lavis_style.py)", "size": name,
           "batch": batch, "steps": steps, "blip2lab_per_s": batch / ours["step_s"],
           "lavis_style_per_s": batch / peer["step_s"], "ratio": result["ratio"],
           "blip2lab_step_s": ours["step_s"], "lavis_style_step_s": peer["step_s"],
           "peer_encoder_share": result["encoder_share"],
           "ratio_from_the_encoder_alone": result["ratio_from_the_encoder_alone"],
           "blip2lab_peak_gb": ours.get("cuda_max_allocated_bytes", 0) / 2**30 if device.type == "cuda" else None,
           "lavis_style_peak_gb": peer.get("cuda_max_allocated_bytes", 0) / 2**30 if device.type == "cuda" else None,
           "loss_mean_abs_diff": {k: v["mean_abs_diff"] for k, v in result["curves"].items()}}
    report.data["figures"]["stage1"] = row
    report.write()
    diffs = ", ".join(f"{k} {v:.3f}" for k, v in row["loss_mean_abs_diff"].items())
    print(f"{'stage1':20s} LAVIS-style {row['lavis_style_per_s']:8.1f} samples/s  blip2lab {row['blip2lab_per_s']:8.1f} "
          f"samples/s  ratio {row['ratio']:5.2f}x  (its ViT: {row['peer_encoder_share']:.0%} of the peer's step)  "
          f"loss curves mean |diff| {diffs}  peak GB {_gb(row['lavis_style_peak_gb'])} / {_gb(row['blip2lab_peak_gb'])}",
          flush=True)


def part_finetune(size: Size, device: torch.device, dtype: torch.dtype, report: Report) -> None:
    """benchmarks/finetune_step.py: `blip2lab train finetune` at OPT-2.7B's shape in each mode
    (one process per mode on a GPU). Its JSON is rewritten after every mode: what a timeout
    cut short still reports the modes it finished."""
    with tempfile.TemporaryDirectory(prefix="blip2lab-finetune-") as tmp:
        out = Path(tmp) / "finetune.json"
        try:
            run_isolated("finetune_step.py", ["--size", size.finetune, "--device", device.type,
                                              "--modes", ",".join(FINETUNE_MODES), "--json", str(out)])
        finally:
            errors = _finetune_figures(out, report)
    if errors:
        raise RuntimeError(f"fine-tuning modes failed: {errors}")


def _finetune_figures(out: Path, report: Report) -> dict:
    """finetune_step.py's modes as figures, one printed line each; returns its errors."""
    result = json.loads(out.read_text()) if out.is_file() else {"modes": {}, "errors": {}}
    for mode, row in result["modes"].items():
        report.data["figures"][f"finetune_{mode}"] = row | {"repo": result["repo"],
                                                           "checkpoint_s": result.get("checkpoint_s")}
        if "skipped" in row:
            print(f"{'finetune_' + mode:20s} skipped: {row['skipped']}", flush=True)
            continue
        print(f"{'finetune_' + mode:20s} {row['samples_per_s']:8.1f} samples/s at batch {row['batch']}  "
              f"peak GB {_gb(row['peak_gb'])} (--plan {row['plan_gb']:.2f})  trainable {row['trainable']:,}",
              flush=True)
    report.write()
    return result["errors"]


# ---------------------------------------------------------------------------------------


def meta(args, size: Size, device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "mode": "tiny" if args.tiny else "real",
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "host": platform.node(), "size": asdict(size), "command": " ".join(sys.argv)}
    if args.tiny:
        info["note"] = "tiny dry run on the CPU, one timed run each: checks the code path, its timings mean nothing"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def part_runners(size: Size, device: torch.device, dtype: torch.dtype, report: Report) -> dict[str, Callable]:
    return {"caption_opt": lambda: part_caption(size, "opt", device, dtype, report),
            "caption_t5": lambda: part_caption(size, "t5", device, dtype, report),
            "stage1": lambda: part_stage1(size, device, dtype, report),
            "itm": lambda: part_itm(size, device, dtype, report),
            "qformer": lambda: part_qformer(size, device, dtype, report),
            "vit": lambda: part_vit(size, device, dtype, report),
            "finetune": lambda: part_finetune(size, device, dtype, report)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=str(HERE / "results" / "gpu.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (a dry run of the same code)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--deadline", type=float, default=460.0,
                        help="seconds for the whole run (from torch's import); a part never gets more than what is left")
    args = parser.parse_args()

    start = STARTED
    size = SIZES["tiny" if args.tiny else "real"]
    if args.tiny:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU dry run")
    else:
        device = torch.device("cuda")
    dtype = torch.bfloat16
    torch.set_grad_enabled(False)
    report = Report(Path(args.out), meta(args, size, device, dtype))
    print(f"blip2lab vs transformers {report.data['meta']['transformers']}, {report.data['meta'].get('gpu', 'cpu')}, "
          f"{report.data['meta']['dtype']}; results -> {args.out}", flush=True)
    parts = part_runners(size, device, dtype, report)
    names = args.parts.split(",")
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; choose from {PARTS}")
    for name in names:
        left = args.deadline - (time.perf_counter() - start)
        budget = min(size.budgets[name], left - 5)
        t0 = time.perf_counter()
        if budget < 5:
            status, error = "skipped", f"no time left ({left:.0f} s of the {args.deadline:.0f} s deadline)"
        else:
            try:
                with time_budget(budget):
                    parts[name]()
                status, error = "ok", None
            except Exception as err:  # recorded, then on to the next part
                status = "timeout" if isinstance(err, PartTimeout) else "error"
                error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-8)}"
        if error:
            report.data["errors"][name] = error
            print(f"{name}: {status}: {error.splitlines()[0]}", flush=True)
        report.data["parts"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1),
                                      "budget_s": round(budget, 1)}
        report.write()
        if not set(names[names.index(name) + 1:]) & {"itm", "qformer", "vit"}:
            _RETRIEVAL.clear()  # no later part needs the retrieval pair
        free()
    report.data["meta"]["total_s"] = round(time.perf_counter() - start, 1)
    report.write()
    done = [n for n in names if report.data["parts"][n]["status"] == "ok"]
    print(f"done in {report.data['meta']['total_s']:.0f} s: {len(done)}/{len(names)} parts ok; "
          f"{len(report.data['figures'])} figures -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
