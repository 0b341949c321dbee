# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Stage 2: generative learning with a frozen LLM
#
# Stage 2 connects the Q-Former to a frozen LLM (paper Sec. 3.3): the Q query outputs go
# through one trainable linear layer to the LLM's input width and sit in front of the text
# as a **soft visual prompt**. Only the Q-Former, `ln_vision` and that projection learn; the
# loss is the LLM's own language-modelling loss on the caption (or answer). Two families:
#
# - **decoder-only** (OPT): `[visual][BOS][prompt][text]`, the loss on the text after the prompt;
# - **encoder-decoder** (T5 / FlanT5): the encoder reads `[visual][prefix]`, the decoder writes
#   the rest (the prefix-LM of the paper), or the caption after "a photo of".
#
# We start from a stage-1 Q-Former (trained here, briefly), train stage 2 on each family, and
# compare captions and answers before and after.

# %% tags=["parameters"]
import os

SMALL = os.environ.get("BLIP2LAB_SMALL", "1") == "1"  # CI: small and fast; set BLIP2LAB_SMALL=0 for real runs
if SMALL:
    PRESET, OVERRIDES = "tiny", ["n_train=128", "stage1_steps=8", "stage2_steps=8", "stage1_batch=16",
                                 "stage2_batch=8", "warmup=2"]
    N_EVAL, N_SHOW = 4, 3
else:
    PRESET, OVERRIDES = "default", ["n_train=10000", "stage1_steps=200", "stage2_steps=400"]
    N_EVAL, N_SHOW = 60, 4
SEED = 0
SHIPPED = {"opt": "shapes-opt", "t5": "shapes-t5"}  # fully trained models, shown when in models/ (full mode)

# %%
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import blip2lab
from blip2lab.worlds.shapes import world
from blip2lab.pipeline import PRESETS as SHIPPED_MODELS
from blip2lab.pipeline import Blip2Pipeline
from blip2lab.worlds.shapes import ablations, recipe

torch.set_num_threads(1)
START = time.perf_counter()
RESULTS = {}
preset = recipe.preset_with(PRESET, OVERRIDES)
scenes = world.make_split("test", N_EVAL, 0)
show = scenes[:N_SHOW]
images = [world.render(s) for s in show]

# %% [markdown]
# ## The prompt formats
#
# What the LLM is trained on, token by token (`Blip2Processor.decoder_batch` /
# `encoder_decoder_batch`): label -100 marks tokens that carry no loss. The Q visual tokens
# go in front of these rows inside the model.

# %%
procs = {kind: recipe.processor_for(recipe.shapes_config(kind, preset)) for kind in ("opt", "t5")}
cap = world.caption(show[0])
q, a, _ = world.questions(show[0])[0]
for kind, proc in procs.items():
    tok = proc.llm_tokenizer
    print(f"--- {kind}: caption prompt {proc.caption_prompt!r}, VQA prompt {proc.vqa_prompt(q)!r}")
    if kind == "opt":
        b = proc.decoder_batch([proc.vqa_prompt(q)], [a])
        rows = list(zip(tok.convert_ids_to_tokens(b["llm_ids"][0]), b["llm_labels"][0].tolist()))
        print("decoder row (token, label):", [(t, "-" if l == -100 else "LOSS") for t, l in rows])
    else:
        b = proc.encoder_decoder_batch([proc.vqa_prompt(q)], [a])
        print("encoder input:", tok.convert_ids_to_tokens(b["llm_ids"][0]))
        print("decoder target:", tok.convert_ids_to_tokens(b["llm_target_ids"][0]))

# %% [markdown]
# ## Stage 1, then stage 2 on each family
#
# `recipes.ablations.run_stage1` / `run_stage2` are `recipes.shapes`' stages with the frozen
# features shared between runs and an evaluation every few steps (caption object-F1 and VQA
# accuracy on seen test scenes). Half the stage-2 examples are VQA ("Question: ... Answer:"),
# as in the shipped models (`stage2_vqa_fraction`; the paper's captions-only stage 2 is 0).

# %%
stage1 = ablations.run_stage1(preset, SEED)
print(f"stage 1: {preset.stage1_steps} steps in {stage1.seconds:.0f} s")
measure = ablations.quick_eval(N_EVAL)
eval_at = sorted({max(1, preset.stage2_steps * k // 4) for k in range(1, 5)})
before, after, curves = {}, {}, {}
for kind in ("opt", "t5"):
    model, proc = ablations.stage2_model(preset, kind, stage1, SEED)
    before[kind] = Blip2Pipeline(model, proc)
    before[kind] = {"captions": before[kind].caption(images, num_beams=1),
                    "answers": before[kind].answer(images, [world.questions(s)[0][0] for s in show], num_beams=1),
                    **measure(before[kind])}
    run = ablations.run_stage2(preset, kind, stage1, SEED, eval_at=eval_at, eval_fn=measure)
    after[kind] = run.pipe
    curves[kind] = [{"step": 0, **{k: before[kind][k] for k in ("caption_f1", "vqa")}}] + run.curve
    print(f"{kind}: {preset.stage2_steps} steps in {run.seconds:.0f} s; last evaluation {run.curve[-1]}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for kind, curve in curves.items():
    for ax, metric in zip(axes, ("caption_f1", "vqa")):
        ax.plot([c["step"] for c in curve], [c[metric] for c in curve], marker="o", label=kind)
        ax.set_title(metric)
        ax.set_xlabel("stage-2 step")
        ax.set_ylim(0, 1)
axes[0].legend()
plt.show()
RESULTS["curves"] = curves

# %% [markdown]
# ## Before and after
#
# Before stage 2 the projection is random, so the LLM reads noise where the description
# should be and writes whatever its prior says; after, it describes the scene.

# %%
for i, scene in enumerate(show):
    plt.figure(figsize=(1.6, 1.6))
    plt.imshow(images[i])
    plt.axis("off")
    plt.show()
    question = world.questions(scene)[0]
    print(f"truth:  {world.caption(scene)}\nQ: {question[0]}  (truth: {question[1]})")
    for kind in ("opt", "t5"):
        cap_after = after[kind].caption([images[i]], num_beams=1)[0]
        ans_after = after[kind].answer(images[i], question[0], num_beams=1)[0]
        print(f"  {kind} before: {before[kind]['captions'][i]!r} / {before[kind]['answers'][i]!r}")
        print(f"  {kind} after:  {cap_after!r} / {ans_after!r}")

# %% [markdown]
# ## The shipped models
#
# `shapes-opt` and `shapes-t5` (the full recipe) on the same scenes, when they are in `models/`.

# %%
if not SMALL:
    for kind, name in SHIPPED.items():
        if name in SHIPPED_MODELS:
            RESULTS[f"shipped_{kind}"] = measure(blip2lab.load(name))
            print(name, RESULTS[f"shipped_{kind}"])
        else:
            print(f"{name}: not in models/ yet")

# %% [markdown]
# ## What this notebook measured
#
# Caption object-F1 and VQA accuracy before and after stage 2, for each LLM family (full
# mode: `results/04_stage2_generative_learning.json`).

# %%
RESULTS["before"] = {k: {m: v[m] for m in ("caption_f1", "vqa")} for k, v in before.items()}
RESULTS["after"] = {k: {m: c[-1][m] for m in ("caption_f1", "vqa")} for k, c in curves.items()}
RESULTS["seconds"] = round(time.perf_counter() - START, 1)
print(json.dumps({k: v for k, v in RESULTS.items() if k != "curves"}, indent=1))
if not SMALL:
    Path("results").mkdir(exist_ok=True)
    Path("results/04_stage2_generative_learning.json").write_text(json.dumps(RESULTS, indent=1) + "\n")
