"""The training loop (one for both stages) and its optimiser recipe.

Paper Sec. 4: AdamW with betas (0.9, 0.98), weight decay 0.05 (not on biases, norms or
other 1-D parameters), linear warm-up then cosine decay to a floor. Only trainable
parameters reach the optimiser; the frozen tower never does.

A stage changes which loss dict the model produces and which parameters train, not
the loop. The loop sums every `*_loss` entry and logs each.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from .config import TrainConfig
from .losses import total_loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decay / no-decay groups (LAVIS's rule: biases,
    norms and any other parameter of fewer than 2 dims get no decay)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)  # biases, norms, temp are all 1-D or 0-D
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine from `lr` to `min_lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def train(
    model: nn.Module,
    batches: Iterable[dict],
    cfg: TrainConfig,
    loss_kwargs: Optional[dict] = None,
    on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> list[dict[str, float]]:
    """Run `cfg.max_steps` optimiser steps of `model(**batch, **loss_kwargs)` (each a dict of
    named losses). Returns the per-step logs (every loss, the total and the lr)."""
    loss_kwargs = {"losses": cfg.losses, "label_smoothing": cfg.label_smoothing} | (loss_kwargs or {})
    optimizer = make_optimizer(model, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    history: list[dict[str, float]] = []
    stream: Iterator[dict] = iter(batches)
    for step in range(cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        logs: dict[str, float] = {}
        for _ in range(cfg.grad_accum_steps):
            out = model(**next(stream), **loss_kwargs)
            loss = total_loss(out)
            (loss / cfg.grad_accum_steps).backward()
            for k, v in out.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach()) / cfg.grad_accum_steps
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logs["loss"] = sum(v for k, v in logs.items() if k.endswith("_loss"))
        logs["lr"] = optimizer.param_groups[0]["lr"]
        history.append(logs)
        if on_step is not None:
            on_step(step, logs)
    return history
