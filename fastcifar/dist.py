"""Multi-process training under torchrun: one process per GPU (NCCL), or per CPU slot (gloo).
Without torchrun's RANK, WORLD_SIZE and LOCAL_RANK everything here is a no-op for one process, so
the train loop has one code path."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launch() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) without torchrun."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def local_rank() -> int:
    """This process's index on its node (0 when not under torchrun)."""
    return launch()[2]


def init(device_type: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank), joining the process group when launched by torchrun."""
    rank, world, local = launch()
    if world > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank, world, local


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or op) of t over ranks, in place; t itself when running alone."""
    if active():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (picklable objects); [obj] when running alone."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when flag is true on any (one host sync when there are several ranks)."""
    if not active():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if active():
        dist.barrier()


def destroy() -> None:
    if active():
        dist.destroy_process_group()
