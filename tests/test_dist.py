"""Two processes (gloo) on halves of a batch give the losses of one process on the whole
batch; on one process every collective is the identity."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import random_text, tiny_config

from blip2lab import dist as bdist
from blip2lab.model.blip2 import Blip2

B = 8


def _data():
    g = torch.Generator().manual_seed(0)
    ids, mask = random_text(B, 7, g)  # no padding: ITG's per-rank token means then average exactly
    return ids, mask, torch.randn(B, 3, 32, 32, generator=g)


def _model():
    torch.manual_seed(0)
    return Blip2(tiny_config()).eval()  # eval: no dropout, so both runs see the same function


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ids, mask, pixels = _data()
        half = slice(rank * B // world, (rank + 1) * B // world)
        model = _model()
        out = model(ids[half], mask[half], pixels=pixels[half], losses=("itc", "itm", "itg"),
                    generator=torch.Generator().manual_seed(rank))
        # ITM across ranks: gathered images carry gradient back; the backward must run.
        sum(v for k, v in out.items() if k.endswith("_loss")).backward()
        grad = model.ln_vision.weight.grad.clone()
        dist.all_reduce(grad)
        torch.save({k: v.detach() for k, v in out.items()} | {"ln_grad": grad}, f"{out_dir}/rank{rank}.pt")
        # Both ranks leave together: a rank that tears gloo down while its peer is still in a
        # collective (or still reading the file store) aborts the peer ("terminate called
        # without an active exception", seen in CI on a many-core machine).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_single_process_collectives_are_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert bdist.world_size() == 1 and bdist.rank() == 0
    assert bdist.all_gather_no_grad(x) is x and bdist.all_gather_with_grad(x) is x


def test_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ids, mask, pixels = _data()
    whole = _model()(ids, mask, pixels=pixels, losses=("itc", "itg"))
    for name in ("itc_loss", "itg_loss"):
        mean = (ranks[0][name] + ranks[1][name]) / 2
        torch.testing.assert_close(mean, whole[name].detach(), atol=1e-5, rtol=1e-5)
    for r in ranks:
        assert torch.isfinite(r["itm_loss"]) and r["ln_grad"].abs().sum() > 0


def _ragged_worker(rank, world, init_file, out_dir):
    """Each rank pads its own half of the batch to its own longest caption, as the
    processor does: the gathers of ITM's texts must still line up."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ids, mask = _ragged_data()
        half = slice(rank * B // world, (rank + 1) * B // world)
        T = int(mask[half].sum(1).max())  # rank 0: 4 tokens, rank 1: 7
        out = _model()(ids[half, :T], mask[half, :T], pixels=_data()[2][half],
                       generator=torch.Generator().manual_seed(rank))
        sum(v for k, v in out.items() if k.endswith("_loss")).backward()
        torch.save({k: v.detach() for k, v in out.items()}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ragged_data():
    g = torch.Generator().manual_seed(1)
    return random_text(B, 7, g, pad_from=[4, 3, 4, 2, 7, 5, 6, 7])


def test_two_processes_with_texts_of_different_lengths(tmp_path):
    mp.spawn(_ragged_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ids, mask = _ragged_data()
    whole = _model()(ids, mask, pixels=_data()[2], losses=("itc",))
    torch.testing.assert_close((ranks[0]["itc_loss"] + ranks[1]["itc_loss"]) / 2, whole["itc_loss"].detach(),
                               atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(r["itm_loss"]) and torch.isfinite(r["itg_loss"]) for r in ranks)
