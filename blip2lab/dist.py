"""Every collective blip2lab uses, in one place; each is the identity on one process.

LAVIS calls `torch.distributed` directly inside `forward` and crashes on a single GPU
(BLIP2_REFERENCE.md Sec. 8); here the model code only ever calls these functions.
All gathers assume every rank holds the same batch size, as BLIP-2's training does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def pad_to_common_length(x: torch.Tensor, value: int) -> torch.Tensor:
    """Pad dim 1 of `x` (B, T) with `value` to the longest T of all ranks, so that a gather
    of it lines up: each rank pads its texts to its own longest, and a gather of unequal
    shapes would fail (gloo: "Received data size doesn't match expected size")."""
    if not is_distributed():
        return x
    longest = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    return torch.nn.functional.pad(x, (0, int(longest) - x.shape[1]), value=value)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0; no gradient flows back (LAVIS
    `concat_all_gather`, used for ITC features and for ITM's text ids)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 with gradient: every rank's loss that
    uses another rank's rows sends its gradient back to that rank (LAVIS
    `all_gather_with_grad`, used for ITM's image embeddings)."""
    if not is_distributed():
        return x
    # torch's differentiable all_gather: its backward sums the gradients of every rank
    # (a reduce-scatter) into the owner's slice.
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)
