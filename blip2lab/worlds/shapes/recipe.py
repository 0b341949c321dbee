"""The whole BLIP-2 recipe in the shapes world, from the shipped frozen backbones:
stage 1 (ITC + ITM + ITG) then stage 2 on each LLM family, and the evaluation.

    blip2lab shapes build --preset default     # both stages for OPT and T5, then evaluation
    blip2lab shapes train stage1 --preset tiny
    blip2lab shapes eval vqa --model runs/shapes/opt

The frozen backbones (ViT, OPT, T5, the small BERT) are pretrained once by
`blip2lab.worlds.shapes` (text_backbones, vision_backbone) and shipped under `models/backbones/`; what runs here is what people
repeat. Frozen image features are computed once per split and cached (the paper's
recipe recomputes them every step; with a frozen tower and no augmentation they are
identical), so stage 1 never runs the ViT again.

Deviations from the paper, each a preset field (defaults follow the paper where it applies):
- the Q-Former is small (width 128, 4 layers, 8 queries) to train on a CPU in minutes;
- half of stage 1's ITM negatives are random ones (`stage1_itm_easy_negatives`), not all
  hard: with hard ones only, the small Q-Former's ITM never leaves its class prior;
- stage 1 may see every scene beside a sibling with the same objects in other cells
  (`stage1_siblings`): in a batch of random scenes no two differ by positions alone, so
  ITC and ITM never need positions and the Q-Former drops them (probe of its query outputs:
  cell of a lone object 0.45, ITC picks the right cell of six 0.21 after 1,200 steps); the
  paper's batches are random (`stage1_siblings=False`);
- stage 2 may mix VQA examples into the captioning data (`stage2_vqa_fraction`); the
  paper's zero-shot setting is `stage2_vqa_fraction=0` (captions only);
- stage 2 may also give each VQA example's question to the Q-Former (`stage2_qformer_question`):
  the paper does this when it fine-tunes for VQA (Sec. 4.3), after stage 2, not during it;
- stage 2 may average its LM loss per item rather than per token (`stage2_lm_per_item`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from torch.utils.data import Dataset

from blip2lab.config import Blip2Config, LLMConfig, QFormerConfig, TrainConfig, from_preset, to_dict
from blip2lab.formats import build_model as build_blip2
from blip2lab.formats.sources import tokenizer_from_path
from blip2lab.model.blip2 import Blip2
from blip2lab.paths import MODELS_DIR
from blip2lab.pipeline import Blip2Pipeline
from blip2lab.processor import Blip2Processor, make_qformer_tokenizer
from blip2lab.training.loop import BatchStream, Timer, resolve_precision, train
from blip2lab.worlds.shapes import world

BACKBONES = MODELS_DIR / "backbones"
LLMKind = Literal["opt", "t5"]


@dataclass
class ShapesPreset:
    """Sizes and budgets of one run of the recipe."""

    name: str
    n_train: int = 20_000  # training scenes (train split: no held-out colour-shape pairs)
    n_eval: int = 500  # test scenes for captioning / VQA evaluation (seen; as many novel)
    gallery: int = 1_000  # retrieval gallery: test scenes with distinct captions
    num_queries: int = 8
    cross_attention_freq: int = 2  # cross-attention on every n-th Q-Former layer (the paper: 2)
    image_pos_embed: bool = False  # Blip2Config.image_pos_embed (a deviation; off in the paper)
    stage1_steps: int = 1500
    stage1_batch: int = 64
    stage1_lr: float = 5e-4
    stage1_losses: tuple[str, ...] = ("itc", "itm", "itg")
    stage1_loss_schedule: tuple[str, ...] = ()  # e.g. ("itm@200",): ITC-first warm-up (train.loss_schedule)
    stage1_itm_easy_negatives: float = 0.0  # share of random ITM negatives (train.itm_easy_negatives)
    stage1_siblings: bool = False  # pair every training scene with its objects moved (Stage1Data)
    # Share of stage-1 texts replaced by a partial description (world.partial_description: some
    # of the scene's objects, some attributes left out), a positive for its scene and for every
    # other scene of the batch it is true of (never their ITM negative). 0: whole-scene
    # paraphrases only (the shipped shapes-stage1), whose ITM reads "a red circle" as a mismatch.
    stage1_partial_captions: float = 0.0
    stage2_steps: int = 1500
    stage2_batch: int = 32
    stage2_lr: float = 5e-4
    stage2_vqa_fraction: float = 0.5  # 0: the paper's captions-only stage 2 (zero-shot VQA)
    # The question also enters the Q-Former (Blip2Config.qformer_question: the paper's VQA
    # fine-tuning, Sec. 4.3): the queries then pick what the question asks about.
    stage2_qformer_question: bool = False
    # The LM loss averaged per item, then over items (TrainConfig.lm_per_item; a deviation):
    # a caption has ~27 target tokens, an answer 1-3, so per token the answers barely count.
    stage2_lm_per_item: bool = False
    # The share of stage-2 caption items in the paper's objective for an encoder-decoder LLM
    # (Sec. 3.3, prefix LM): the caption split at a random word into a prefix, given to the
    # encoder after the visual prompt, and the suffix, the target. The others: "a photo of" ->
    # the whole caption (the captioning layout, all the shipped shapes-t5 trained with), which
    # captioning then asks for. Decoder-only LLMs ignore it.
    stage2_prefix_lm: float = 0.0
    # Stage-2 caption items as a paraphrase drawn per item (as stage 1's texts), not always the
    # canonical caption: web captions, the paper's stage-2 data, say the same scene many ways.
    stage2_paraphrases: bool = False
    # LLMConfig.visual_prompt_norm (a deviation, "none" in the paper): "embedding" rescales each
    # visual prompt vector to the LLM's mean word-embedding norm.
    visual_prompt_norm: Literal["none", "embedding"] = "none"
    warmup: int = 100
    # accelerate's mixed precision for both stages (TrainConfig.mixed_precision): "no" (fp32,
    # the shipped models), "bf16" autocast, or "auto": bf16 where the hardware runs it natively
    # (train.native_bf16: a CPU with AVX512-BF16 or AMX, most GPUs), else fp32.
    precision: Literal["no", "bf16", "auto"] = "no"
    k_test: int = 16  # ITM re-ranking depth of the retrieval protocol (COCO: 128)


# The shipped models' recipe (scripts/ship_shapes.sh; T5's stage 2 runs 6,000 steps): 16
# queries (with 8 the third object of a caption is learnt wrong), stage-1 siblings, half the
# ITM negatives random, and in stage 2 80% VQA items whose questions also enter the Q-Former.
_SHIPPED = ShapesPreset("shipped", num_queries=16, stage1_steps=1200, stage1_itm_easy_negatives=0.5,
                        stage1_siblings=True, stage2_steps=3000, stage2_vqa_fraction=0.8, stage2_qformer_question=True)

PRESETS = {
    "tiny": ShapesPreset("tiny", n_train=512, n_eval=32, gallery=64, stage1_steps=20, stage1_batch=16,
                         stage2_steps=20, stage2_batch=8, warmup=5, k_test=4),
    # Half the ITM negatives random: with hard negatives only, ITM sits at its class prior
    # (see losses.sample_hard_negatives); the paper's setting is stage1_itm_easy_negatives=0.
    "default": ShapesPreset("default", stage1_itm_easy_negatives=0.5),
    "shipped": _SHIPPED,
    # The whole recipe in under 10 minutes on 2 cores: the shipped recipe at a third of its
    # steps and half the scenes, in bf16 where the CPU has it (`build` also runs the two
    # stage-2 runs side by side). Its figures are in the README. Stage 1 at 4x the shipped
    # lr: at 5e-4, 400 steps end with ITC still falling steeply and retrieval a coin toss
    # between seeds (t->i R@1 0.675 seed 0, 0.389 seed 1); at 2e-3, 0.62-0.90 over three runs.
    # Zero-shot VQA (models/shapes-opt-zeroshot, shapes-t5-zeroshot): the paper's Figure 5
    # setting, stage 2 on captions only from the shipped stage 1, never a question; T5 with the
    # paper's prefix LM; the visual prompt at the word embeddings' scale (a deviation:
    # docs/ablations.md, zero-shot VQA, measures it on and off).
    "zeroshot": replace(_SHIPPED, name="zeroshot", stage2_vqa_fraction=0.0, stage2_qformer_question=False,
                        stage2_prefix_lm=0.5, stage2_paraphrases=True, visual_prompt_norm="embedding",
                        stage2_steps=2400),
    "quick": replace(_SHIPPED, name="quick", n_train=10_000, stage1_steps=400, stage1_lr=2e-3, stage2_steps=1500,
                     precision="auto"),
}


# ---------------------------------------------------------------------------------------
# Backbones and configuration
# ---------------------------------------------------------------------------------------


def _vision_config():
    from blip2lab.worlds.shapes.vision_backbone import SHAPES_VISION_CONFIG

    return SHAPES_VISION_CONFIG


def qformer_tokenizer(backbones: Path = BACKBONES):
    """The shipped BERT's WordPiece tokenizer plus [DEC], the ITG start token (LAVIS)."""
    return make_qformer_tokenizer(tokenizer_from_path(backbones / "bert"))


def shapes_config(kind: Optional[LLMKind], preset: ShapesPreset, backbones: Path = BACKBONES) -> Blip2Config:
    """The shapes BLIP-2: the shipped ViT, a Q-Former shaped like the shipped BERT (and
    initialised from it, as the paper from bert-base-uncased), and optionally an LLM."""
    from transformers import AutoConfig

    bert = AutoConfig.from_pretrained(backbones / "bert")
    qtok = qformer_tokenizer(backbones)
    qformer = QFormerConfig(
        hidden_size=bert.hidden_size, num_layers=bert.num_hidden_layers, num_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size, num_queries=preset.num_queries, vocab_size=len(qtok),
        max_position_embeddings=bert.max_position_embeddings, max_text_len=min(32, bert.max_position_embeddings),
        pad_token_id=qtok.pad_token_id, cls_token_id=qtok.cls_token_id, sep_token_id=qtok.sep_token_id,
        dec_token_id=qtok.convert_tokens_to_ids("[DEC]"), init_from=str(backbones / "bert"),
        cross_attention_freq=preset.cross_attention_freq,
        # 0.02 is BERT-base's init for a 768-wide model; the fresh cross-attention of a 128-wide
        # Q-Former needs ~1/sqrt(width) to let the image through at the start.
        init_std=0.08,
    )
    llm = LLMConfig()
    if kind is not None:
        llm = LLMConfig(kind="decoder" if kind == "opt" else "encoder_decoder", name_or_path=str(backbones / kind),
                        visual_prompt_norm=preset.visual_prompt_norm)
    return Blip2Config(vision=_vision_config(), qformer=qformer, llm=llm, embed_dim=128,
                       image_pos_embed=preset.image_pos_embed,
                       qformer_question=kind is not None and preset.stage2_qformer_question)


def build_model(config: Blip2Config, backbones: Path = BACKBONES, seed: Optional[int] = None) -> Blip2:
    """A Blip2 with the shipped frozen ViT's weights in its (pruned) tower. `seed`: seeds torch
    before the fresh parts (queries, cross-attention, heads, LLM projection) are drawn, so a
    training run starts from the same weights every time."""
    from blip2lab.worlds.shapes.vision_backbone import load_shapes_vision

    if seed is not None:
        torch.manual_seed(seed)
    return build_blip2(config, image_encoder=load_shapes_vision(backbones / "vit"))


def processor_for(config: Blip2Config, backbones: Path = BACKBONES) -> Blip2Processor:
    llm_tok = None if config.llm.kind == "none" else tokenizer_from_path(config.llm.name_or_path)
    return Blip2Processor.from_config(config, qformer_tokenizer(backbones), llm_tok, llm_max_len=48)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def cache_features(model: Blip2, scenes: list, processor: Blip2Processor, batch: int = 256) -> torch.Tensor:
    """The frozen tower's output for every scene, once: (n, N, D_v) in fp16 (half the memory;
    the tower's fp32 output rounds to it with a relative error of 1e-3)."""
    out = []
    for start in range(0, len(scenes), batch):
        pixels = processor.transform.normalize(world.render_batch(scenes[start:start + batch]))  # (b, 3, S, S)
        out.append(model.image_encoder(pixels).half())
    return torch.cat(out)


class Stage1Data(Dataset):
    """(cached image features, caption) pairs; the caption is a paraphrase drawn from
    (seed, index), so every scene is seen with varied wording, or with probability
    `partial` a partial description (`world.partial_description`).

    With `siblings=True` the scenes are n originals then their n `world.rearranged`
    siblings, and item i is the pair (original i, sibling i): both land in one batch."""

    def __init__(self, features: torch.Tensor, scenes: list, seed: int = 0, siblings: bool = False,
                 partial: float = 0.0):
        if siblings and len(scenes) % 2:
            raise ValueError(f"siblings=True needs originals then siblings, got an odd {len(scenes)} scenes")
        if not 0.0 <= partial <= 1.0:
            raise ValueError(f"stage1_partial_captions={partial}; expected a share in [0, 1]")
        self.features, self.scenes, self.seed, self.siblings, self.partial = features, scenes, seed, siblings, partial

    def __len__(self) -> int:
        return len(self.scenes) // 2 if self.siblings else len(self.scenes)

    def _example(self, i: int) -> dict:
        rng = random.Random(world.stable_seed("stage1", self.seed, i))
        scene = self.scenes[i]
        if self.partial and random.Random(world.stable_seed("partial", self.seed, i)).random() < self.partial:
            text = world.partial_description(scene, rng)
        else:
            text = world.paraphrases(scene, rng)
        example = {"image_embeds": self.features[i], "text": text, "image_id": i}
        return example | ({"scene": scene} if self.partial else {})  # the collate marks what each text is true of

    def __getitem__(self, i: int) -> dict | list[dict]:
        return [self._example(i), self._example(i + len(self))] if self.siblings else self._example(i)


def with_siblings(scenes: list, seed: int) -> list:
    """`scenes` followed by one `world.rearranged` sibling of each (Stage1Data(siblings=True))."""
    return scenes + [world.rearranged(s, random.Random(world.stable_seed("sibling", seed, i)))
                     for i, s in enumerate(scenes)]


def stage1_stream(features: torch.Tensor, scenes: list, preset: ShapesPreset, processor: Blip2Processor,
                  seed: int) -> BatchStream:
    """Stage-1 batches of `preset.stage1_batch` examples (with siblings: half as many pairs)."""
    pairs = preset.stage1_siblings
    return BatchStream(Stage1Data(features, scenes, seed, siblings=pairs, partial=preset.stage1_partial_captions),
                       preset.stage1_batch // (2 if pairs else 1), stage1_collate(processor), seed=seed)


def text_true_of(texts: Sequence[str], scenes: Sequence[world.Scene]) -> torch.Tensor:
    """(B, B) bool: text i is true of scene j (`world.describes`); the diagonal always."""
    said = [world.parse_objects_partial(t) for t in texts]
    out = torch.tensor([[world.describes(objects, s) for s in scenes] for objects in said], dtype=torch.bool)
    return out | torch.eye(len(texts), dtype=torch.bool)


def stage1_collate(processor: Blip2Processor):
    def collate(items: list) -> dict:
        items = [it for item in items for it in (item if isinstance(item, list) else [item])]
        text = processor.qformer_text([it["text"] for it in items])
        batch = {"image_embeds": torch.stack([it["image_embeds"] for it in items]).float(),
                 "text_ids": text["text_ids"], "text_mask": text["text_mask"],
                 "image_ids": torch.tensor([it["image_id"] for it in items])}
        if "scene" in items[0]:  # partial descriptions: true of other scenes too (Blip2.forward text_true_of)
            batch["text_true_of"] = text_true_of([it["text"] for it in items], [it["scene"] for it in items])
        return batch
    return collate


class Stage2Data(Dataset):
    """Captioning items ("a photo of" -> the canonical caption; with `prefix_lm`, a random
    prefix of the caption -> the rest, the paper's prefix LM) and, with probability
    `vqa_fraction`, VQA items ("Question: {q} Answer:" -> the answer), from (seed, index)."""

    def __init__(self, features: torch.Tensor, scenes: list, vqa_fraction: float, seed: int = 0,
                 prefix_lm: float = 0.0, paraphrases: bool = False):
        self.features, self.scenes, self.vqa_fraction, self.seed = features, scenes, vqa_fraction, seed
        self.prefix_lm, self.paraphrases = prefix_lm, paraphrases

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(world.stable_seed("stage2", self.seed, i))
        scene = self.scenes[i]
        if rng.random() < self.vqa_fraction:
            q, a, _ = rng.choice(world.questions(scene, rng, allow_held_out=False))
            return {"image_embeds": self.features[i], "question": q, "answer": a}
        text = world.paraphrases(scene, rng) if self.paraphrases else world.caption(scene)
        if self.prefix_lm and rng.random() < self.prefix_lm:
            prefix, suffix = Blip2Processor.prefix_split(text, rng)
            return {"image_embeds": self.features[i], "question": None, "prompt": prefix, "answer": suffix}
        return {"image_embeds": self.features[i], "question": None, "answer": text}


def stage2_collate(processor: Blip2Processor, qformer_question: bool = False):
    """LLM prompts and targets; with `qformer_question` also the questions for the Q-Former
    (question_ids, question_mask (B, T)). A caption item's row (the prompt, as a stand-in) is
    masked out whole, so its queries see no text: the same pass as `encode_queries`, which
    captioning runs."""
    def collate(items: list[dict]) -> dict:
        prompts = [it.get("prompt", processor.caption_prompt) if it["question"] is None
                   else processor.vqa_prompt(it["question"]) for it in items]
        answers = [it["answer"] for it in items]
        if processor.llm_kind == "decoder":
            text = processor.decoder_batch(prompts, answers)
        else:
            text = processor.encoder_decoder_batch(prompts, answers)
        if qformer_question:
            text |= processor.qformer_questions([it["question"] or processor.caption_prompt for it in items])
            is_caption = torch.tensor([it["question"] is None for it in items])  # (B,)
            text["question_mask"] = text["question_mask"].masked_fill(is_caption[:, None], 0)
        return {"image_embeds": torch.stack([it["image_embeds"] for it in items]).float(), **text}
    return collate


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------


def _train_cfg(preset: ShapesPreset, stage: int, seed: int) -> TrainConfig:
    if stage == 1:
        return TrainConfig(stage=1, losses=preset.stage1_losses, loss_schedule=preset.stage1_loss_schedule,
                           itm_easy_negatives=preset.stage1_itm_easy_negatives,
                           lr=preset.stage1_lr, min_lr=preset.stage1_lr / 10,
                           warmup_steps=preset.warmup, max_steps=preset.stage1_steps, batch_size=preset.stage1_batch,
                           mixed_precision=resolve_precision(preset.precision), seed=seed, out_dir="")
    return TrainConfig(stage=2, losses=("lm",), lm_per_item=preset.stage2_lm_per_item,
                       lr=preset.stage2_lr, min_lr=preset.stage2_lr / 10,
                       warmup_steps=preset.warmup, max_steps=preset.stage2_steps, batch_size=preset.stage2_batch,
                       mixed_precision=resolve_precision(preset.precision), seed=seed, out_dir="")


def _train_scenes(preset: ShapesPreset, seed: int, stage: int) -> list:
    """n_train scenes; with stage-1 siblings, n_train / 2 originals and their siblings."""
    if stage == 1 and preset.stage1_siblings:
        return with_siblings(world.make_split("train", preset.n_train // 2, seed), seed)
    return world.make_split("train", preset.n_train, seed)


def train_stage1(out_dir: str | Path, preset: ShapesPreset, seed: int = 0, backbones: Path = BACKBONES,
                 progress: bool = True, init: str | Path | None = None) -> tuple[Blip2Pipeline, dict]:
    """Stage 1 from the shipped backbones; saves a pipeline folder; returns it and timings.
    `init`: a stage-1 folder of the same shape whose weights start this run instead of the
    BERT-initialised Q-Former (stage 1 continued, e.g. with `stage1_partial_captions`)."""
    out = Path(out_dir)
    config = shapes_config(None, preset, backbones)
    model = build_model(config, backbones, seed=seed)
    if init is not None:
        from blip2lab.formats.native import read_safetensors

        model.load_state_dict(read_safetensors(Path(init) / "model.safetensors"), strict=True)
    return _run_stage(out, model, processor_for(config, backbones), 1, preset, seed, progress,
                      None if init is None else str(init))


def train_stage2(out_dir: str | Path, stage1: str | Path | None, kind: LLMKind, preset: ShapesPreset,
                 seed: int = 0, backbones: Path = BACKBONES, progress: bool = True) -> tuple[Blip2Pipeline, dict]:
    """Stage 2 on one LLM family. `stage1`: a stage-1 folder whose Q-Former, ln_vision and
    heads start this stage (kept, so the result still retrieves and matches); None trains
    stage 2 from the BERT-initialised Q-Former (the paper's Figure 5 ablation)."""
    out = Path(out_dir)
    config = shapes_config(kind, preset, backbones)
    model = build_model(config, backbones, seed=seed)
    if stage1 is not None:
        from blip2lab.formats.native import read_safetensors

        state = read_safetensors(Path(stage1) / "model.safetensors")
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Strict in what matters: every stage-1 weight lands, and only the LLM side is new.
        if unexpected or any(not k.startswith("llm.") for k in missing):
            raise RuntimeError(f"stage-1 checkpoint does not fit: unexpected {unexpected}, missing "
                               f"{[k for k in missing if not k.startswith('llm.')]}")
    return _run_stage(out, model, processor_for(config, backbones), 2, preset, seed, progress)


def _run_stage(out: Path, model: Blip2, processor: Blip2Processor, stage: int, preset: ShapesPreset, seed: int,
               progress: bool, init: Optional[str] = None) -> tuple[Blip2Pipeline, dict]:
    """Cache the frozen features of the training scenes, train, save a pipeline folder."""
    scenes = _train_scenes(preset, seed, stage)
    with Timer() as t_cache:
        features = cache_features(model, scenes, processor)
    cfg = _train_cfg(preset, stage, seed)
    if stage == 1:
        data = stage1_stream(features, scenes, preset, processor, seed)
    else:
        prefix_lm = preset.stage2_prefix_lm if model.llm.kind == "encoder_decoder" else 0.0
        data = BatchStream(Stage2Data(features, scenes, preset.stage2_vqa_fraction, seed, prefix_lm,
                                      preset.stage2_paraphrases), cfg.batch_size,
                           stage2_collate(processor, model.config.qformer_question), seed=seed)
    with Timer() as t_train:
        train(model, data, cfg, out_dir=out / "train", progress=progress)
    pipe = Blip2Pipeline(model.eval(), processor, name=out.name)
    pipe.save(out)
    resolved = {"preset": asdict(preset), "seed": seed, "stage": stage, "train": to_dict(cfg)}
    resolved |= {} if init is None else {"init": init}
    (out / "recipe.json").write_text(json.dumps(resolved, indent=2) + "\n")  # what trained this folder, resolved
    timing = {"cache_features_s": t_cache.seconds, f"stage{stage}_train_s": t_train.seconds, "steps": cfg.max_steps,
              "precision": cfg.mixed_precision, "threads": torch.get_num_threads()}
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return pipe, timing


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------


def _images(scenes: list) -> list:
    return [world.render(s) for s in scenes]


def eval_captions(pipe: Blip2Pipeline, scenes: list, batch: int = 64, **decoding) -> dict:
    """Object-level precision / recall / F1 of generated captions parsed back into objects."""
    from blip2lab.evaluate import object_f1

    preds = []
    for start in range(0, len(scenes), batch):
        preds += pipe.caption(_images(scenes[start:start + batch]), **decoding)
    scores = object_f1([world.parse_caption(p) for p in preds], [s.tuples() for s in scenes])
    return scores | {"examples": [{"truth": world.caption(s), "caption": p} for s, p in zip(scenes[:5], preds[:5])]}


def eval_vqa(pipe: Blip2Pipeline, scenes: list, batch: int = 64, **decoding) -> dict:
    """VQA accuracy (official normalisation; one reference answer each) per question type, and
    the chance level beside it: each type's most common answer on these questions
    ("chance", "chance/<type>": `evaluate.prior_accuracy`)."""
    from blip2lab.evaluate import prior_accuracy, vqa_accuracy

    items = [(i, q, a, t) for i, s in enumerate(scenes) for q, a, t in world.questions(s, random.Random(i))]
    preds = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        preds += pipe.answer([world.render(scenes[i]) for i, *_ in chunk], [q for _, q, _, _ in chunk], **decoding)
    refs, types = [[a] for *_, a, _ in items], [t for *_, t in items]
    chance = {k.replace("accuracy", "chance"): v for k, v in prior_accuracy(refs, types).items()}
    return vqa_accuracy(preds, refs, types) | chance | {"questions": len(items)}


def _gallery_tokens(pipe: Blip2Pipeline, scenes: list) -> torch.Tensor:
    """The scorer's ln_vision output for every scene: (n, N, D_v)."""
    model, _ = pipe.scorer()  # a linked stage-1 model first: a stage-2 Q-Former has left its heads behind
    images = pipe.processor.images(_images(scenes))
    with torch.no_grad():
        return torch.cat([model.encode_image(images[i:i + 256]) for i in range(0, len(scenes), 256)])


def eval_retrieval(pipe: Blip2Pipeline, scenes: list, k_test: int, embeds: Optional[torch.Tensor] = None) -> dict:
    """Recall@1/5/10 both ways over a gallery with distinct captions, ITC only and ITM re-ranked.
    `embeds`: the scenes' `_gallery_tokens`, when already computed."""
    from blip2lab.evaluate import retrieval_eval

    model, _ = pipe.scorer()
    embeds = _gallery_tokens(pipe, scenes) if embeds is None else embeds
    text = pipe.processor.qformer_text([world.caption(s) for s in scenes])
    n = len(scenes)
    return retrieval_eval(model, embeds, text["text_ids"], text["text_mask"], list(range(n)),
                          [[i] for i in range(n)], k_test=k_test)


def eval_object_queries(pipe: Blip2Pipeline, scenes: list, k_test: int, ks: Sequence[int] = (1, 5, 10),
                        embeds: Optional[torch.Tensor] = None) -> dict:
    """Text -> image retrieval of one-object queries (`world.object_queries`: "a red circle",
    "a small red circle", "a small red circle on the top left") over `scenes`, each scene that
    holds such an object a right answer (`world.describes`); queries no scene answers are left
    out. ITC alone and ITM re-ranked (the top k_test), overall and per level of detail."""
    from blip2lab.evaluate import recall_any_at_k, retrieval_scores

    queries = [q for q in world.object_queries() if any(world.describes(q, s) for s in scenes)]
    positive = torch.tensor([[world.describes(q, s) for s in scenes] for q in queries])  # (N_q, N_img)
    model, _ = pipe.scorer()
    embeds = _gallery_tokens(pipe, scenes) if embeds is None else embeds
    text = pipe.processor.qformer_text(queries)
    s = retrieval_scores(model, embeds, text["text_ids"], text["text_mask"], k_test=k_test)
    levels = {"color shape": 3, "size color shape": 4, "size color shape place": 8}  # words per query
    out: dict = {"queries": len(queries), "mean_right_images": positive.sum(1).float().mean().item()}
    for name, scores in (("itc", s["itc_t2i"]), ("itm", s["itm_t2i"])):
        out |= {f"{name}/{k}": v for k, v in recall_any_at_k(scores, positive, ks).items()}
        for level, words in levels.items():
            rows = torch.tensor([len(q.split()) == words for q in queries])
            out |= {f"{name}/{level}/{k}": v for k, v in recall_any_at_k(scores[rows], positive[rows], ks).items()}
    return out


def evaluate(pipe: Blip2Pipeline, preset: ShapesPreset, seed: int = 0, tasks=("caption", "vqa", "retrieval"),
             decoding: Optional[dict] = None) -> dict:
    """Every figure of a shapes model: seen test scenes and, separately, novel ones."""
    decoding = decoding or {"num_beams": 1}
    seen = world.make_split("test", preset.n_eval, seed)
    novel = world.make_split("test", preset.n_eval, seed, novel=True)
    results: dict = {}
    with Timer() as t:
        if "caption" in tasks and (pipe.model.llm is not None or pipe.model.has_stage1_heads):
            results["caption/seen"] = eval_captions(pipe, seen, **decoding)
            results["caption/novel"] = eval_captions(pipe, novel, **decoding)
        if "vqa" in tasks and pipe.model.llm is not None:
            results["vqa/seen"] = eval_vqa(pipe, seen, **decoding)
            results["vqa/novel"] = eval_vqa(pipe, novel, **decoding)
        if "retrieval" in tasks and (pipe.model.has_stage1_heads or pipe.retrieval is not None):
            gallery = world.make_gallery("test", preset.gallery, seed)
            embeds = _gallery_tokens(pipe, gallery)
            results["retrieval"] = eval_retrieval(pipe, gallery, preset.k_test, embeds)
            results["object_queries"] = eval_object_queries(pipe, gallery, preset.k_test, embeds=embeds)
    results["eval_s"] = t.seconds
    return results


def build(out_root: str | Path, preset: ShapesPreset, seed: int = 0, backbones: Path = BACKBONES,
          progress: bool = True, jobs: int = 2) -> dict:
    """Stage 1, then stage 2 on OPT and on T5, then evaluation; every step timed.
    Retrieval is scored on the stage-1 folder (stage 2 moves the Q-Former away from the
    stage-1 heads, so a stage-2 folder scored with them retrieves near chance); captions
    and VQA on each stage-2 folder.

    `jobs=2` trains and evaluates the two stage-2 runs at once, in two processes that split
    torch's threads: a stage-2 step of these tiny models is bound by per-op overhead, not by
    the matmuls, so two one-thread processes get through both runs in about half the wall
    time of one two-thread process running them in turn (stage 1's wider batch keeps both
    threads busy, so it runs alone). Same seeds and data either way; with one thread instead
    of two the float sums may round differently."""
    out = Path(out_root)
    report: dict = {"preset": asdict(preset), "seed": seed, "jobs": jobs}
    with Timer() as wall:
        stage1, report["stage1"] = train_stage1(out / "stage1", preset, seed, backbones, progress)
        report["stage1_eval"] = evaluate(stage1, preset, seed, tasks=("retrieval",))
        (out / "stage1" / "eval.json").write_text(json.dumps(report["stage1_eval"], indent=2) + "\n")
        parallel = jobs > 1  # two processes' progress bars would overwrite each other: a line per run instead
        runs = [(out, kind, preset, seed, backbones, progress and not parallel) for kind in ("opt", "t5")]
        if parallel:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, torch.get_num_threads() // len(runs))
            context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
            with ProcessPoolExecutor(len(runs), mp_context=context, initializer=torch.set_num_threads,
                                     initargs=(threads,)) as pool:
                results = list(pool.map(_stage2_and_eval, runs))
        else:
            results = [_stage2_and_eval(run) for run in runs]
        for kind, result in zip(("opt", "t5"), results):
            report[kind] = result
    report["total_train_s"] = report["stage1"]["cache_features_s"] + report["stage1"]["stage1_train_s"] + sum(
        report[k]["timing"]["cache_features_s"] + report[k]["timing"]["stage2_train_s"] for k in ("opt", "t5"))
    report["wall_s"] = wall.seconds
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _stage2_and_eval(run: tuple) -> dict:
    """One stage-2 run of `build` and its caption and VQA figures (a process of its own with jobs > 1)."""
    out, kind, preset, seed, backbones, progress = run
    pipe, timing = train_stage2(out / kind, out / "stage1", kind, preset, seed, backbones, progress)
    result = {"timing": timing, "eval": evaluate(pipe, preset, seed, tasks=("caption", "vqa"))}
    (out / kind / "eval.json").write_text(json.dumps(result["eval"], indent=2) + "\n")
    if not progress:
        print(f"stage 2 on {kind}: {timing['stage2_train_s']:.0f} s training, {result['eval']['eval_s']:.0f} s "
              f"evaluation, {timing['precision']}, {timing['threads']} thread(s)", flush=True)
    return result


def preset_with(name: str, overrides: Sequence[str]) -> ShapesPreset:
    """PRESETS[name] with `field=value` overrides: config.from_preset, the one override path."""
    return from_preset(PRESETS, name, overrides)
