"""The training loop: one for both stages (and for the backbones' pretraining), on accelerate.

Paper Sec. 4 recipe: AdamW with betas (0.9, 0.98), weight decay 0.05 (not on biases,
norms or other 1-D parameters), linear warm-up then cosine decay to a floor. Only the
trainable parameters reach the optimiser; frozen towers never do. A stage changes which
loss dict the model returns (`losses=`) and which parameters train, not the loop: it sums
every `*_loss` entry and logs each.

Reproducibility: the data are a pure function of the step (`BatchStream`), and the torch
RNG (dropout, ITM negatives) is reseeded at every step from (seed, step, rank); so a run
resumed from a checkpoint draws exactly the numbers the uninterrupted run would have.
Checkpoints hold the weights (safetensors), the optimiser state, the step and the loop's
counters, written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import csv
import ctypes
import json
import math
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from blip2lab.config import TrainConfig, save_json
from blip2lab.model.losses import total_loss

from ..dtypes import native_bf16

STATE_NAME = "train_state.pt"
# glibc keeps what a step frees in its heap, and the heap fragments: resident memory grows with
# run length while the live tensors do not. Handing the free pages back every RELEASE_EVERY
# steps holds the process at about one step's working set (docs/performance.md).
RELEASE_EVERY = 50


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decay / no-decay groups (LAVIS's rule: biases,
    norms and any other parameter of fewer than 2 dims get no decay)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)  # biases, norms, temp are all 1-D or 0-D
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, groups: Optional[list[dict]] = None) -> torch.optim.AdamW:
    """AdamW over `groups` (default `param_groups`). A group may carry `lr_scale`: its lr is the
    schedule's times that scale at every step (layer-wise lr decay, training/finetune.py)."""
    return torch.optim.AdamW(groups if groups is not None else param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=cfg.betas)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine from `lr` to `min_lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def resolve_precision(precision: str) -> str:
    """A mixed-precision setting for accelerate: "auto" -> "bf16" where `native_bf16()`, else "no"."""
    if precision == "auto":
        return "bf16" if native_bf16() else "no"
    return precision


def _accelerator(cfg: TrainConfig):
    """accelerate's Accelerator for one run. Its state is one per process and refuses a second
    mixed precision once set, yet one process may well train in fp32 and then in bf16 (a
    notebook, an ablation): with a single process the precision state starts afresh (the
    process state, device and process group, is kept); under DDP every run must agree."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, PartialState

    previous = AcceleratorState._shared_state.get("_mixed_precision", cfg.mixed_precision)
    if previous != cfg.mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _autocast(accelerator) -> ExitStack:
    """accelerate's autocast for the forward pass; on the CPU in bf16 also the plain "math"
    attention kernel: the CPU's fused (flash) kernel is slow on bf16 in the backward pass
    (docs/performance.md), and the kernel chosen in the forward pass is the one its backward runs."""
    stack = ExitStack()
    stack.enter_context(accelerator.autocast())
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 8191 + rank * 131) % (2**31 - 1)


# ---------------------------------------------------------------------------------------
# Data: batches as a pure function of the micro-step
# ---------------------------------------------------------------------------------------


class BatchStream:
    """Deterministic batches from a map-style dataset: micro-step i of rank r gets the
    examples [i * B * W + r * B, ... + B) of an endless sequence of epochs, each epoch a
    permutation drawn from (seed, epoch). Resuming at step s needs nothing but s.
    A dataset with a `set_epoch(epoch)` method (as torch's DistributedSampler has) is told
    the epoch of each example before it is read: e.g. `CachedFeatureDataset`, which draws
    one of an image's cached augmented crops per epoch."""

    def __init__(self, dataset, batch_size: int, collate: Callable[[list], dict], seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"dataset of {len(dataset)} examples is smaller than one global batch "
                             f"({batch_size} x {world_size})")
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self._epoch, self._order = -1, None
        self._told_epoch = None  # the epoch last passed to dataset.set_epoch

    def _order_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            n = len(self.dataset)
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            self._epoch = epoch
        return self._order

    def __call__(self, micro_step: int) -> dict:
        n, B = len(self.dataset), self.batch_size
        start = micro_step * B * self.world_size + self.rank * B
        items = []
        for k in range(start, start + B):
            epoch = k // n
            if epoch != self._told_epoch and hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
                self._told_epoch = epoch
            items.append(self.dataset[int(self._order_of(epoch)[k % n])])
        return self.collate(items)


# ---------------------------------------------------------------------------------------
# Logs and checkpoints
# ---------------------------------------------------------------------------------------


@dataclass
class LoopState:
    step: int = 0  # optimiser steps done
    bad_steps: int = 0  # skipped for a non-finite loss or gradient
    history: list = field(default_factory=list)


class _Logger:
    """CSV (one row a step, every loss) and TensorBoard, on the main process only."""

    def __init__(self, out_dir: Optional[Path], enabled: bool):
        self.enabled = enabled and out_dir is not None
        self.csv_path = out_dir / "log.csv" if out_dir is not None else None
        self.fields: Optional[list[str]] = None
        self.tb = None
        if self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time; the CSV always exists
                self.tb = None

    def log(self, step: int, logs: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **logs}
        if self.fields is None:  # a resumed run appends to the log it left
            self.fields = list(csv.DictReader(open(self.csv_path)).fieldnames or []) if self.csv_path.exists() else []
        if set(row) - set(self.fields):  # the first row, or a loss joined later: (re)write the header
            old = list(csv.DictReader(open(self.csv_path))) if self.fields else []
            self.fields += [k for k in row if k not in self.fields]
            with open(self.csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(old)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.tb is not None:
            for k, v in logs.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, state: LoopState, cfg: TrainConfig,
                    path: Path, save_weights: Callable[[nn.Module, Path], Any]) -> Path:
    """Weights + optimiser + loop state into `path`, atomically: written beside it, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": state.step, "bad_steps": state.bad_steps,
                "history": state.history}, tmp / STATE_NAME)
    save_json(cfg, tmp / "train_config.json")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _default_save_weights(model: nn.Module, path: Path) -> None:
    from blip2lab.formats.native import save_pretrained

    if hasattr(model, "config"):
        save_pretrained(model, path)
    else:  # a plain module (a backbone being pretrained): its state dict in safetensors
        from safetensors.torch import save_model

        path.mkdir(parents=True, exist_ok=True)
        save_model(model, str(path / "model.safetensors"))


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    from blip2lab.formats.native import load_weights_into

    if (path / "config.json").is_file():
        load_weights_into(model, path)  # strict, one tensor at a time
    else:
        load_model(model, str(path / "model.safetensors"))


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    batches: Callable[[int], dict] | Iterable[dict],
    cfg: TrainConfig,
    loss_kwargs: Optional[dict] = None,
    on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
    out_dir: Optional[str | Path] = None,
    resume: bool = False,
    save_weights: Callable[[nn.Module, Path], Any] = _default_save_weights,
    progress: bool = False,
    accelerator=None,
    load_weights: Optional[Callable[[nn.Module, Path], Any]] = None,
    groups: Optional[Callable[[nn.Module], list[dict]]] = None,
) -> list[dict[str, float]]:
    """Run optimiser steps until `cfg.max_steps`; returns every step's logs (each loss, the
    total, the lr). `batches`: a function micro-step -> batch (resumable, e.g. `BatchStream`)
    or any iterable of batch dicts. `out_dir`: logs (log.csv, TensorBoard), the resolved
    config and checkpoints (`checkpoint/` every `cfg.save_every` steps and at the end);
    `resume=True` continues from `out_dir/checkpoint` exactly where it stopped.
    `save_weights` / `load_weights`: how a checkpoint's weights are written and read back
    (default: the whole model as a blip2lab folder); `groups`: the optimiser's parameter
    groups of the model (default `param_groups`; `lr_scale` in a group scales its lr)."""
    out = Path(out_dir) if out_dir is not None else None
    accelerator = accelerator or _accelerator(cfg)
    step_fn = _Step(model, batches if callable(batches) else _from_iterable(batches), cfg, loss_kwargs, accelerator)
    state, optimizer = _start(model, cfg, out, resume, load_weights or _load_weights, groups)
    step_fn.wrapped, step_fn.optimizer = accelerator.prepare(model, optimizer)
    main = accelerator.is_main_process
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg, out / "train_config.json")  # the resolved config beside what it trains
        if hasattr(model, "config"):
            save_json(model.config, out / "model_config.json")
    logger = _Logger(out, main)
    bar = _progress_bar(cfg, state, progress and main)

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(accelerator.unwrap_model(step_fn.wrapped), step_fn.optimizer, state, cfg,
                            out / "checkpoint", save_weights)

    step_fn.wrapped.train()
    try:
        while state.step < cfg.max_steps:
            step = state.step
            logs = step_fn(step, state)
            state.history.append(logs)
            state.step += 1
            logger.log(step, logs)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k.removesuffix("_loss"): f"{v:.3f}" for k, v in logs.items() if k.endswith("_loss")})
            if on_step is not None:
                on_step(step, logs)
            if state.step % RELEASE_EVERY == 0:
                release_free_memory()
            if out is not None and cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.max_steps:
                checkpoint()
        if out is not None:
            checkpoint()
            if main:
                (out / "summary.json").write_text(json.dumps(
                    {"steps": state.step, "bad_steps": state.bad_steps, "final": state.history[-1]}, indent=2) + "\n")
    finally:
        logger.close()
        if bar is not None:
            bar.close()
    return state.history


def _start(model: nn.Module, cfg: TrainConfig, out: Optional[Path], resume: bool,
           load_weights: Callable[[nn.Module, Path], Any] = _load_weights,
           groups: Optional[Callable[[nn.Module], list[dict]]] = None):
    """(loop state, optimiser): fresh, or as `out/checkpoint` left them (weights loaded too)."""
    state = LoopState()
    if resume:
        if out is None or not (out / "checkpoint" / STATE_NAME).is_file():
            raise FileNotFoundError(f"nothing to resume: no {out}/checkpoint/{STATE_NAME}")
        load_weights(model, out / "checkpoint")
    optimizer = make_optimizer(model, cfg, groups(model) if groups is not None else None)
    if resume:
        saved = torch.load(out / "checkpoint" / STATE_NAME, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        state = LoopState(saved["step"], saved["bad_steps"], list(saved["history"]))
    return state, optimizer


def _progress_bar(cfg: TrainConfig, state: LoopState, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=state.step, desc="train", dynamic_ncols=True)


class _Step:
    """One optimiser step: the lr of the schedule, the step's seed (dropout, ITM negatives),
    `grad_accum_steps` micro-batches, gradient clipping, and the NaN / inf guard that skips an
    update rather than apply it. Returns the step's logs."""

    def __init__(self, model: nn.Module, batch_at: Callable[[int], dict], cfg: TrainConfig,
                 loss_kwargs: Optional[dict], accelerator):
        self.batch_at, self.cfg, self.accelerator = batch_at, cfg, accelerator
        kwargs = dict(loss_kwargs or {})
        self.scheduled = "losses" not in kwargs  # the caller's own `losses` wins over the schedule
        if "label_smoothing" not in kwargs and any(n in cfg.losses for n in ("itc", "itg")):
            kwargs["label_smoothing"] = cfg.label_smoothing
        if "itm_easy_negatives" not in kwargs and "itm" in cfg.losses and cfg.itm_easy_negatives > 0:
            kwargs["itm_easy_negatives"] = cfg.itm_easy_negatives
        if "lm_per_item" not in kwargs and "lm" in cfg.losses and cfg.lm_per_item:
            kwargs["lm_per_item"] = True
        self.loss_kwargs = kwargs
        self.accepts_generator = _accepts(model, "generator") and "generator" not in kwargs
        self.wrapped = self.optimizer = None  # set once accelerate has prepared them

    def __call__(self, step: int, state: LoopState) -> dict[str, float]:
        cfg, acc, optimizer = self.cfg, self.accelerator, self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)
        torch.manual_seed(step_seed(cfg.seed, step, acc.process_index))
        logs: dict[str, float] = {}
        for micro in range(cfg.grad_accum_steps):
            for k, v in self._micro_step(step, step * cfg.grad_accum_steps + micro).items():
                logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum_steps
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = acc.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
        finite = torch.isfinite(torch.as_tensor(grad_norm)).all() and math.isfinite(
            sum(v for k, v in logs.items() if k.endswith("_loss")))
        finite = bool(acc.reduce(torch.tensor(float(not finite), device=acc.device), reduction="sum").item() == 0)
        if finite:
            optimizer.step()
        else:  # skip the update, count it, stop when it keeps happening
            state.bad_steps += 1
            if state.bad_steps > cfg.max_bad_steps:
                raise FloatingPointError(f"{state.bad_steps} steps with a non-finite loss or gradient "
                                         f"(train.max_bad_steps = {cfg.max_bad_steps}); last at step {step}")
        optimizer.zero_grad(set_to_none=True)
        return logs | {"loss": sum(v for k, v in logs.items() if k.endswith("_loss")),
                       "lr": lr_at(step, cfg), "grad_norm": float(grad_norm),
                       "skipped": float(not finite)}

    def _micro_step(self, step: int, micro: int) -> dict[str, float]:
        """Forward and backward of micro-batch `micro`: its losses, as floats."""
        cfg, acc = self.cfg, self.accelerator
        batch = _to_device(self.batch_at(micro), acc.device)
        extra = {}
        if self.accepts_generator:
            extra["generator"] = torch.Generator(device=acc.device).manual_seed(
                step_seed(cfg.seed, micro, acc.process_index) + 1)
        if self.scheduled:
            extra["losses"] = cfg.losses_at(step)
        with _autocast(acc):
            losses = self.wrapped(**batch, **self.loss_kwargs, **extra)
        acc.backward(total_loss(losses) / cfg.grad_accum_steps)
        return {k: float(v.detach()) for k, v in losses.items()}


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc's malloc_trim): True if any went
    back; False if none did or the C library has no malloc_trim (macOS, musl)."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


@cache
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _from_iterable(batches: Iterable[dict]) -> Callable[[int], dict]:
    stream = iter(batches)
    return lambda _micro_step: next(stream)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


class Timer:
    """Wall time of a block, for the reports of how long each step of a recipe took."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


__all__ = ["BatchStream", "LoopState", "Timer", "lr_at", "make_optimizer", "native_bf16", "param_groups",
           "release_free_memory", "resolve_precision", "save_checkpoint", "step_seed", "train"]
