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
# # 03 · Stage 1: vision-language representation learning
#
# Stage 1 teaches the queries to pull out of the frozen image tokens what text talks about
# (paper Sec. 3.2). Three losses share the Q-Former, each with its own mask (notebook 02):
#
# - **ITC**, image-text contrastive: the best of the Q query embeddings against the text's
#   [CLS] embedding, matched pairs pulled together, the batch's others pushed apart;
# - **ITM**, image-text matching: a binary "is this the caption of this image?" on the joint
#   pass, with hard negatives mined from the ITC similarities;
# - **ITG**, image-grounded text generation: the text decoded from the queries alone.
#
# We train it from the shipped frozen ViT and the BERT-initialised Q-Former, then look at the
# loss curves, retrieval recall, the ITM scores of matching and mismatching pairs, and the
# captions the Q-Former writes on its own (no LLM yet).

# %% tags=["parameters"]
import os

SMALL = os.environ.get("BLIP2LAB_SMALL", "1") == "1"  # CI: small and fast; set BLIP2LAB_SMALL=0 for real runs
if SMALL:
    PRESET, OVERRIDES = "tiny", ["n_train=128", "stage1_steps=12", "stage1_batch=16", "gallery=16", "k_test=4",
                                 "warmup=2"]
    N_EVAL = 6  # scenes for ITM scores and captions
else:
    PRESET, OVERRIDES = "default", ["n_train=10000", "stage1_steps=300", "gallery=500"]
    N_EVAL = 200
SEED = 0
SHIPPED = "shapes-opt"  # a fully trained model to compare with, when it is in models/ (full mode only)

# %%
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import blip2lab
from blip2lab.worlds.shapes import analysis
from blip2lab.worlds.shapes import world
from blip2lab.pipeline import PRESETS as SHIPPED_MODELS
from blip2lab.worlds.shapes import recipe

torch.set_num_threads(1)
START = time.perf_counter()
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OUT = Path(tempfile.mkdtemp()) if SMALL else ROOT / "runs" / "notebooks" / "03_stage1"
RESULTS = {}
preset = recipe.preset_with(PRESET, OVERRIDES)
print(preset)

# %% [markdown]
# ## Train
#
# `recipes.shapes.train_stage1`: frozen features of the training scenes computed once, then
# the one training loop (AdamW, warm-up + cosine) with ITC + ITM + ITG. Half of the ITM
# negatives are random in the default preset (a deviation: with hard negatives only, this
# small Q-Former's ITM stays at its class prior; the paper uses hard ones only).

# %%
pipe, timing = recipe.train_stage1(OUT, preset, seed=SEED, progress=False)
print(timing)
RESULTS["timing"] = timing

# %%
rows = list(csv.DictReader(open(OUT / "train" / "log.csv")))
steps = np.array([int(r["step"]) for r in rows])
fig, axes = plt.subplots(1, 4, figsize=(14, 3))
for ax, name in zip(axes, ("itc_loss", "itm_loss", "itg_loss", "temp")):
    y = np.array([float(r[name]) for r in rows])
    ax.plot(steps, y, alpha=0.3)
    k = max(1, len(y) // 30)
    ax.plot(steps[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), lw=2)
    ax.set_title(name)
    ax.set_xlabel("step")
plt.tight_layout()
plt.show()
RESULTS["final_losses"] = {k: round(float(np.mean([float(r[k]) for r in rows[-20:]])), 4)
                           for k in ("itc_loss", "itm_loss", "itg_loss")}
print(RESULTS["final_losses"], "(ITM at its class prior would be 0.64 with 1 positive per 2 negatives)")

# %% [markdown]
# ## Retrieval
#
# The paper's protocol: rank by ITC, re-rank the top k by ITM (`evaluate.retrieval_eval`).
# The gallery: test scenes with distinct captions, each image's caption the one right text.

# %%
ret = recipe.eval_retrieval(pipe, world.make_gallery("test", preset.gallery, 0), preset.k_test)
print(f"gallery of {preset.gallery}, ITM re-ranks the top {preset.k_test}")
print(f"{'':6s}{'img->txt R@1':>14s}{'R@5':>7s}{'txt->img R@1':>14s}{'R@5':>7s}")
for how in ("itc", "itm"):
    print(f"{how:6s}{ret[f'{how}/txt_r1']:14.3f}{ret[f'{how}/txt_r5']:7.3f}{ret[f'{how}/img_r1']:14.3f}"
          f"{ret[f'{how}/img_r5']:7.3f}")
print(f"chance R@1 = {1 / preset.gallery:.3f}")
RESULTS["retrieval"] = ret

# %% [markdown]
# ## ITM scores: matching vs mismatching pairs
#
# For test scenes: the true caption, the caption of another random scene (an easy
# negative), and the caption of the same scene with one fact changed (a hard negative:
# another colour, shape, size or position for one object).

# %%
rng = random.Random(0)
scenes = world.make_split("test", N_EVAL, 0)
images = [world.render(s) for s in scenes]
pairs = {"match": [world.caption(s) for s in scenes],
         "other scene": [world.caption(scenes[(i + 1 + rng.randrange(len(scenes) - 1)) % len(scenes)])
                         for i in range(len(scenes))],
         "one fact changed": [world.caption(analysis.altered_scene(s, rng)) for s in scenes]}
scores = {k: pipe.match(images, v)["itm_prob"].numpy() for k, v in pairs.items()}
fig, ax = plt.subplots(figsize=(6, 3))
for k, v in scores.items():
    ax.hist(v, bins=20, range=(0, 1), alpha=0.5, label=f"{k} (mean {v.mean():.2f})")
ax.set_xlabel("ITM probability of a match")
ax.legend(fontsize=8)
plt.show()
RESULTS["itm_prob_mean"] = {k: round(float(v.mean()), 3) for k, v in scores.items()}
RESULTS["itm_auc_hard"] = round(float((scores["match"][:, None] > scores["one fact changed"][None, :]).mean()), 3)
print(RESULTS["itm_prob_mean"], "P(match scores above a one-fact-changed caption):", RESULTS["itm_auc_hard"])

# %% [markdown]
# ## Captions from the Q-Former alone
#
# The ITG decoder can caption without any LLM: start at [DEC], decode over the queries'
# cached keys and values (LAVIS defaults: 3 beams). Scored by object F1: the caption parsed
# back into (size, colour, shape, row, column) objects against the truth.

# %%
caps = recipe.eval_captions(pipe, scenes, num_beams=3)
for ex in caps["examples"][:4]:
    print(f"truth:  {ex['truth']}\nQ-Former: {ex['caption']}\n")
print({k: round(v, 3) for k, v in caps.items() if k != "examples"})
RESULTS["qformer_captions"] = {k: v for k, v in caps.items() if k != "examples"}

# %% [markdown]
# ## The fully trained model, for comparison
#
# In full mode, the shipped `shapes-opt` (the whole recipe, stage 1 then stage 2; its
# Q-Former keeps the stage-1 heads) on the same gallery and scenes, when it is in `models/`.

# %%
if not SMALL and SHIPPED in SHIPPED_MODELS:
    shipped = blip2lab.load(SHIPPED)
    ret_s = recipe.eval_retrieval(shipped, world.make_gallery("test", preset.gallery, 0), preset.k_test)
    RESULTS["shipped_retrieval"] = {k: ret_s[k] for k in ("itc/txt_r1", "itc/img_r1", "itm/txt_r1", "itm/img_r1")}
    print("shipped:", {k: round(v, 3) for k, v in RESULTS["shipped_retrieval"].items()})
else:
    print("skipped (small mode, or no shipped model yet)")

# %% [markdown]
# ## What this notebook measured
#
# In full mode (numbers below and in `results/03_stage1_representation_learning.json`): all
# three losses fall, ITM leaves its prior, retrieval is far above chance and ITM re-ranking
# lifts it, mismatching captions score lower than matching ones (one changed fact is the
# hard case), and the Q-Former alone already writes captions in the world's language.

# %%
RESULTS["seconds"] = round(time.perf_counter() - START, 1)
print(json.dumps({k: v for k, v in RESULTS.items() if k != "retrieval"}, indent=1))
if not SMALL:
    Path("results").mkdir(exist_ok=True)
    Path("results/03_stage1_representation_learning.json").write_text(json.dumps(RESULTS, indent=1) + "\n")
