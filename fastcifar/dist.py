"""Multi-process training under torchrun: one process per GPU (NCCL), or per CPU slot (gloo).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op for one
process, so the train loop has one code path.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fastcifar import BadInput

# what torchrun sets for each process; a launch with WORLD_SIZE > 1 needs all of them
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, (0, 1, 0) without them; BadInput
    when they are garbage or do not fit together (set by hand, or left over from another job)."""
    env = {k: os.environ.get(k) for k in LAUNCH_VARS}
    given = [k for k, v in env.items() if v is not None]

    def bad(why: str) -> BadInput:
        return BadInput(f"The launch environment ({' '.join(f'{k}={env[k]}' for k in given)}) is not one torchrun "
                        f"sets: {why}. Launch with `torchrun --nproc-per-node N -m fastcifar ...`, or unset "
                        f"{', '.join(given)} to run in one process.")

    nums = {}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        v = env[k] if env[k] is not None else "1" if k == "WORLD_SIZE" else "0"
        if not v.strip().isdigit():  # digits only: no sign, so no negative index
            raise bad(f"{k}={v!r} is not a process index (0, 1, 2, ...)")
        nums[k] = int(v)
    rank, world, local = nums["RANK"], nums["WORLD_SIZE"], nums["LOCAL_RANK"]
    if world < 1:
        raise bad("WORLD_SIZE must be at least 1")
    if rank >= world or local >= world:
        raise bad(f"RANK and LOCAL_RANK must be below WORLD_SIZE ({world})")
    missing = [k for k, v in env.items() if v is None]
    if world > 1 and missing:
        raise bad(f"WORLD_SIZE={world} needs {', '.join(missing)} as well")
    if world > 1 and not (env["MASTER_PORT"].strip().isdigit() and 0 < int(env["MASTER_PORT"]) < 65536):
        raise bad(f"MASTER_PORT={env['MASTER_PORT']!r} is not a port (1 to 65535)")
    return rank, world, local


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
