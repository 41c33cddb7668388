"""Run by test_ddp.py under torchrun: train as `fastcifar train RECIPE --set ... --out ... --data-dir ...`
does, through the Trainer, recording which train rows each rank's loop consumes (a LoaderSpy on
the trainer's loader). Writes $FASTCIFAR_TEST_RECORD/rank<R>.json, and rank<R>.pt: this rank's
BatchNorm running statistics and EMA weights after training.

With --second-out DIR it then trains a second run in the same processes, the same overrides plus
each --second-set, recording rank<R>_second.pt. Its process group rendezvouses on a store of its
own (a free port rank 0 picks): joining again on torchrun's store, which keeps the first group's
keys, hangs now and then."""

import argparse
import copy
import json
import os
import socket
from pathlib import Path

import torch
from torch import nn

from fastcifar import config
from fastcifar.models import sync_batchnorm
from fastcifar.train import Trainer
from helpers import LoaderSpy


def final_state(trainer) -> dict:
    """This rank's BatchNorm running statistics and EMA weights (None without an EMA)."""
    bn = {k: v.clone() for k, v in trainer.model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    return {"bn": bn, "ema": trainer.ema.state_dict() if trainer.ema is not None else None}


def syncbn_against_one_process(rank: int, world: int) -> dict:
    """The CPU SyncBatchNorm on this rank's share of a batch against plain BatchNorm on the whole
    batch: outputs, input and parameter gradients, running statistics (max absolute differences)."""
    torch.manual_seed(0)  # the same batch, weights and upstream gradient on every rank
    x, g = torch.randn(8, 3, 5, 5) * 3 + 1, torch.randn(8, 3, 5, 5)
    full = nn.BatchNorm2d(3)
    with torch.no_grad():
        full.weight.uniform_(0.5, 1.5), full.bias.uniform_(-1, 1)
    synced = sync_batchnorm(copy.deepcopy(full), torch.device("cpu"))
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    xs, xf = x[share].clone().requires_grad_(), x.clone().requires_grad_()
    ys, yf = synced(xs), full(xf)
    (ys * g[share]).sum().backward()
    (yf * g).sum().backward()
    grads = torch.cat([synced.weight.grad, synced.bias.grad])
    torch.distributed.all_reduce(grads)  # what DDP sums over ranks
    return {"type": type(synced).__name__, "out": (ys - yf[share]).abs().max().item(),
            "input_grad": (xs.grad - xf.grad[share]).abs().max().item(),
            "param_grad": (grads - torch.cat([full.weight.grad, full.bias.grad])).abs().max().item(),
            "running": max((synced.running_mean - full.running_mean).abs().max().item(),
                           (synced.running_var - full.running_var).abs().max().item())}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out")
    p.add_argument("--data-dir")
    p.add_argument("--second-out")
    p.add_argument("--second-set", action="append", default=[])
    a = p.parse_args()
    record, rank = Path(os.environ["FASTCIFAR_TEST_RECORD"]), os.environ["RANK"]
    r, info = config.load(a.recipe)
    config.apply_overrides(r, a.set)
    seen: dict[int, list] = {}
    try:
        with Trainer(r, info, out=a.out, data_dir=a.data_dir) as trainer:
            loader = trainer.train_loader
            # note each training batch's rows and labels, as this rank's loop consumes them
            trainer.train_loader = LoaderSpy(loader, lambda epoch, i, images, labels: seen.setdefault(epoch, []).append(
                {"rows": loader.batches(epoch)[i].tolist(), "labels": labels.tolist()}))
            trainer.fit()
            torch.save(final_state(trainer), record / f"rank{rank}.pt")
            seen["syncbn"] = syncbn_against_one_process(trainer.rank, trainer.world)
            port = [None]
            if trainer.rank == 0:
                with socket.socket() as sock:
                    sock.bind(("", 0))
                    port[0] = sock.getsockname()[1]
            torch.distributed.broadcast_object_list(port)
    finally:
        (record / f"rank{rank}.json").write_text(json.dumps({str(e): b for e, b in seen.items()}))
    if a.second_out:
        os.environ.update(MASTER_PORT=str(port[0]), TORCHELASTIC_USE_AGENT_STORE="False")
        r, info = config.load(a.recipe)
        config.apply_overrides(r, a.set + a.second_set)
        with Trainer(r, info, out=a.second_out, data_dir=a.data_dir) as trainer:
            trainer.fit()
            torch.save(final_state(trainer), record / f"rank{rank}_second.pt")
