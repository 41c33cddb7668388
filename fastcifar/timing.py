"""Where a run's time goes: the data wait, the first step's warm-up, the steady-state speed, and
the time to a target accuracy.

`images_per_sec` leaves out the warm-up step (compile, cuDNN autotune, first allocations: its
seconds are `warmup_seconds`), or a short run's figure would be mostly compile. The data wait needs
no host sync per step: on a GPU, CUDA events on the training stream around `next(loader)` give the
GPU time between two steps (~0 when the loader keeps up), read when done (`query()`) and at the
epoch's end; on a CPU, the host time in `next(loader)`. Only rank 0's wait is reported.
"""

from __future__ import annotations

import time

import torch

from fastcifar.pipelines.loader import dali_available

WAIT_SHOWN = 0.05   # the epoch line names the data wait above this share of the training time
DRAIN_EVERY = 64    # CUDA event pairs kept before reading the finished ones


class EpochClock:
    """An epoch's training seconds, data wait and this process's first step's warm-up (one device
    sync); `saved()` / `start(earlier)` carry a stopped epoch over a resume."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.warmed = False   # this process's first step is behind us
        self.hinted = False   # the hint that comes with a high data wait was given
        self.start()

    def start(self, earlier: dict | None = None) -> None:
        """Begin an epoch; earlier = saved() of its first part, when it was stopped mid-way."""
        earlier = earlier or {}
        self.t0 = time.perf_counter()
        self.before = earlier.get("train_seconds", 0.0)
        self.wait = earlier.get("data_wait_seconds", 0.0)
        self.warmup = earlier.get("warmup_seconds", 0.0)
        self.own_warmup, self.warm_images = 0.0, 0  # this process's warm-up in this epoch, and its images
        self._pending: list[tuple] = []  # CUDA (start, end) event pairs not read yet

    def batches(self, loader):
        """Iterate loader, timing each wait for a batch (see the module docstring)."""
        it = iter(loader)
        while True:
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._pending.append((start, end))
                if len(self._pending) >= DRAIN_EVERY:
                    self._drain(block=False)
            else:
                self.wait += time.perf_counter() - t
            yield batch

    def _drain(self, block: bool) -> None:
        """Add the finished event pairs' GPU milliseconds to the wait (all of them when block)."""
        left = []
        for start, end in self._pending:
            if block or end.query():  # query() asks, it does not wait
                end.synchronize()  # at once when block is used: the trainer synced already
                self.wait += start.elapsed_time(end) / 1000.0
            else:
                left.append((start, end))
        self._pending = left

    def step(self, fn, *args, images: int):
        """fn(*args), the training step on `images` images; this process's first one timed as warm-up."""
        if self.warmed:
            return fn(*args)
        t = time.perf_counter()
        out = fn(*args)
        if self.cuda:
            torch.cuda.synchronize(self.device)  # once per process: the compile and autotune are done
        seconds = time.perf_counter() - t
        self.warmup += seconds
        self.own_warmup, self.warm_images, self.warmed = seconds, images, True
        return out

    def images_per_sec(self, train_seconds: float, images: int, world: int = 1) -> float | None:
        """Steady-state img/s of all `world` ranks from one's images and seconds (None: all warm-up)."""
        steady, seconds = images - self.warm_images, train_seconds - self.own_warmup
        return steady * world / seconds if steady > 0 and seconds > 0 else None

    def saved(self) -> dict:
        """The epoch's part so far, for last.pt when it stops mid-epoch."""
        self._drain(block=True)
        return {"train_seconds": self.before + time.perf_counter() - self.t0, "data_wait_seconds": self.wait,
                "warmup_seconds": self.warmup}

    def metrics(self, train_seconds: float) -> dict:
        """The epoch's metrics.jsonl fields, given this process's training seconds of it (synced)."""
        self._drain(block=True)
        total = self.before + train_seconds
        m = {"train_seconds": total, "data_wait_seconds": self.wait,
             "data_wait_fraction": self.wait / max(total - self.warmup, 1e-9)}
        if self.warmup:
            m["warmup_seconds"] = self.warmup
        return m

    def note(self, m: dict, backend: str) -> str:
        """'  data wait 23% (hint)' for the epoch line above WAIT_SHOWN (the hint once per run), else ''."""
        f = m.get("data_wait_fraction") or 0.0
        if f <= WAIT_SHOWN:
            return ""
        text = f"  data wait {100 * f:.0f}%"
        if not self.hinted:
            self.hinted = True
            text += f" ({wait_hint(backend, self.device.type, dali_available())})"
        return text


def wait_hint(backend: str, device_type: str, dali: bool) -> str:
    """Which knob to turn when the loop waits for data, for a loader backend on a device type."""
    lighter = ("lighter augmentation (lower aug.oneof_p, aug.ssr_p, aug.jitter_p, aug.erase_p; aug.policy=none "
               "drops TrivialAugment / RandAugment)")
    if backend == "tutorial":
        return ("the tutorial's per-image loader feeds this run; data.backend=auto makes the same kind of "
                "batches with DALI (or torch) instead")
    if backend == "dali-gpu":
        return (f"DALI's host stage (index batches from the split in RAM) or its GPU ops fall behind: try "
                f"data.backend=torch (the whole split on the GPU), or {lighter}")
    if backend == "dali-cpu":
        return (f"DALI runs on the CPU here, beside the model; at 32 px data.backend=torch is often faster "
                f"on a CPU, or {lighter}")
    where = ("the torch backend's augmentation runs on the training stream" if device_type == "cuda"
             else "the loader shares the CPU with the model")
    install = "" if dali else " (pip install nvidia-dali-cuda120)"
    return f"{where}; try data.backend=dali{install}, or {lighter}"


def run_fields(history: list[dict], target: float, selection: str) -> dict:
    """summary.json's data-wait, warm-up and time-to-target fields from the epochs' metrics."""
    def steady(epochs):  # training seconds without the warm-up (every process's first step)
        return sum(m["train_seconds"] - m.get("warmup_seconds", 0.0) for m in epochs)

    s = {}
    if history:
        wait = sum(m["data_wait_seconds"] for m in history)
        s.update(data_wait_seconds=wait, data_wait_fraction=wait / max(steady(history), 1e-9),
                 warmup_seconds=sum(m.get("warmup_seconds", 0.0) for m in history))
    if target > 0:
        reached = target_epoch(history, target, selection)
        upto = [m for m in history if reached is not None and m["epoch"] <= reached]
        s.update(target_acc=target, target_on=selection, epoch_to_target=reached,
                 seconds_to_target=steady(upto) if upto else None,
                 wall_seconds_to_target=upto[-1]["wall_seconds"] if upto else None)
    return s


def target_epoch(history: list[dict], target: float, selection: str) -> int | None:
    """The first epoch whose selection accuracy (val when held out, else test) reaches target > 0."""
    key = f"{selection}_acc"
    return next((m["epoch"] for m in history if target > 0 and m.get(key) is not None and m[key] >= target), None)
