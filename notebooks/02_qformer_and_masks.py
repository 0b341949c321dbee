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
# # 02 · The Q-Former and its three masks
#
# The Querying Transformer is the only thing BLIP-2 trains (with a LayerNorm and a few
# heads). It is a BERT-shaped encoder over `[Q learned queries ; T text tokens]` with three
# twists (paper Sec. 3.1, Figure 2):
#
# - the queries, and only they, **cross-attend** to the frozen image tokens, every other layer;
# - queries and text share **one self-attention** per layer, and a **mask** decides who sees
#   whom: that is how one network serves three objectives (ITC, ITM, ITG);
# - queries have their **own feed-forward** block; text uses BERT's.
#
# This notebook counts its parameters part by part, draws the three masks, and follows one
# forward pass with the shape of every tensor.

# %% tags=["parameters"]
import os

SMALL = os.environ.get("BLIP2LAB_SMALL", "1") == "1"  # CI: small and fast; set BLIP2LAB_SMALL=0 for real runs
BATCH = 2 if SMALL else 4  # examples in the traced forward pass

# %%
import json
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from blip2lab.worlds.shapes import analysis
from blip2lab.config import QFormerConfig
from blip2lab.worlds.shapes import world
from blip2lab.model.qformer import QFormer, attention_mask
from blip2lab.worlds.shapes import recipe
from blip2lab.model import summary

torch.set_num_threads(1)
START = time.perf_counter()
RESULTS = {}

# %% [markdown]
# ## The model of the shapes world
#
# `recipes.shapes.shapes_config` builds it from the shipped frozen backbones: the ViT, a
# Q-Former shaped like (and initialised from) the shipped BERT, and here the OPT.

# %%
preset = recipe.PRESETS["default"]
config = recipe.shapes_config("opt", preset)
model = recipe.build_model(config)
processor = recipe.processor_for(config)
q = config.qformer
print(f"Q-Former: width {q.hidden_size}, {q.num_layers} layers, {q.num_heads} heads, {q.num_queries} queries, "
      f"cross-attention every {q.cross_attention_freq} layers")
print("layers with cross-attention:", [i for i in range(q.num_layers) if q.has_cross_attention(i)])

# %%
counts = summary.parameter_counts(model)
total = sum(r["params"] for r in counts.values())
trainable = sum(r["trainable"] for r in counts.values())
print(f"{'part':62s}{'params':>10s}{'trainable':>11s}")
for part, r in counts.items():
    print(f"{part:62s}{r['params']:10,d}{r['trainable']:11,d}")
print(f"{'total':62s}{total:10,d}{trainable:11,d}")
RESULTS["shapes_params"] = {k: v["params"] for k, v in counts.items()}

# %%
qparts = {k.removeprefix("Q-Former: "): v["params"] for k, v in counts.items() if k.startswith("Q-Former")}
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.barh(list(qparts), list(qparts.values()))
ax.set_xlabel("parameters")
ax.set_title("Where the Q-Former's parameters are (shapes size)")
plt.tight_layout()
plt.show()

# %% [markdown]
# **The paper's size, for comparison.** The same class at BERT-base width (768, 12 layers,
# 32 queries, cross-attention every 2nd layer to a 1408-wide EVA ViT-g), built on the `meta`
# device so no memory is spent. The paper quotes 188M parameters for the Q-Former.

# %%
with torch.device("meta"):
    paper_q = QFormer(QFormerConfig(), vision_width=1408)
paper = summary.parameter_counts(torch.nn.ModuleDict({"qformer": paper_q}))
paper_total = sum(r["params"] for r in paper.values())
for part, r in paper.items():
    print(f"{part:62s}{r['params'] / 1e6:8.1f}M")
print(f"{'total':62s}{paper_total / 1e6:8.1f}M")
RESULTS["paper_qformer_params_M"] = round(paper_total / 1e6, 1)

# %% [markdown]
# ## The three masks
#
# One self-attention over `[queries ; text]`; a row is who asks, a column who is looked at
# (white = may attend). Here 8 queries and a 10-token text whose last 3 tokens are padding.
#
# - **ITC** (contrastive): queries see queries, text sees text; neither sees the other, so the
#   two sides give independent embeddings to compare.
# - **ITM** (matching): everybody sees everybody (but padding); the queries' outputs then
#   carry the joint image-text evidence the binary ITM head reads.
# - **ITG** (generation): queries see only queries; each text token sees all queries and the
#   text before it. Everything the text learns about the image must pass through the queries.

# %%
Q, T = q.num_queries, 10
text_mask = torch.ones(1, T, dtype=torch.long)
text_mask[0, -3:] = 0
masks = {mode: attention_mask(mode, Q, text_mask)[0] for mode in ("itc", "itm", "itg")}
fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
labels = [f"q{i}" for i in range(Q)] + ["[CLS]"] + [f"t{i}" for i in range(1, T - 3)] + ["pad"] * 3
for ax, (mode, m) in zip(axes, masks.items()):
    ax.imshow(m.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.axhline(Q - 0.5, color="red", lw=1)
    ax.axvline(Q - 0.5, color="red", lw=1)
    ax.set_xticks(range(Q + T), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(Q + T), labels, fontsize=6)
    ax.set_title(f"{mode.upper()}  ({int(m.sum())} of {m.numel()} allowed)")
plt.tight_layout()
plt.show()
RESULTS["mask_allowed"] = {k: int(v.sum()) for k, v in masks.items()}

# %% [markdown]
# ## One forward pass, shape by shape
#
# Stage 1 on a batch of real scenes: frozen ViT -> `ln_vision` -> Q-Former (queries-only
# pass for ITC and its cached keys/values for ITG, text-only pass for ITC, a joint pass for
# ITM on positives and hard negatives) -> heads. Every submodule's output shape, in call
# order (B batch, Q queries, N = 65 image tokens, T text length, D_q = 128, V vocabulary):

# %%
scenes = world.make_split("train", BATCH, 0)
pixels = processor.images([world.render(s) for s in scenes])
text = processor.qformer_text([world.caption(s) for s in scenes])
stage1 = recipe.build_model(recipe.shapes_config(None, preset))
records = summary.trace_shapes(stage1, lambda: stage1(text["text_ids"], text["text_mask"], pixels=pixels,
                                                        image_ids=torch.arange(BATCH)), depth=3)
seen = set()
for name, cls, shape in records:
    if (name, shape) in seen:  # one line per distinct (module, shape)
        continue
    seen.add((name, shape))
    print(f"{name:32s}{cls:24s}{shape}")
print("\npixels", tuple(pixels.shape), " text_ids", tuple(text["text_ids"].shape))

# %% [markdown]
# Stage 2 in four lines: queries alone over the image, projected to the LLM's width, put in
# front of the prompt's embeddings as a soft visual prompt.

# %%
with torch.no_grad():
    image = model.encode_image(pixels)  # (B, N, D_v)
    queries = model.query_outputs(image)  # (B, Q, D_q)
    visual = model.llm.visual_prompt(queries)  # (B, Q, D_lm)
    prompt = processor.generation_batch([processor.caption_prompt] * BATCH)
    embeds = torch.cat([visual, model.llm.embed(prompt["llm_ids"])], dim=1)  # (B, Q + T_prompt, D_lm)
for name, t in (("image tokens", image), ("query outputs", queries), ("visual prompt", visual),
                ("LLM input embeddings", embeds)):
    print(f"{name:22s}{tuple(t.shape)}")
RESULTS["stage2_shapes"] = {"image": list(image.shape), "queries": list(queries.shape),
                            "visual": list(visual.shape), "llm_inputs": list(embeds.shape)}

# %% [markdown]
# ## What this notebook measured
#
# The shapes Q-Former is about 1/120 of the paper's 186M (printed below). In both, the two
# feed-forward blocks hold most of the parameters, and the cross-attention, the only path
# from the image into the model, holds about a tenth of them. The masks are the whole
# difference between the three stage-1 objectives.

# %%
shapes_q = sum(v["params"] for k, v in counts.items() if k.startswith("Q-Former"))
RESULTS["shapes_qformer_params_M"] = round(shapes_q / 1e6, 2)
RESULTS["paper_over_shapes"] = round(paper_total / shapes_q)
RESULTS["cross_attention_share"] = {"shapes": round(qparts["cross-attention (queries -> image)"] / shapes_q, 3),
                                    "paper": round(paper["Q-Former: cross-attention (queries -> image)"]["params"]
                                                   / paper_total, 3)}
RESULTS["seconds"] = round(time.perf_counter() - START, 1)
print(json.dumps({k: v for k, v in RESULTS.items() if k != "shapes_params"}, indent=1))
if not SMALL:  # the full-mode numbers, kept with the notebooks
    from pathlib import Path

    Path("results").mkdir(exist_ok=True)
    Path("results/02_qformer_and_masks.json").write_text(json.dumps(RESULTS, indent=1) + "\n")
