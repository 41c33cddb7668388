"""Where a run's time goes (fastcifar/timing.py): the data-wait share per epoch, the first step's
warm-up, time to a target accuracy and stopping there; each carried exactly over a resume."""

import json
import os
import signal
import time

import pytest
import torch

import fastcifar.train as T
from fastcifar import checkpoint, timing
from fastcifar.config import Recipe, apply_overrides, from_dict, to_dict
from fastcifar.errors import BadInput
from helpers import LoaderSpy, QUIET, fit, fixed_scores, info, metrics, tiny

SLEEP = 0.5  # seconds a slow loader spends on each batch: long beside a step even on a loaded machine
STEPS = 6     # batches per epoch: 300 train images in batches of 50


def fit_logged(recipe, setup=None, **kw) -> tuple[dict, list[str]]:
    """fit(), keeping the lines the run prints."""
    lines = []
    with T.Trainer(recipe, info(), log=lines.append, **kw) as trainer:
        if setup:
            setup(trainer)
        return trainer.fit(), lines


def slow_loader(trainer):
    """A setup(trainer): the training loader sleeps SLEEP before each batch, as a slow pipeline would."""
    trainer.train_loader = LoaderSpy(trainer.train_loader, lambda *a: time.sleep(SLEEP))


def test_a_slow_loader_shows_up_as_data_wait(small_store_dir, tmp_path):
    s, lines = fit_logged(tiny(train__epochs=1), out=tmp_path / "slow", data_dir=small_store_dir, setup=slow_loader)
    (m,) = metrics(tmp_path / "slow")
    slept = STEPS * SLEEP
    # the sleeps are in the wait; the steps are not (they take most of the rest of the epoch)
    assert slept <= m["data_wait_seconds"] < slept + 0.5 * (m["train_seconds"] - slept), m
    assert m["data_wait_fraction"] == pytest.approx(m["data_wait_seconds"] / (m["train_seconds"] - m["warmup_seconds"]))
    assert s["data_wait_seconds"] == pytest.approx(m["data_wait_seconds"])
    assert s["data_wait_fraction"] == pytest.approx(m["data_wait_fraction"])
    assert m["data_wait_fraction"] > timing.WAIT_SHOWN  # else the line below would be right to stay quiet
    line = next(l for l in lines if l.startswith("epoch 1/1"))
    assert f"data wait {100 * m['data_wait_fraction']:.0f}%" in line and "data.backend=dali" in line
    # and TensorBoard has it, as every epoch metric
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "slow"))
    ea.Reload()
    assert {"epoch/data_wait_seconds", "epoch/data_wait_fraction"} <= set(ea.Tags()["scalars"])


def test_without_a_slow_loader_the_wait_is_small(small_store_dir, tmp_path):
    _, lines = fit_logged(tiny(train__epochs=1), out=tmp_path / "fast", data_dir=small_store_dir)
    (m,) = metrics(tmp_path / "fast")
    assert 0 < m["data_wait_seconds"] and m["data_wait_fraction"] < 0.3, m  # the torch backend on 32 px images
    line = next(l for l in lines if l.startswith("epoch 1/1"))
    assert ("data wait" in line) == (m["data_wait_fraction"] > timing.WAIT_SHOWN)


def test_hint_names_the_knob_for_each_backend():
    assert "data.backend=auto" in timing.wait_hint("tutorial", "cuda", True)
    assert "data.backend=torch" in timing.wait_hint("dali-gpu", "cuda", True)
    assert "data.backend=dali" in timing.wait_hint("torch", "cuda", True)
    assert "pip install" in timing.wait_hint("torch", "cpu", False)
    # DALI missing: how to get it, on a GPU too; installed: no install line
    assert "pip install" in timing.wait_hint("torch", "cuda", False)
    assert not any("pip install" in timing.wait_hint("torch", d, True) for d in ("cuda", "cpu"))
    assert all("aug." in timing.wait_hint(b, "cuda", True) for b in ("dali-gpu", "dali-cpu", "torch"))


def warm_first_step(seconds):
    """A setup(trainer): this process's first training step takes `seconds` longer (a compile)."""
    def setup(trainer):
        step = trainer.train_step

        def slow_first(*args):
            if trainer.progress.step == 0:
                time.sleep(seconds)
            return step(*args)

        trainer.train_step = slow_first

    return setup


def test_images_per_sec_is_steady_state_and_the_warm_up_is_apart(small_store_dir, tmp_path):
    """A first step that takes 1.5 s longer (a stand-in for torch.compile) is warmup_seconds, and
    stays out of img/s in metrics.jsonl, summary.json and the epoch line."""
    warm = 1.5
    s, lines = fit_logged(tiny(train__epochs=2), out=tmp_path / "run", data_dir=small_store_dir,
                          setup=warm_first_step(warm))
    first, second = metrics(tmp_path / "run")
    assert first["warmup_seconds"] >= warm and "warmup_seconds" not in second
    # the five steps after the warm-up one, over their own seconds (data wait included: it is throughput)
    steady = (STEPS - 1) * 50 / (first["train_seconds"] - first["warmup_seconds"])
    assert first["images_per_sec"] == pytest.approx(steady)
    assert first["images_per_sec"] > STEPS * 50 / first["train_seconds"]  # what counting the warm-up in gave
    assert second["images_per_sec"] == pytest.approx(STEPS * 50 / second["train_seconds"])
    assert s["train_images_per_sec"] == pytest.approx((first["images_per_sec"] + second["images_per_sec"]) / 2)
    assert s["warmup_seconds"] == first["warmup_seconds"]
    line = next(l for l in lines if l.startswith("epoch 1/2"))
    assert f"{first['images_per_sec']:,.0f} img/s (+{first['warmup_seconds']:.1f}s warm-up)" in line
    assert "warm-up" not in next(l for l in lines if l.startswith("epoch 2/2"))


def test_an_epoch_of_only_the_warm_up_step_has_no_speed(small_store_dir, tmp_path):
    """One step per epoch: the first epoch's only step is the warm-up, so its speed is unknown (None),
    not a compile-bound figure; the run's speed is the second epoch's."""
    s, lines = fit_logged(tiny(train__epochs=2, data__batch_size=300), out=tmp_path / "run", data_dir=small_store_dir)
    first, second = metrics(tmp_path / "run")
    assert first["images_per_sec"] is None and second["images_per_sec"] > 0
    assert s["train_images_per_sec"] == second["images_per_sec"]
    assert "img/s n/a (warm-up only)" in next(l for l in lines if l.startswith("epoch 1/2"))


def test_time_to_target_counts_training_without_warm_up(small_store_dir, tmp_path):
    run = tmp_path / "run"
    scores = fixed_scores([], [40.0, 50.0])

    def setup(trainer):
        scores(trainer)
        warm_first_step(0.3)(trainer)

    s = fit(tiny(train__epochs=2, train__target_acc=30.0), info(), out=run, data_dir=small_store_dir, setup=setup)
    ms = metrics(run)
    assert ms[0]["warmup_seconds"] >= 0.3 and "warmup_seconds" not in ms[1]
    assert (s["target_acc"], s["target_on"], s["epoch_to_target"]) == (30.0, "test", 1)
    assert s["seconds_to_target"] == pytest.approx(ms[0]["train_seconds"] - ms[0]["warmup_seconds"])
    assert s["wall_seconds_to_target"] == ms[0]["wall_seconds"] > s["seconds_to_target"] + ms[0]["warmup_seconds"]
    assert s["epochs_done"] == 2 and s["stop_reason"] == "completed"  # timing only: the run went on


def test_stop_at_target_ends_the_run_finished(small_store_dir, tmp_path):
    run = tmp_path / "run"
    s = fit(tiny(train__epochs=6, train__target_acc=30.0, train__stop_at_target=True, data__val_split=0.2), info(),
            out=run, data_dir=small_store_dir, setup=fixed_scores([20.0, 31.0, 45.0, 50, 50, 50], [90.0] * 6))
    # selection is on validation here, so the target is too (test passed 30% at once)
    assert (s["target_on"], s["epoch_to_target"], s["epochs_done"], s["finished"]) == ("val", 2, 2, True)
    assert "target_acc" in s["stop_reason"] and "epoch 2" in s["stop_reason"]
    assert json.loads((run / "summary.json").read_text()) == s and len(metrics(run)) == 2
    never = fit(tiny(train__epochs=1, train__target_acc=99.0, train__stop_at_target=True), info(),
                out=tmp_path / "never", data_dir=small_store_dir, setup=fixed_scores([], [10.0]))
    assert (never["epochs_done"], never["epoch_to_target"], never["stop_reason"]) == (1, None, "completed")


def test_a_resumed_run_reports_the_same_wait_and_target(small_store_dir, tmp_path):
    """Stopped mid-epoch 2 and resumed: the epoch's wait counts the slow batches of both processes,
    and the time to target is the one the stopped run reported."""
    run = tmp_path / "run"

    def setup(trainer):
        fixed_scores([], [10.0, 40.0])(trainer)
        trainer.train_loader = LoaderSpy(trainer.train_loader, stop_in_epoch_2)

    def stop_in_epoch_2(epoch, i, images, labels):
        time.sleep(SLEEP)
        if (epoch, i) == (1, 2):
            os.kill(os.getpid(), signal.SIGINT)

    recipe = tiny(train__target_acc=30.0, train__epochs=2)
    with pytest.raises(T.Interrupted):
        fit(recipe, info(), out=run, data_dir=small_store_dir, setup=setup)
    saved = checkpoint.load(run / "last.pt")["partial_time"]
    assert saved["data_wait_seconds"] >= 3 * SLEEP and saved["train_seconds"] > saved["data_wait_seconds"]

    def resume_setup(trainer):
        fixed_scores([], [40.0])(trainer)  # epoch 2
        slow_loader(trainer)

    s = fit(recipe, {}, data_dir=small_store_dir, resume=run, setup=resume_setup)
    ms = metrics(run)
    assert ms[1]["data_wait_seconds"] >= STEPS * SLEEP  # 3 slow batches before the stop, 3 after
    assert ms[1]["train_seconds"] >= saved["train_seconds"]
    assert s["epoch_to_target"] == 2 and s["finished"]
    assert s["seconds_to_target"] == pytest.approx(sum(m["train_seconds"] - m.get("warmup_seconds", 0) for m in ms[:2]))
    assert len(s["provenance"]["earlier"]) == 1  # the stopped process's provenance is kept


def test_stop_at_target_set_on_resume_stops_at_once(small_store_dir, tmp_path):
    run = tmp_path / "run"
    T.train(tiny(train__epochs=1), info(), out=run, data_dir=small_store_dir, **QUIET)
    first = json.loads((run / "summary.json").read_text())
    assert first["best_acc"] > 0
    target = first["best_acc"] / 2  # reached by epoch 1
    s = T.train(apply_overrides(tiny(train__epochs=5), [f"train.target_acc={target}", "train.stop_at_target=true"]),
                {}, data_dir=small_store_dir, resume=run, **QUIET)
    assert s["finished"] and s["epochs_done"] == 1 and "target_acc" in s["stop_reason"]


def test_target_fields_are_typed_validated_and_round_trip():
    r = apply_overrides(Recipe(), ["train.target_acc=75", "train.stop_at_target=true"])
    assert r.train.target_acc == 75.0 and isinstance(r.train.target_acc, float) and r.train.stop_at_target is True
    assert from_dict(json.loads(json.dumps(to_dict(r)))) == r
    with pytest.raises(BadInput, match="expects a float"):
        apply_overrides(Recipe(), ["train.target_acc=high"])
    for bad, field in [(["train.target_acc=101"], "train.target_acc"), (["train.target_acc=-1"], "train.target_acc"),
                       (["train.stop_at_target=true"], "train.stop_at_target")]:
        with pytest.raises(BadInput, match=field.replace(".", r"\.")):
            apply_overrides(Recipe(), bad).validate()


class FakeEvent:
    """torch.cuda.Event's timing API on the host clock, for EpochClock's bookkeeping on a CPU
    (the real events run on a GPU only: `fastcifar doctor`'s compile and resume checks train there)."""
    done = True  # what query() answers: whether the GPU has reached the event yet

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def query(self):
        return FakeEvent.done

    def synchronize(self):
        pass

    def elapsed_time(self, end):  # milliseconds, as CUDA's
        return 1000.0 * (end.t - self.t)


def test_cuda_event_pairs_are_read_only_when_done_and_all_at_the_end(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    clock = timing.EpochClock(torch.device("cpu"))
    clock.cuda = True  # the GPU path: an event pair around each wait for a batch

    def loader():
        for i in range(timing.DRAIN_EVERY + 6):
            time.sleep(0.002)
            yield i

    FakeEvent.done = False  # the GPU is behind: nothing may be read (and nothing waited for) mid-epoch
    assert list(clock.batches(loader())) == list(range(timing.DRAIN_EVERY + 6))
    assert clock.wait == 0.0 and len(clock._pending) == timing.DRAIN_EVERY + 6
    m = clock.metrics(train_seconds=10.0)  # the epoch's end: the trainer has synced, every pair is read
    # the events' milliseconds are seconds here: about 70 x 2 ms, within the 10 s epoch
    assert (timing.DRAIN_EVERY + 6) * 0.002 <= m["data_wait_seconds"] < 10.0 and clock._pending == []
    clock.start()
    FakeEvent.done = True  # the GPU keeps up: finished pairs are read as the epoch goes
    for _ in clock.batches(loader()):
        pass
    assert clock.wait > 0 and len(clock._pending) < timing.DRAIN_EVERY


def test_run_fields_by_hand():
    """summary.json's timing fields from a hand-made history: the wait share leaves warm-up out, the
    target is the first epoch at or above it (not the last, not strictly above), its seconds are the
    training seconds up to it without warm-up."""
    history = [{"epoch": 1, "train_seconds": 10.0, "warmup_seconds": 4.0, "data_wait_seconds": 1.0, "test_acc": 29.0,
                "val_acc": 31.0, "wall_seconds": 20.0},
               {"epoch": 2, "train_seconds": 6.0, "data_wait_seconds": 2.0, "test_acc": 30.0, "wall_seconds": 30.0},
               {"epoch": 3, "train_seconds": 6.0, "data_wait_seconds": 0.0, "test_acc": 35.0, "wall_seconds": 40.0}]
    s = timing.run_fields(history, 30.0, "test")
    assert s["data_wait_seconds"] == 3.0 and s["data_wait_fraction"] == pytest.approx(3.0 / 18.0)
    assert (s["target_acc"], s["target_on"], s["epoch_to_target"]) == (30.0, "test", 2)
    assert (s["seconds_to_target"], s["wall_seconds_to_target"]) == (12.0, 30.0)
    assert timing.run_fields(history, 30.0, "val")["epoch_to_target"] == 1  # the selection's accuracy counts
    assert timing.run_fields(history, 36.0, "test")["epoch_to_target"] is None
    assert "target_acc" not in timing.run_fields(history, 0.0, "test")  # no target: no target fields


def test_target_epoch_is_the_first_to_reach_a_set_target():
    history = [{"epoch": 1, "test_acc": 20.0}, {"epoch": 2, "test_acc": 31.0}, {"epoch": 3, "test_acc": 35.0}]
    assert timing.target_epoch(history, 0.0, "test") is None  # 0 = no target
    assert timing.target_epoch(history, 40.0, "test") is None
    assert timing.target_epoch(history, 30.0, "test") == 2
    assert timing.target_epoch(history, 30.0, "val") is None  # no val accuracy: the selection's own counts


def test_epoch_clock_carries_a_stopped_epoch_and_names_a_high_wait_once():
    """start(earlier) adds the stopped part's training, wait and warm-up to the epoch's; the share
    leaves warm-up out; note() is quiet at WAIT_SHOWN and gives the hint with the first line only."""
    clock = timing.EpochClock(torch.device("cpu"))
    clock.start({"train_seconds": 5.0, "data_wait_seconds": 1.0, "warmup_seconds": 1.0})
    m = clock.metrics(train_seconds=3.0)
    assert m == {"train_seconds": 8.0, "data_wait_seconds": 1.0, "data_wait_fraction": pytest.approx(1.0 / 7.0),
                 "warmup_seconds": 1.0}
    assert clock.note({"data_wait_fraction": timing.WAIT_SHOWN}, "torch") == ""
    first, second = clock.note({"data_wait_fraction": 0.2}, "torch"), clock.note({"data_wait_fraction": 0.3}, "torch")
    assert first.startswith("  data wait 20% (") and "data.backend=dali" in first
    assert second == "  data wait 30%"
