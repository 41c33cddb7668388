"""Two CPU processes under torchrun (gloo): each rank trains on its own shard, together they cover
every training image exactly once per epoch, metrics are all-reduced, only rank 0 writes the run,
and --resume continues it. The run uses SyncBatchNorm and an EMA: BatchNorm statistics end identical
on both ranks (a second, short run without SyncBN in the same processes shows they differ without
it), the EMA is the same on both, and the CPU SyncBatchNorm computes what one BatchNorm over the
whole batch does. With SyncBN under DDP the run trains eagerly, even when asked to compile, and
says so; last.pt holds each rank's RNG states."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastcifar.train as T
from fastcifar import checkpoint
from fastcifar.data import open_store, prepare

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, N_TEST, BATCH = 400, 150, 40  # BATCH is global: 20 per rank


def torchrun(record: Path | None, *args: str) -> subprocess.CompletedProcess:
    """Two ranks of the recording worker (record: where it writes), or of `-m fastcifar` itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        env["FASTCIFAR_TEST_RECORD"] = str(record)
    program = [str(ROOT / "tests" / "ddp_worker.py")] if record is not None else ["-m", "fastcifar"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_gloo_ranks_cover_each_epoch_once_and_write_one_run(tmp_path):
    data = tmp_path / "cifar100"
    prepare(data, synthetic=True, n_train=N_TRAIN, n_test=N_TEST, log=lambda *_: None)
    run = tmp_path / "run"
    common = ["--data-dir", str(data), "--set", "data.backend=torch", "--set", "data.subset=1",
              "--set", "data.test_subset=1", "--set", f"data.batch_size={BATCH}", "--set", "train.device=cpu",
              "--set", "schedule.final_lr=0.1"]  # ends above LR 0: the resume below may add an epoch
    # train.compile=true with SyncBN under DDP: the run trains eagerly instead, and says so
    features = ["--set", "model.sync_bn=true", "--set", "train.ema_decay=0.9", "--set", "model.drop_path=0.1",
                "--set", "train.compile=true"]
    p = torchrun(tmp_path / "rec1", "smoke", "--out", str(run), "--set", "train.epochs=2", *common, *features,
                 "--second-out", str(tmp_path / "nosync"), "--second-set", "model.sync_bn=false",
                 "--second-set", "train.compile=false", "--second-set", "train.epochs=1")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    banner = next(line for line in p.stdout.splitlines() if line.startswith("Training smoke"))
    assert "x 2 ranks" in banner and "compile off" in banner
    assert "train.compile=true set aside: model.sync_bn under DDP trains eagerly" in p.stdout
    assert p.stdout.count("set aside") == 1  # rank 0 alone speaks, and the second run (no SyncBN) had nothing to say

    # SyncBN: every BatchNorm's running statistics are the same on both ranks, and not without it
    synced, alone = ([torch.load(tmp_path / "rec1" / f"rank{r}{sfx}.pt") for r in range(2)] for sfx in ("", "_second"))
    assert len(synced[0]["bn"]) >= 10
    assert all(torch.equal(synced[0]["bn"][k], synced[1]["bn"][k]) for k in synced[0]["bn"])
    assert not all(torch.equal(alone[0]["bn"][k], alone[1]["bn"][k]) for k in alone[0]["bn"])
    # the EMA lives on both ranks, identically, and last.pt holds it; and each rank's RNG states
    ema = checkpoint.load(run / "last.pt")["ema"]
    assert len(checkpoint.load(run / "last.pt")["rng"]["ranks"]) == 2
    assert all(torch.equal(synced[r]["ema"][k], ema[k]) for r in range(2) for k in ema)

    labels = np.asarray(open_store(data).labels("train"))
    ranks = [json.loads((tmp_path / "rec1" / f"rank{r}.json").read_text()) for r in range(2)]
    for rk in ranks:  # the CPU SyncBatchNorm on half a batch per rank = BatchNorm on all of it
        sb = rk.pop("syncbn")
        assert sb.pop("type") == "GlooSyncBatchNorm" and max(sb.values()) < 1e-5, sb
    for epoch in ("0", "1"):
        per_rank = [[row for b in rk[epoch] for row in b["rows"]] for rk in ranks]
        assert all(len(b["rows"]) == BATCH // 2 for rk in ranks for b in rk[epoch])  # per-rank batch
        assert len(per_rank[0]) == len(per_rank[1]) == N_TRAIN // 2
        assert not set(per_rank[0]) & set(per_rank[1])                # disjoint shards ...
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N_TRAIN))  # ... covering the epoch once
        for rk in ranks:  # and the loop trained on exactly those rows' images
            assert all(b["labels"] == labels[b["rows"]].tolist() for b in rk[epoch])
    assert ranks[0]["0"][0]["rows"] != ranks[0]["1"][0]["rows"]  # reshuffled per epoch

    # one run directory, written by rank 0 only
    assert len(list(run.glob("events.*"))) == 1 and len(list(run.glob("summary.json"))) == 1
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    s = json.loads((run / "summary.json").read_text())
    assert (s["world_size"], s["epochs_done"], s["finished"]) == (2, 2, True)
    ms = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in ms] == [1, 2]
    # evaluation is sharded (75 images per rank) and all-reduced: one process on all 150 agrees
    for weights, sfx in (("raw", ""), ("ema", "_ema")):
        ev = T.evaluate_checkpoint(str(run / "last.pt"), data_dir=data, batch_size=20, device="cpu", weights=weights)
        assert ev["images"] == N_TEST
        assert ms[-1][f"test_loss{sfx}"] == pytest.approx(ev["loss"], rel=1e-4)
        assert ms[-1][f"test_acc{sfx}"] == pytest.approx(ev["acc"], abs=1.4)  # at most 2 borderline images

    # resume through the CLI under torchrun (`torchrun -m fastcifar train --resume`): continues at
    # epoch 3 and appends to the same run
    p = torchrun(None, "train", "--resume", str(run), "--set", "train.epochs=3", "--data-dir", str(data))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert (s["world_size"], s["epochs_done"], s["finished"]) == (2, 3, True)
    after = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in after] == [1, 2, 3]
    assert after[:2] == ms  # only the new epoch ran: epochs 1-2 are the first run's lines, timings included
    assert checkpoint.load(run / "last.pt")["step"] == 3 * (N_TRAIN // BATCH)
