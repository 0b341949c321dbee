"""`blip2lab train {stage1,stage2,finetune}`: one typed config for a training run
(`TrainRunConfig`: the data, the model's source, what trains, the loop's `TrainConfig`), the
paper's defaults as presets, and `run(cfg)`, which builds the model, opens the data, calls
THE training loop (training/loop.py: resume, clipping, accumulation, NaN guard, CSV +
TensorBoard, accelerate) and saves a blip2lab folder that `blip2lab.load` opens.

    stage1    ITC + ITM + ITG (paper Sec. 3.2): the Q-Former, ln_vision and heads train
    stage2    the LM loss through a frozen LLM (Sec. 3.3): the Q-Former and the projection train
    finetune  every trainable part of the model continues on the data: the LM loss where the
              model has an LLM (its stage-1 heads kept as they are), else the stage-1 losses

Presets follow the paper (Sec. 4, Table 7): AdamW (0.9, 0.98), weight decay 0.05, peak lr
1e-4 (fine-tuning 1e-5), cosine with linear warm-up (2k steps; at most a tenth of a shorter
run), cosine floor 1e-5 (stage 2: 5e-5), images 224 px (a model built for fine-tuning: 364;
`model.image_size` trains a source at another size, its ViT's position embeddings interpolated).

Layout of --out DIR:
    config.json, model.safetensors, *_tokenizer/   the trained model (blip2lab.load(DIR))
    run_config.json                                the resolved TrainRunConfig
    lora_adapter/                                  LoRA runs: the adapters (one peft folder, HF names)
    train/                                         the loop's log.csv, tb/, checkpoint/
    summary.json                                   steps, final losses, data skips, parameters
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import Blip2Config, ConfigError, LLMConfig, TrainConfig, apply_overrides, from_dict, to_dict
from ..dtypes import pick_dtype
from ..images import CropConfig
from ..model import Blip2
from ..processor import Blip2Processor
from .data_sources import DataConfig, detect_format, open_data
from .finetune import FinetuneConfig, apply_finetune, layer_decay_groups, merge_lora, save_lora_adapter, \
    trainable_summary
from .loop import STATE_NAME, BatchStream, resolve_precision, train
from .resolution import at_image_size
from .streams import Prefetched, ShardStream

__all__ = ["ModelConfig", "TrainRunConfig", "PRESETS", "resolve", "run", "load_model", "stage_losses",
           "make_collate", "TRAINABLE_NAME", "load_run_model"]

Stage = Literal["stage1", "stage2", "finetune"]
TRAINABLE_NAME = "trainable.safetensors"  # a checkpoint holds what trains; the rest comes from the source


@dataclass
class ModelConfig:
    """Where the model comes from."""

    # --from: a shipped name, a blip2lab folder, an official HF folder / hub id (what
    # `blip2lab.load` opens), or a LAVIS .pth (described by `build`); None: build `build`.
    source: Optional[str] = None
    # The model built when there is no source (or that a LAVIS file fills): an open_clip
    # tower (`vision.model_name`) or the official ViT (`vision.backend=hf_blip2`), the Q-Former
    # from a BERT folder (`qformer.init_from`, its sizes and tokenizer read from there) or
    # random, and any causal LM or T5 (`llm.name_or_path`, a folder or hub id).
    build: Blip2Config = field(default_factory=Blip2Config)
    # Stage 2 from a source without an LLM (a stage-1 model): the LLM to add.
    llm: LLMConfig = field(default_factory=LLMConfig)
    qformer_tokenizer: Optional[str] = None  # a BERT tokenizer folder; None: build.qformer.init_from
    vision_weights: Optional[str] = None  # a LAVIS source's eva_vit_g.pth (LAVIS files lack the ViT)
    # VQA data: the question also enters the Q-Former (the paper's VQA fine-tuning); None: the model's own
    qformer_question: Optional[bool] = None
    llm_max_len: Optional[int] = None  # LLM tokens of prompt + text; None: the model's llm.max_text_len
    # The image size to train at; None: the model's own (a built model: build.vision.image_size).
    # A source made at another size gets its ViT's position embeddings interpolated to the new
    # grid, as the paper fine-tunes at 364 px a model pre-trained at 224 (training/resolution.py).
    image_size: Optional[int] = None


@dataclass
class TrainRunConfig:
    """One run of `blip2lab train`: saved resolved as DIR/run_config.json."""

    stage: Stage = "stage1"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = ""
    # accelerate's mixed precision: "auto" = bf16 where the device runs it natively, else fp32
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    progress: bool = True  # tqdm progress bar (main process)

    def __post_init__(self) -> None:
        if self.stage not in ("stage1", "stage2", "finetune"):
            raise ConfigError(f"stage must be stage1, stage2 or finetune, got {self.stage!r}")


def _preset(stage: Stage) -> TrainRunConfig:
    if stage == "stage1":
        cfg = TrainConfig(stage=1, losses=("itc", "itm", "itg"), lr=1e-4, min_lr=1e-5, warmup_steps=2000,
                          max_steps=250_000)
    elif stage == "stage2":
        cfg = TrainConfig(stage=2, losses=("lm",), lr=1e-4, min_lr=5e-5, warmup_steps=2000, max_steps=80_000)
    else:  # Table 7 of the paper (COCO captioning): lr 1e-5, ViT layer decay 0.95, 364 px
        cfg = TrainConfig(stage=2, losses=("lm",), lr=1e-5, min_lr=0.0, warmup_steps=1000, max_steps=10_000)
    build = Blip2Config()
    if stage == "finetune":
        build = replace(build, vision=replace(build.vision, image_size=364))
    return TrainRunConfig(stage=stage, model=ModelConfig(build=build), train=cfg)


PRESETS: dict[str, TrainRunConfig] = {s: _preset(s) for s in ("stage1", "stage2", "finetune")}


def resolve(stage: Stage, config_file: Optional[str] = None, overrides: tuple[str, ...] = ()) -> TrainRunConfig:
    """PRESETS[stage], then a JSON file of (part of) a TrainRunConfig, then `a.b=value`
    overrides (config.apply_overrides: unknown keys are errors naming them)."""
    cfg = PRESETS[stage]
    if config_file is not None:
        data = to_dict(cfg)
        _merge(data, json.loads(Path(config_file).read_text()))
        cfg = from_dict(TrainRunConfig, data | {"stage": stage})
    return apply_overrides(cfg, list(overrides))


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v, f"{prefix}{k}.")
        else:
            base[k] = v  # unknown keys are left in and refused by from_dict, by name


def stage_losses(cfg: TrainRunConfig, has_llm: bool) -> tuple[str, ...]:
    """The losses of a run: finetune.losses when given, else the stage's."""
    if cfg.finetune.losses:
        return cfg.finetune.losses
    if cfg.stage == "stage1":
        return ("itc", "itm", "itg")
    if cfg.stage == "stage2" or has_llm:
        return ("lm",)
    return ("itc", "itm", "itg")  # fine-tuning a model without an LLM: its own stage-1 losses


# -- the model ---------------------------------------------------------------------------


def load_model(cfg: TrainRunConfig, device: Optional[torch.device] = None) -> tuple[Blip2, Blip2Processor]:
    """The run's model and processor: from the source (or built), an LLM added for stage 2,
    the question-aware Q-Former switched as asked, the trainable set applied."""
    from . import sources

    m = cfg.model
    if m.source is None:  # built at the run's size directly: nothing learned to interpolate
        vision = m.build.vision if m.image_size is None else replace(m.build.vision, image_size=m.image_size)
        model, proc = sources.fresh(replace(m.build, vision=vision), m.qformer_tokenizer)
    elif m.source.endswith((".pth", ".pt")):
        model, proc = sources.lavis(m)
    else:
        model, proc = sources.opened(m.source)
    if m.image_size is not None:
        model, proc = at_image_size(model, proc, m.image_size)
    if cfg.stage == "stage2" and model.llm is None:
        if m.llm.kind == "none":
            raise ConfigError(f"stage 2 needs an LLM: {m.source or 'the built model'} has none; name one with "
                              f"--set model.llm.kind=decoder model.llm.name_or_path=FOLDER")
        model, proc = sources.with_llm(model, proc, m.llm)
    if m.qformer_question is not None and m.qformer_question != model.config.qformer_question:
        model.config = replace(model.config, qformer_question=m.qformer_question)
    if m.llm_max_len is not None or model.llm is not None:
        proc.llm_max_len = m.llm_max_len or model.config.llm.max_text_len
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model.llm is not None and device.type == "cuda" and cfg.finetune.quantize == "none":
        model.llm.to_dtype(pick_dtype(model.config.llm.dtype, model.llm.kind, device))
    _check_stage(cfg, model, proc)
    return apply_finetune(model, cfg.finetune, device), proc


def _check_stage(cfg: TrainRunConfig, model: Blip2, proc: Blip2Processor) -> None:
    losses = stage_losses(cfg, model.llm is not None)
    if any(n != "lm" for n in losses) and (not model.has_stage1_heads or proc.qformer_tokenizer is None):
        raise ConfigError(f"{cfg.stage}'s losses {list(losses)} need the Q-Former's text side and its tokenizer; "
                          f"{cfg.model.source or 'the model'} has {'no tokenizer' if model.has_stage1_heads else 'none'}")
    if "lm" in losses and model.llm is None:
        raise ConfigError(f"the lm loss needs an LLM; {cfg.model.source or 'the model'} has none")
    if cfg.data.path and detect_format(cfg.data) in ("vqav2", "lavis_vqa") and "lm" not in losses:
        raise ConfigError("VQA data trains with the LM loss (stage2 or finetune of a model with an LLM)")


# -- batches ---------------------------------------------------------------------------


def make_collate(proc: Blip2Processor, losses: tuple[str, ...], crop, qformer_question: bool = False,
                 prefix_lm: bool = False, seed: int = 0) -> Callable[[list[dict]], dict]:
    """Items -> a batch: pixels (B, 3, S, S) of each item's training view (the one image
    transform, view = the epoch), the Q-Former text for stage-1 losses, and the processor's
    LLM rows for the LM loss (decoder_batch / encoder_decoder_batch; `prefix_lm`: T5's
    stage-2 prefix split, drawn from (seed, item, epoch))."""
    return _Collate(proc, tuple(losses), crop, qformer_question, prefix_lm, seed)


@dataclass
class _Collate:
    """make_collate's function as an object: DataLoader workers started by spawn (macOS, or a
    spawned process, whose children spawn too) receive it pickled, which a closure cannot be."""

    proc: Blip2Processor
    losses: tuple[str, ...]
    crop: CropConfig
    qformer_question: bool
    prefix_lm: bool
    seed: int

    def __call__(self, items: list[dict]) -> dict:
        proc, losses = self.proc, self.losses
        pixels = torch.stack([proc.transform.view(it["image"], self.crop, it["index"], it["epoch"]) for it in items])
        batch = {"pixels": pixels}  # (B, 3, S, S)
        if any(n != "lm" for n in losses):
            batch |= proc.qformer_text([it["text"] for it in items])
            batch["image_ids"] = torch.tensor([it["image_id"] for it in items])
        if "lm" in losses:
            batch |= _llm_rows(proc, items, self.qformer_question, self.prefix_lm, self.seed)
        return batch


def _llm_rows(proc: Blip2Processor, items: list[dict], qformer_question: bool, prefix_lm: bool, seed: int) -> dict:
    vqa = [it.get("question") is not None for it in items]
    prompts = [proc.vqa_prompt(it["question"]) if q else proc.caption_prompt for it, q in zip(items, vqa)]
    targets = [it["text"] for it in items]
    if proc.llm_kind == "decoder":
        rows = proc.decoder_batch(prompts, targets)
    else:
        if prefix_lm:  # stage 2 of the paper: [visual ; prefix] -> suffix, captions only
            for i, it in enumerate(items):
                if not vqa[i]:
                    prompts[i], targets[i] = proc.prefix_split(it["text"], random.Random(
                        f"{seed}/{it['index']}/{it['epoch']}"))
        rows = proc.encoder_decoder_batch(prompts, targets)
    if qformer_question:
        q = proc.qformer_questions([it.get("question") or proc.caption_prompt for it in items])
        q["question_mask"] = q["question_mask"].masked_fill(~torch.tensor(vqa)[:, None], 0)  # captions: no text
        rows |= q
    return rows


def _stream(cfg: TrainRunConfig, dataset, collate, rank: int, world: int):
    t = cfg.train
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return ShardStream(dataset, t.batch_size, collate, cfg.data.num_workers)
    return Prefetched(BatchStream(dataset, t.batch_size, collate, seed=t.seed, rank=rank, world_size=world),
                      cfg.data.num_workers)


# -- checkpoints: what trains ----------------------------------------------------------------


def save_trainable(model: nn.Module, path: Path) -> None:
    """A checkpoint's weights: the trainable parameters only (the frozen ones come from the source)."""
    path.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(path / TRAINABLE_NAME))


def load_trainable(model: nn.Module, path: Path) -> None:
    """Strict: the checkpoint holds exactly this run's trainable parameters, at their shapes."""
    state = load_file(str(path / TRAINABLE_NAME))
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if state.keys() != own.keys():
        raise ConfigError(f"{path} was written by a run with other trainable parameters (missing "
                          f"{sorted(own.keys() - state.keys())[:5]}, extra {sorted(state.keys() - own.keys())[:5]}): "
                          f"resume with the same config")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


# -- the run -----------------------------------------------------------------------------


def _train_config(cfg: TrainRunConfig, losses: tuple[str, ...]) -> TrainConfig:
    """The loop's config: the run's losses and precision, warm-up at most a tenth of the run."""
    t = cfg.train
    warmup = min(t.warmup_steps, max(1, t.max_steps // 10)) if t.warmup_steps else 0
    return replace(t, losses=losses, stage=2 if "lm" in losses else 1, warmup_steps=warmup,
                   mixed_precision=resolve_precision(cfg.precision), out_dir=str(Path(cfg.out) / "train"),
                   loss_schedule=tuple(e for e in t.loss_schedule if e.partition("@")[0] in losses))


def run(cfg: TrainRunConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train as `cfg` says and save the result at cfg.out; returns the run's summary."""
    from accelerate import PartialState

    if not cfg.out:
        raise ConfigError("out is empty: pass --out DIR")
    # cpu=True as the loop's Accelerator asks: accelerate sees gloo processes only so (its state is one per process)
    out, state = Path(cfg.out), PartialState(cpu=not torch.cuda.is_available())
    _check_resume(out, resume)
    torch.manual_seed(cfg.train.seed)  # fresh parts (queries, projections, adapters) drawn alike on every rank
    model, proc = load_model(cfg)
    losses = stage_losses(cfg, model.llm is not None)
    dataset = open_data(cfg.data, rank=state.process_index, world_size=state.num_processes, seed=cfg.train.seed)
    collate = make_collate(proc, losses, cfg.data.crop, model.config.qformer_question,
                           prefix_lm=cfg.stage == "stage2" and model.config.llm.kind == "encoder_decoder",
                           seed=cfg.train.seed)
    tcfg = _train_config(cfg, losses)
    counts = trainable_summary(model)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        log(f"{cfg.stage}: losses {list(losses)}, {counts['trainable']:,} trainable of "
            f"{counts['trainable'] + counts['frozen']:,} parameters; {_report(dataset)}")
    groups = (lambda m: layer_decay_groups(m, tcfg.weight_decay, cfg.finetune.layer_decay)) \
        if cfg.finetune.train_vision else None
    history = train(model, _stream(cfg, dataset, collate, state.process_index, state.num_processes), tcfg,
                    out_dir=out / "train", resume=resume, save_weights=save_trainable, load_weights=load_trainable,
                    groups=groups, progress=cfg.progress)
    summary = {"steps": len(history), "final": history[-1], "losses": list(losses), "parameters": counts,
               "data": _report(dataset)}
    if state.is_main_process:
        _save_result(cfg, model, proc, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"saved {out} ({summary['steps']} steps, loss {history[-1]['loss']:.4f}); {summary['data']}")
    state.wait_for_everyone()
    return summary | {"history": history}


def _check_resume(out: Path, resume: bool) -> None:
    checkpoint = out / "train" / "checkpoint" / STATE_NAME
    if checkpoint.is_file() and not resume:
        raise ConfigError(f"{out} holds a checkpoint of an earlier run: pass --resume to continue it, or choose "
                          f"another --out")
    if resume and not checkpoint.is_file():
        raise FileNotFoundError(f"nothing to resume: no {checkpoint}")


def _report(dataset) -> str:
    report = getattr(dataset, "report", None)
    return report() if report is not None else ""


def _save_result(cfg: TrainRunConfig, model: Blip2, proc: Blip2Processor, out: Path) -> None:
    """The trained model as a blip2lab folder (LoRA merged; the adapters kept beside)."""
    from ..pipeline import Blip2Pipeline

    if cfg.finetune.quantize != "none":
        model = _dequantized(cfg, model)
    if cfg.finetune.mode == "lora":  # the adapters in HF names first: merging takes them out of the model
        try:
            save_lora_adapter(model, cfg.finetune.lora, out / "lora_adapter", base=cfg.model.source or "")
        except ValueError as err:  # an adapter with no HF counterpart: a partial folder would unmerge wrongly
            warnings.warn(f"no {out / 'lora_adapter'}: {err}; {out} holds every adapter merged", stacklevel=2)
        merge_lora(model)
    model.requires_grad_(False)
    if model.llm is not None:  # reopened in the precision it trained in, not the source file's
        model.llm.model.config.dtype = model.llm.model.dtype
    Blip2Pipeline(model.eval(), proc).save(out)


def load_run_model(folder: str | Path):
    """A trained folder as a pipeline (what `blip2lab.load(folder)` gives)."""
    from ..pipeline import load

    return load(str(folder))


def _dequantized(cfg: TrainRunConfig, trained: Blip2) -> Blip2:
    """An 8/4-bit run's result at full precision: the source reloaded without quantisation,
    the trained parameters (Q-Former, projection, adapters) copied in."""
    plain = replace(cfg, finetune=replace(cfg.finetune, quantize="none"))
    model, _ = load_model(plain, torch.device("cpu"))
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                own[name].copy_(p.detach().cpu())
    return model
