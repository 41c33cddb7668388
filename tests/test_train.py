"""The training loop on a CPU: a small run learns and writes the run-directory contract; resume is
exact after an epoch and mid-epoch; SIGINT/SIGTERM save and exit 130; a NaN loss stops the run;
distillation feeds the teacher its own size; one torch.compile run; the auto backend; each recipe
field reaches the part of the loop that uses it. (The optimizer and LR schedule: test_optim.py.)"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastcifar.train as T
from fastcifar import checkpoint
from fastcifar.errors import BadInput
from fastcifar.data import open_store
from fastcifar.models import build_model, net_from_checkpoint
from fastcifar.optim import lr_factor
from helpers import MIXED, MIXED_EMA, QUIET, cli, fit, info, metrics, tiny, untimed
from fastcifar.pipelines.loader import dali_available, make_loader

def test_small_run_learns_and_writes_the_run_contract(store_dir, tmp_path):
    run = tmp_path / "run"
    s = T.train(tiny(train__epochs=4, data__val_split=0.2), info(), out=run, data_dir=store_dir, **QUIET)
    assert {p.name for p in run.iterdir()} >= {"recipe.json", "recipe.py", "last.pt", "best.pt", "metrics.jsonl", "summary.json"}
    assert any(p.name.startswith("events.") for p in run.iterdir())
    assert json.loads((run / "summary.json").read_text()) == s
    rj = json.loads((run / "recipe.json").read_text())
    assert rj["name"] == "tiny" and rj["description"] == "tiny: a test run" and rj["train"]["epochs"] == 4

    ms = metrics(run)
    assert [m["epoch"] for m in ms] == [1, 2, 3, 4]
    keys = {"train_loss", "train_acc", "test_acc", "test_top5", "test_loss", "val_acc", "val_top5", "val_loss",
            "lr", "images_per_sec", "epoch_seconds", "wall_seconds"}
    assert all(keys <= set(m) for m in ms)
    assert all(0 <= m["test_acc"] <= m["test_top5"] <= 100 for m in ms)
    assert ms[-1]["train_loss"] < ms[0]["train_loss"]

    # learning: 100 classes, chance is 1%
    assert s["best_acc"] > 20 and s["final_acc"] > 20, s
    assert s["finished"] and s["stop_reason"] == "completed" and s["epochs_done"] == s["epochs"] == 4
    assert (s["device"], s["backend"], s["world_size"], s["synthetic"]) == ("cpu", "torch", 1, True)
    # model selection on the held-out validation images, reported apart from test
    best = max(ms, key=lambda m: m["val_acc"])
    assert s["selection"] == "val" and s["best_val_epoch"] == s["best_epoch"] == best["epoch"]
    assert s["best_val_acc"] == best["val_acc"] and s["test_acc_at_best_val"] == s["best_acc"] == best["test_acc"]
    assert s["final_acc"] == ms[-1]["test_acc"] and s["train_images_per_sec"] > 0

    ck = checkpoint.load(run / "best.pt")
    assert ck["epoch"] == s["best_epoch"]
    assert checkpoint.load(run / "last.pt")["epoch"] == 4
    ev = T.evaluate_checkpoint(str(run), data_dir=store_dir, batch_size=50, device="cpu")  # a run dir means best.pt
    assert ev["acc"] == pytest.approx(best["test_acc"]) and ev["images"] == 300

    with pytest.raises(BadInput, match="--resume"):  # never overwrite a run
        T.train(tiny(), info(), out=run, data_dir=store_dir, **QUIET)


@pytest.mark.parametrize("when", ["after_epoch", "mid_epoch", "mid_epoch_mixed_ema", "last_batch"])
def test_interrupt_then_resume_matches_a_straight_run(store_dir, straight_run, tmp_path, when):
    def sigint(epoch, i, images):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, through the loop's handler

    if when == "after_epoch":  # arrives while epoch 1 is being evaluated
        hooks = dict(test_fn=lambda e, i, x: sigint(e, i, x) if i == 0 else None)
    else:  # arrives during batch 4 of epoch 2, or its last (20th: the resume trains none of it, only logs it)
        stop = (1, 19) if when == "last_batch" else (1, 3)
        hooks = dict(train_fn=lambda e, i, x: sigint(e, i, x) if (e, i) == stop else None)
    mixed = when.endswith("mixed_ema")
    recipe = tiny(**(MIXED_EMA if mixed else {}))
    run = tmp_path / "run"
    with pytest.raises(T.Interrupted, match="--resume"):
        fit(recipe, info(), out=run, data_dir=store_dir, **hooks)
    s = json.loads((run / "summary.json").read_text())
    assert (s["finished"], s["stop_reason"]) == (False, "interrupted")
    ck = checkpoint.load(run / "last.pt")
    assert (ck["epoch"], ck["step_in_epoch"]) == {"after_epoch": (1, 0), "last_batch": (1, 20)}.get(when, (1, 4))

    s = T.train(recipe, {}, data_dir=store_dir, resume=run, **QUIET)
    assert s["finished"] and s["epochs_done"] == 3
    reference = straight_run(mixed)
    assert untimed(metrics(run)) == untimed(metrics(reference))  # test_*_ema included when mixed
    a, b = checkpoint.load(run / "last.pt"), checkpoint.load(reference / "last.pt")
    for part in ("model", "ema") if mixed else ("model",):
        assert set(a[part]) == set(b[part]) and all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part


def spy_on_targets(seen: list):
    """A fit() setup that records the targets each training step's objective gets."""
    def setup(trainer):
        objective = trainer.objective

        def spy(images, labels, targets):
            seen.append(targets.detach().clone())
            return objective(images, labels, targets)

        trainer.objective = spy

    return setup


def test_mixing_gives_the_loss_soft_targets(store_dir, tmp_path):
    seen = []
    s = fit(tiny(train__epochs=1, **MIXED), info(), out=tmp_path / "run", data_dir=store_dir,
            setup=spy_on_targets(seen))
    assert s["finished"] and seen
    assert all(t.shape == (50, 100) and t.is_floating_point() for t in seen)
    assert all(torch.allclose(t.sum(1), torch.ones(50)) for t in seen)
    assert any((t.max(1).values < 1).any() for t in seen)  # some targets really are mixtures


def test_sigterm_saves_exits_130_and_the_run_resumes(store_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastcifar", "train", "smoke", "--data-dir", str(store_dir), "--out", str(run),
           "--set", "data.backend=torch", "--set", "data.subset=1", "--set", "data.test_subset=1",
           "--set", "train.epochs=50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no epoch finished in 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"--resume {run}" in err.replace("\n", " ")
    s = json.loads((run / "summary.json").read_text())
    assert (s["finished"], s["stop_reason"]) == (False, "interrupted")
    ck = checkpoint.load(run / "last.pt")
    assert 1 <= ck["epoch"] < 50

    # resume through the CLI, finishing the epoch it stopped in
    code, _, err = cli("train", "--resume", run, "--data-dir", store_dir, "--set", f"train.epochs={ck['epoch'] + 1}")
    assert code == 0, err
    s = json.loads((run / "summary.json").read_text())
    assert s["finished"] and s["epochs_done"] == ck["epoch"] + 1 == len(metrics(run))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store_dir, tmp_path):
    def poison(epoch, i, images):
        if (epoch, i) == (1, 2):
            images[0, 0, 0, 0] = float("nan")  # one bad pixel makes the whole batch's loss NaN

    run = tmp_path / "run"
    steps_per_epoch = 1000 // 50
    with pytest.raises(T.Diverged, match=f"at step {steps_per_epoch + 3} .*epoch 2, batch 3"):
        fit(tiny(), info(), out=run, data_dir=store_dir, train_fn=poison)
    s = json.loads((run / "summary.json").read_text())
    assert not s["finished"] and "non-finite" in s["stop_reason"] and s["epochs_done"] == 1
    ck = checkpoint.load(run / "last.pt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert len(metrics(run)) == 1


def test_distillation_feeds_the_teacher_its_own_size(store_dir, tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    T.train(tiny(train__epochs=1, aug__image_size=40), info("teach"), out=teacher, data_dir=store_dir, **QUIET)
    sizes = set()
    kd = fit(tiny(train__epochs=1, distill__teacher=str(teacher)), info(), out=tmp_path / "kd", data_dir=store_dir,
             train_fn=lambda e, i, views: sizes.add(tuple(v.shape[-1] for v in views)))
    assert sizes == {(32, 40)}  # every batch: the student's view at 32, the teacher's at its own 40
    T.train(tiny(train__epochs=1), info(), out=tmp_path / "plain", data_dir=store_dir, **QUIET)
    kd_m, plain_m = metrics(tmp_path / "kd")[0], metrics(tmp_path / "plain")[0]
    assert kd_m["train_loss"] != plain_m["train_loss"]  # the KD term is in the loss
    assert kd["finished"]
    # a teacher named by its recipe is the newest run of it under runs/
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    os.rename(teacher, tmp_path / "runs" / "teach-20250101-000000")
    assert checkpoint.resolve("teach") == Path("runs/teach-20250101-000000/best.pt")
    with pytest.raises(BadInput, match="neither a checkpoint"):
        checkpoint.resolve("nobody")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_stay_finite(store_dir, tmp_path, amp):
    s = T.train(tiny(train__epochs=1, train__amp=amp, train__deterministic=False, head__kind="arcface"),
                info(), out=tmp_path / "run", data_dir=store_dir, **QUIET)
    m = metrics(tmp_path / "run")[0]
    assert s["finished"] and math.isfinite(m["train_loss"]) and math.isfinite(m["test_loss"])
    ck = checkpoint.load(tmp_path / "run" / "last.pt")
    assert ck["scaler"] != {} if amp == "fp16" else True  # fp16 keeps a GradScaler state


def test_torch_compile_run(store_dir, tmp_path, aot_eager):
    """A compiled run: uneven last evaluation batches (270 test and 150 validation images in batches
    of 100) cost no recompile, nor do the EMA's weights and the mirrored TTA view, and the weights
    keep their plain names. The graphs go to aot_eager (conftest's fixture); inductor compiles in
    the doctor's CLI test (test_doctor.py)."""
    from fastcifar.doctor import recompiles

    r = tiny(data__batch_size=100, data__test_subset=0.9, data__val_split=0.15, train__epochs=1,
             train__compile=True, train__ema_decay=0.9, train__tta="flip")
    run = tmp_path / "run"
    with recompiles() as reasons:
        s = T.train(r, info(), out=run, data_dir=store_dir, **QUIET)
    assert s["finished"] and len(aot_eager) == 2  # the net and the EMA's (evaluation reuses the net's)
    # one graph for training, one for evaluation (grad mode off): that is the only recompile allowed
    assert len(reasons) <= 1 and all("grad_mode" in c or "training" in c for c in reasons), reasons
    ck = checkpoint.load(run / "last.pt")
    net = build_model(tiny().model, tiny().head)
    net.load_state_dict(ck["model"])  # plain keys: compiling did not rename the weights
    # the compiled run's test accuracy is the eager net's on the same 270 images (up to 2 borderline ones)
    eager, r = net_from_checkpoint(ck, run / "last.pt")
    st = open_store(store_dir)
    rows = T.split_rows(len(st.labels("train")), len(st.labels("test")), r.data)[2]
    ev = T.evaluate(eager, make_loader(st, "test", r.aug, 100, backend="torch", indices=rows), tta="flip")
    assert ev["images"] == 270 and ev["acc"] == pytest.approx(s["final_acc"], abs=0.8)
    assert s["final_acc_ema"] is not None and s["tta"] == "flip"


def test_missing_store_offline_says_prepare_synthetic(tmp_path, monkeypatch):
    import fastcifar.data as data

    def offline(url, dest, md5, progress=True):
        raise BadInput(f"Could not download {url} ([Errno -2] Name or service not known).")

    monkeypatch.setattr(data, "download", offline)
    with pytest.raises(BadInput, match="fastcifar prepare --synthetic"):
        T.train(tiny(), info(), out=tmp_path / "run", data_dir=tmp_path / "nodata", **QUIET)


# ---- the loop's wiring of its parts: each recipe field reaches the part that uses it


def test_the_loop_steps_the_schedule_and_logs_each_epochs_last_lr(store_dir, tmp_path):
    """One scheduler step per optimizer step: metrics.jsonl's lr is the LR the epoch's last step
    used, peak * lr_factor(that step) (4 steps an epoch here, 8 in all)."""
    r = tiny(train__epochs=2, data__subset=0.2, schedule__warmup=0.25)
    s = fit(r, info(), out=tmp_path / "run", data_dir=store_dir)
    ms = metrics(tmp_path / "run")
    want = [r.optim.lr * lr_factor(k, 8, r.schedule) for k in (3, 7)]
    assert s["finished"] and [m["lr"] for m in ms] == pytest.approx(want)
    assert ms[0]["lr"] != pytest.approx(ms[1]["lr"])


def test_mixing_draws_differ_from_epoch_to_epoch(store_dir, tmp_path):
    """The mixing generator is seeded from (seed, epoch): in an unshuffled run, epoch 2 sees the
    same images in the same order, but mixed with other partners and weights."""
    seen = []
    fit(tiny(train__epochs=2, data__subset=0.1, data__shuffle=False, **MIXED), info(), out=tmp_path / "run",
        data_dir=store_dir, setup=spy_on_targets(seen))
    assert len(seen) == 4  # 2 batches an epoch
    assert not torch.equal(seen[0], seen[2]) and not torch.equal(seen[1], seen[3])


def test_the_recipes_ema_fields_reach_the_ema(store_dir, tmp_path):
    with T.Trainer(tiny(train__ema_decay=0.95, train__ema_every=3, train__ema_warmup=False, data__subset=0.1),
                   info(), out=tmp_path / "run", data_dir=store_dir, **QUIET) as trainer:
        ema = trainer.ema
        assert (ema.decay, ema.every, ema.warmup) == (0.95, 3, False)


class FixedLogits(torch.nn.Module):
    """Logits read from the image: image i is the row of logits it should give."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # evaluate() finds the device from a parameter

    def forward(self, x):
        return x.flatten(1)


class ListLoader:
    """The loader interface evaluate() reads: set_epoch, batch_size, batches of (images, labels)."""

    def __init__(self, batches, batch_size):
        self.batches, self.batch_size = batches, batch_size

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        return iter(self.batches)


def test_evaluate_counts_top1_top5_and_mean_loss_over_a_padded_last_batch():
    """Image k's label ranks k-th (1..6) in its logits: top-1 hits 1 of 6, top-5 hits 5 of 6; the
    loss is the mean cross-entropy over the 6 images, whatever the last batch is padded with."""
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    order = logits.argsort(1, descending=True)
    labels = order[torch.arange(6), torch.arange(6)]  # image k's label is its (k+1)-th largest logit
    loader = ListLoader([(logits[:4], labels[:4]), (logits[4:], labels[4:])], batch_size=4)
    out = T.evaluate(FixedLogits(), loader)
    assert out["images"] == 6
    assert out["acc"] == pytest.approx(100 / 6) and out["top5"] == pytest.approx(500 / 6)
    assert out["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["classify", "multiscale", "distill"])
def test_the_objective_gets_the_recipes_label_smoothing(store_dir, tmp_path, kind):
    """loss.label_smoothing reaches the objective the Trainer picks: its CE term on a batch is the
    smoothed cross-entropy of the logits it returns."""
    fields = dict(loss__label_smoothing=0.2, data__subset=0.1)
    if kind == "multiscale":
        fields["loss__scales"] = (32, 48)
    if kind == "distill":
        T.train(tiny(train__epochs=1, data__subset=0.1), info("teach"), out=tmp_path / "teacher", data_dir=store_dir,
                **QUIET)
        fields["distill__teacher"] = str(tmp_path / "teacher")
    with T.Trainer(tiny(**fields), info(), out=tmp_path / "run", data_dir=store_dir, **QUIET) as trainer:
        trainer.train_loader.set_epoch(0)
        images, labels = next(iter(trainer.train_loader))
        out = trainer.objective(images, labels, labels)  # as train_step calls it
        want = torch.nn.functional.cross_entropy(out["logits"].float(), labels, label_smoothing=0.2)
        assert torch.allclose(out["ce"], want, atol=1e-6)
        assert not torch.allclose(want, torch.nn.functional.cross_entropy(out["logits"].float(), labels), atol=1e-3)


def test_auto_backend_trains_on_dali_where_it_imports(store_dir, tmp_path):
    s = T.train(tiny(train__epochs=1, data__backend="auto"), info(), out=tmp_path / "run", data_dir=store_dir, **QUIET)
    assert s["backend"] == ("dali-cpu" if dali_available() else "torch")
    assert s["finished"] and s["best_acc"] > 5  # 100 classes: it learned something on either backend
