"""Training: `train(recipe, info)` builds a `Trainer` (every part, once) and runs `fit()`: for each
epoch train_epoch() (the steps) and end_epoch() (evaluate, select, checkpoint, log); Ctrl-C/SIGTERM
saves and stops. `Progress` is the state resume restores besides the modules' state_dicts; `RunDir`
(checkpoint.py) writes the run's files. Host syncs (`.item()`, `.tolist()`) happen only at the marked
log and eval points, so on a GPU the Python loop runs ahead of the kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastcifar import checkpoint, provenance, runtime, timing
from fastcifar import dist as fdist
from fastcifar.averaging import EMA, TTA, pick_weights, predict
from fastcifar.checkpoint import RunDir
from fastcifar.config import Recipe, from_dict, to_dict
from fastcifar.data import check_outside_stores, check_replaceable, default_data_dir, open_store, prepare
from fastcifar.errors import BadInput, shown
from fastcifar.losses import Classify, Distill, MultiScale
from fastcifar.models import (SCALED_LOGITS, build_model, check_refs, init_from, load_weights, net_from_checkpoint,
                              num_classes, sync_batchnorm)
from fastcifar.optim import build_optimizer, build_scheduler, lr_factor
from fastcifar.pipelines.loader import make_loader
from fastcifar.pipelines.spec import mean_std
from fastcifar.report import duration
from fastcifar.signals import StopSignals

NONE_YET = 2 ** 62  # "no non-finite loss seen" in the device-side first-bad-step tracker


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: last.pt was saved; the CLI exits 130."""


class Diverged(Exception):
    """A NaN/inf loss: the run stopped, keeping the last good checkpoint; the CLI exits 1."""


def train(r: Recipe, info: dict, out: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, log=print, last: dict | None = None) -> dict:
    """Train recipe r (info: name, description, parent, source); returns summary.json's dict. resume: the
    run dir to continue (out defaults to it); last: its last.pt if read already (emptied once restored)."""
    with Trainer(r, info, out=out, data_dir=data_dir, resume=resume, log=log, last=last) as trainer:
        return trainer.fit()


@dataclasses.dataclass
class Progress:
    """Where a run is. Saved in every checkpoint beside the modules' states; resume restores it."""

    epoch: int = 0                      # epochs done
    batches_done: int = 0               # of the epoch in progress (a mid-epoch stop)
    step: int = 0                       # optimizer steps done
    best: dict = dataclasses.field(default_factory=lambda: {"score": -1.0, "epoch": 0})  # the selected epoch
    history: list = dataclasses.field(default_factory=list)  # one metrics dict per epoch done
    partial: torch.Tensor | None = None  # sums of the stopped epoch's batches so far (all ranks)
    partial_time: dict | None = None    # the stopped epoch's training and data-wait seconds so far
    provenance: list = dataclasses.field(default_factory=list)  # one provenance dict per process of the run
    elapsed: float = 0.0                # wall seconds of this run's earlier processes
    started: float = dataclasses.field(default_factory=time.perf_counter)  # this process's clock start

    def wall_seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.batches_done, "step": self.step, "best": self.best,
                "history": self.history, "partial": self.partial, "wall_seconds": self.wall_seconds(),
                "partial_time": self.partial_time, "provenance": self.provenance}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.batches_done, self.step = d["epoch"], d["step_in_epoch"], d["step"]
        self.best, self.history, self.elapsed = d["best"], d["history"], d["wall_seconds"]
        self.partial = d["partial"] if self.batches_done else None
        self.partial_time = d["partial_time"] if self.batches_done else None
        self.provenance = list(d["provenance"])


class Trainer(contextlib.ExitStack):
    """One run of a recipe, built once; `fit()` trains it. An ExitStack: leaving it restores the
    backend flags, leaves the process group and unlocks the run directory."""

    def __init__(self, r: Recipe, info: dict, out=None, data_dir=None, resume=None, log=print, last=None):
        r.validate()
        # --resume RUN continues RUN in its own directory; with --out NEW, in NEW (new or empty), RUN only read
        self.in_place = resume is not None and (out is None or Path(out).resolve() == Path(resume).resolve())
        self.default_out = out is None and resume is None
        self.out = Path(out if out is not None else resume if resume is not None else new_run_dir(info["name"]))
        check_out(self.out, resumed=self.in_place)
        self.r, self.info, self.log = r, dict(info), log
        self.run, self.early = None, []  # the run's files; the lines said before its train.log opens
        super().__init__()
        too_big = (lambda e: BadInput(  # the model itself does not fit (e.g. a huge head.embed_dim)
            f"Building {info.get('name', 'the run')} ran out of memory on {self.device_name()} ({runtime.memory_error(e)}); "
            f"check model.name and head.embed_dim (now {r.head.embed_dim}), or use a smaller model."))
        try:
            with runtime.out_of_memory_as(too_big):
                self._build(data_dir, resume, last)
        except BaseException:
            self.close()
            raise
        self.run = RunDir(self.out, self.summary, writes=self.main)
        self.stop = StopSignals(self.say)

    def _build(self, data_dir, resume, ck) -> None:
        """The run's parts, each from the ones before: place, lock, checks, data, model, state, nets."""
        self._place()
        if self.main:
            self._claim(self.in_place)
        check_refs(self.r.model, resume is not None)  # what takes a moment to check, before the data set's download
        if self.r.distill.teacher:
            teacher_path(self.r)
        if resume is not None:  # checked before anything is written; the run continues on its own store
            ck = last_checkpoint(resume) if ck is None else ck
            check_resume(self.r, ck, resume)
            if self.in_place and self.main:
                checkpoint.check_own_run(self.out, f"Continuing the run here would replace {{it}}. To continue a run "
                                         f"copied from elsewhere, continue it into a new directory, which reads "
                                         f"{self.out} and writes nothing there: `fastcifar train --resume {self.out} "
                                         f"--out NEW_DIR`.")
            data_dir = ck["store"]["dir"] if data_dir is None else data_dir
        self._data(data_dir, ck, resume)
        self._model(ck)
        # everything that decides the next step comes from last.pt
        self.progress = Progress()
        if ck is not None:
            self.load_state_dict(ck, Path(resume) / "last.pt")
            ck.clear()  # the caller's reference too: a run does not keep a second copy of its state in memory
            p = self.progress
            self.say(f"Resuming {resume} at epoch {p.epoch + 1}" + (f", batch {p.batches_done + 1}" if p.batches_done
                                                                     else "") + "." + self.extension_note())
        self._nets()

    def _place(self) -> None:
        """Device and ranks (a process per GPU; data.batch_size is global), precision, flags, seeds."""
        r, rt = self.r, self.r.train
        self.device, self.rank, self.world = self.enter_context(runtime.distributed(rt.device))
        self.main = self.rank == 0
        self.say = self._say if self.main else (lambda *a, **k: None)
        if r.data.batch_size % self.world:
            raise BadInput(f"data.batch_size = {r.data.batch_size} is the global batch and must divide evenly "
                           f"over the {self.world} ranks; pick a multiple of {self.world}.")
        self.per_rank_batch = r.data.batch_size // self.world
        self.amp, self.amp_reason = runtime.resolve_amp(self.device, rt.amp)
        self.aug = fed_aug(r.aug, self.amp)
        self.dtype_note = (f"aug.dtype = {r.aug.dtype} read as float32: the step runs in fp32 here"
                           if self.aug is not r.aug else None)
        self.autotune_note = runtime.autotune_note(r.loss.scales) if self.device.type == "cuda" else None
        self.enter_context(runtime.backend_settings(rt.deterministic, rt.tf32, autotune=not r.loss.scales))
        random.seed(rt.seed)
        torch.manual_seed(rt.seed)  # model init: the same on every rank (DDP also broadcasts rank 0's)

    def _say(self, msg: str) -> None:
        """A line for the user, also kept in the run's train.log (lines said before it opens wait)."""
        self.log(msg)
        if self.run is not None and self.run.logging:
            self.run.note(msg)
        else:
            self.early.append(msg)

    def _claim(self, resumed: bool) -> None:
        """Lock the run directory until the run ends (one writer); a default one that a run started in the
        same second took meanwhile (`fastcifar train ... &` thrice) gives way to the next free name."""
        for last in (False, False, True):
            try:
                return self.enter_context(checkpoint.claimed(self.out, lambda: check_out(self.out, resumed)))
            except BadInput:
                if last or not (self.default_out and self.out.exists()):
                    raise
                self.out = new_run_dir(self.info["name"])

    def _data(self, data_dir, ck, resume) -> None:
        """The store, a loader per split (train/val/test rows), and the KD teacher (its input size)."""
        r, rt = self.r, self.r.train
        self.store = (open_store(data_dir, r.data.dataset) if ck is not None
                      else open_or_prepare(data_dir, fdist.local_rank() == 0, r.data.dataset))
        if ck is not None:
            check_same_store(self.store, ck["store"], resume)
        self.num_classes = len(self.store.class_names)
        self.teacher, teacher_recipe = (load_teacher(r, self.device, self.store) if r.distill.teacher
                                        else (None, None))
        train_rows, val_rows, test_rows = split_rows(len(self.store.labels("train")), len(self.store.labels("test")), r.data)
        common = dict(spec=self.aug, batch_size=self.per_rank_batch, backend=r.data.backend, device=self.device,
                      seed=rt.seed, shard=(self.rank, self.world))
        # distillation: the student's and the teacher's view; multi-scale training: one view per scale
        sizes = ((r.aug.image_size, teacher_recipe.aug.image_size) if self.teacher is not None
                 else tuple(r.loss.scales) or None)
        self.train_loader = make_loader(self.store, "train", shuffle=r.data.shuffle, drop_last=r.data.drop_last,
                                        indices=train_rows, augment=True, sizes=sizes, **common)
        self.test_loader = make_loader(self.store, "test", indices=test_rows, augment=False, **common)
        self.val_loader = (make_loader(self.store, "train", indices=val_rows, augment=False, **common)
                           if val_rows is not None else None)
        self.selection = "val" if val_rows is not None else "test"  # the split best.pt's epoch is chosen on

    def _model(self, ck) -> None:
        """Model, EMA, optimizer, LR schedule (over schedule_epochs, kept on resume), GradScaler, mixing."""
        r, rt = self.r, self.r.train
        self.model = build_model(r.model, r.head, self.num_classes).to(
            self.device, memory_format=runtime.memory_format(r.model.channels_last))
        if r.model.init_from and ck is None:  # a resumed run's weights come from its last.pt
            init_from(self.model, r.model.init_from, log=self.say)
        if r.model.sync_bn and self.world > 1:  # before DDP wraps it; alone there is nothing to sync
            self.model = sync_batchnorm(self.model, self.device)
        self.ema = EMA(self.model, rt.ema_decay, rt.ema_every, rt.ema_warmup) if rt.ema_decay > 0 else None
        self.optimizer = build_optimizer(self.model, r.optim, r.data.batch_size)
        self.schedule_epochs = ck["schedule_epochs"] if ck is not None else rt.epochs
        self.scheduler = build_scheduler(self.optimizer, self.schedule_epochs * len(self.train_loader), r.schedule)
        # fp16 overflows without loss scaling; bf16 has fp32's range and needs none (disabled = pass-through)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.autocast = runtime.autocast(self.device, self.amp)
        self.mix_gen = torch.Generator(device="cpu")
        self.mix = lambda images, labels: (images, labels)  # no mixing: the hard labels are the targets
        if r.aug.mixup_alpha > 0 or r.aug.cutmix_alpha > 0:  # MixUp/CutMix on the device: soft targets
            from fastcifar.pipelines.mix import mix
            self.mix = functools.partial(mix, spec=r.aug, num_classes=self.num_classes, generator=self.mix_gen)

    def _nets(self) -> None:
        """The nets (DDP-wrapped, then compiled), the objective chosen once, the device-side counters."""
        r, rt = self.r, self.r.train
        self.net = self.eval_net = self.model  # self.model keeps the plain state_dict keys checkpoints hold
        self.ema_net = self.ema.module if self.ema is not None else None
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.compiled, self.compile_note = runtime.compile_choice(rt.compile, self.device, r.model.sync_bn and self.world > 1)
        if self.compiled:
            # the DDP module is compiled, so the graph overlaps DDP's all-reduce with backward. Static
            # shapes: a smaller batch gets a graph of its own (evaluation pads its last batch). Multi-scale
            # training brings new sub-batch sizes every step: one dynamic graph (torch's automatic
            # dynamic) beats a recompile per size until torch gives up and runs eager
            self.net = torch.compile(self.net, dynamic=None if r.loss.scales else False)
            self.eval_net = self.net if self.world == 1 else torch.compile(self.model, dynamic=False)
            if self.ema is not None:
                self.ema_net = torch.compile(self.ema.module, dynamic=False)
            if self.teacher is not None:
                self.teacher = torch.compile(self.teacher, dynamic=False)
        ls, d = r.loss.label_smoothing, r.distill
        if self.teacher is not None:
            self.objective = Distill(self.net, self.teacher, self.autocast, d.alpha, d.temperature, ls,
                                     d.teacher_margin, d.teacher_bn)
        elif r.loss.scales:  # the scale of each image: drawn from (seed, step, rank), so resume draws the same
            self.objective = MultiScale(self.net, self.autocast, rt.seed, self.rank, lambda: self.progress.step, ls)
        else:
            self.objective = Classify(self.net, self.autocast, ls)
        self.bad_step = torch.full((), NONE_YET, dtype=torch.int64, device=self.device)  # first step with a NaN/inf loss
        self.step_t = torch.full((), self.progress.step, dtype=torch.int64, device=self.device)  # the step, on the device
        # the LR of the last step taken, which the epoch line logs: a resumed optimizer holds the next
        # step's (a run stopped after an epoch's last batch resumes into that epoch with no step to take)
        step = self.progress.step
        self.lr = (self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](step - 1) if step
                   else self.optimizer.param_groups[0]["lr"])
        self.clock = timing.EpochClock(self.device)  # data wait and warm-up per epoch (fastcifar/timing.py)
        if self.main:
            self.progress.provenance.append({**provenance.collect(self.device, self.world, self.store), "amp": self.amp})

    # ---- The loop

    def fit(self) -> dict:
        """Train epochs progress.epoch+1 .. train.epochs; returns summary.json's dict."""
        info = self.info
        recipe = {"name": info["name"], "description": info.get("description", ""),
                  **({"parent": info["parent"]} if info.get("parent") else {}), **to_dict(self.r)}
        with self.stop, self.run.open(recipe, info.get("source"), self.progress.history, self.early):
            self.say(self.banner())
            self.progress.started = time.perf_counter()  # wall_seconds continues across resumes
            with runtime.out_of_memory_as(self.out_of_memory):
                for epoch in range(self.progress.epoch, self.r.train.epochs):
                    if self.reached_target():
                        break
                    stats = self.train_epoch(epoch, self.progress.batches_done)
                    self.end_epoch(epoch, stats)
                    if fdist.any_rank(self.stop.requested, self.device):
                        self.interrupt(f"Interrupted after epoch {epoch + 1}")
            rt = self.r.train
            epoch = timing.target_epoch(self.progress.history, rt.target_acc, self.selection)
            result = self.run.finish(f"reached train.target_acc = {rt.target_acc:g}% ({self.selection}) at epoch "
                                     f"{epoch}" if self.reached_target() else "completed")
            self.say(f"Done: best test top-1 {result['best_acc']:.2f}% at epoch {result['best_epoch']}"
                     + (f" (selected on val: {result['best_val_acc']:.2f}%)" if result["selection"] == "val" else "")
                     + f", final {result['final_acc']:.2f}%, {duration(result['wall_seconds'])}"
                     + (f"; {result['target_acc']:g}% reached at epoch {result['epoch_to_target']} after "
                        f"{duration(result['seconds_to_target'])} of training" if result.get("epoch_to_target") else "")
                     + f". Run: {self.out}")
            return result

    def train_epoch(self, epoch: int, start_batch: int = 0) -> dict:
        """Train one epoch from batch start_batch (a resumed epoch: its earlier batches' sums come from
        last.pt). Returns {sums: this rank's device-side (loss x images, correct, images), images, t0}."""
        p, rt, world = self.progress, self.r.train, self.world
        self.net.train()
        self.train_loader.set_epoch(epoch, start_batch=start_batch)
        if not start_batch:  # a resumed epoch continues the mixing draws restored from last.pt
            self.mix_gen.manual_seed(rt.seed * 100_003 + epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        if p.partial is not None and self.main:
            sums += p.partial.to(self.device)
        p.partial = None
        per_step = self.per_rank_batch * world  # images
        bar = tqdm(total=len(self.train_loader) * per_step, initial=start_batch * per_step,
                   unit="img", unit_scale=True, desc=f"epoch {epoch + 1}/{rt.epochs}", leave=False, mininterval=1.0,
                   disable=None if self.main else True)  # None: on a terminal only (a log file gets the epoch lines)
        t0, images_trained = time.perf_counter(), 0
        self.clock.start(p.partial_time)
        p.partial_time = None
        for i, (images, labels) in enumerate(self.clock.batches(self.train_loader), start=start_batch):
            images, targets = self.mix(images, labels)
            if p.step == 0 and self.main:
                self.run.image("train/augmented_batch", image_grid(images, self.r.aug, self.store))
            parts = self.clock.step(self.train_step, images, labels, targets, images=labels.shape[0])
            # running sums stay on the device: no host sync here
            n = labels.shape[0]
            loss = parts["loss"].detach()
            sums[0] += loss.double() * n
            sums[1] += (parts["logits"].detach().argmax(1) == labels).sum()
            sums[2] += n
            self.bad_step = torch.where(torch.isfinite(loss), self.bad_step, torch.minimum(self.bad_step, self.step_t))
            images_trained += n
            bar.update(n * world)
            at_log = p.step % rt.log_every == 0 or i == len(self.train_loader) - 1
            if at_log:
                self.log_point(epoch, sums, bar)
            if (at_log or world == 1) and fdist.any_rank(self.stop.requested, self.device):
                p.batches_done, p.partial = i + 1, fdist.all_reduce(sums.clone()).cpu()
                p.partial_time = self.clock.saved()
                self.run.checkpoint(self.state_dict(), best=False)
                self.interrupt(f"Interrupted at epoch {epoch + 1}, step {p.step}")
        bar.close()
        return {"sums": sums, "images": images_trained, "t0": t0}

    def train_step(self, images, labels: torch.Tensor, targets: torch.Tensor) -> dict:
        """One optimizer step on a batch; returns the objective's parts (loss, its terms, logits)."""
        parts = self.objective(images, labels, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts["loss"]).backward()
        if self.r.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.r.optim.grad_clip)
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.progress.step += 1
        self.step_t += 1
        if self.ema is not None:
            self.ema.update(self.progress.step)
        return parts

    def log_point(self, epoch: int, sums: torch.Tensor, bar) -> None:
        """Log point (a host sync, an all-reduce): stop on a NaN/inf loss, show the running loss."""
        p = self.progress
        first_bad = int(fdist.all_reduce(self.bad_step.clone(), torch.distributed.ReduceOp.MIN).item())
        if first_bad != NONE_YET:
            steps = len(self.train_loader)
            reason = (f"non-finite loss (NaN or inf) at step {first_bad} (epoch {epoch + 1}, batch "
                      f"{first_bad - epoch * steps}); stopped at step {p.step}")
            kept = f"last.pt holds epoch {len(p.history)}" if p.history else "no checkpoint was written"
            self.run.stop(reason)
            raise Diverged(f"{self.info['name']}: {reason}. {kept} (the last good one); lower optim.lr, add "
                           f"optim.grad_clip" + (", or use train.amp=bf16 (on a GPU with bf16) or none instead of fp16"
                                                 if self.amp == "fp16" else "") + ".")
        loss_now = (sums[0] / sums[2].clamp(min=1)).item()
        bar.set_postfix(loss=f"{loss_now:.3f}", lr=f"{self.lr:.2e}", refresh=False)
        self.run.scalars(p.step, {"train/loss_running": loss_now, "train/lr": self.lr})

    def end_epoch(self, epoch: int, stats: dict) -> dict:
        """All-reduce the epoch's sums, evaluate, select, checkpoint, log (host syncs); returns metrics."""
        p = self.progress
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - stats["t0"]
        loss_sum, correct, seen = fdist.all_reduce(stats["sums"]).tolist()
        m = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen}
        for w in ("", "_ema") if self.ema is not None else ("",):  # the raw, then the EMA weights
            for split, loader in (("test", self.test_loader), ("val", self.val_loader)):
                if loader is not None:
                    e = self.evaluate(loader, ema=True) if w else self.evaluate(loader)
                    m.update({f"{split}_{k}{w}": e[k] for k in ("acc", "top5", "loss")})
        m.update(lr=self.lr, images_per_sec=self.clock.images_per_sec(train_seconds, stats["images"], self.world),
                 epoch_seconds=time.perf_counter() - stats["t0"], wall_seconds=p.wall_seconds())
        m.update(self.clock.metrics(train_seconds))
        saved = (p.epoch, p.batches_done, p.best, len(p.history))  # what the files hold until this epoch's are written

        def undo():
            p.epoch, p.batches_done, p.best = saved[:3]
            del p.history[saved[3]:]

        p.history.append(m)
        w = "_ema" if self.r.train.select_on == "ema" else ""  # best.pt's epoch: on the raw or the EMA weights
        score = m[f"{self.selection}_acc{w}"]
        improved = score > p.best["score"]
        if improved:
            p.best = {"score": score, "epoch": epoch + 1, "test_acc": m[f"test_acc{w}"], "test_top5": m[f"test_top5{w}"],
                      **({"val_acc": m[f"val_acc{w}"]} if self.val_loader is not None else {})}
        p.epoch, p.batches_done = epoch + 1, 0
        self.run.checkpoint(self.state_dict(), best=improved, undo=undo)  # first: the log never names an epoch without one
        self.run.epoch(m)
        left = (self.r.train.epochs - epoch - 1) * (m["wall_seconds"] / max(1, len(p.history)))
        self.say(f"epoch {epoch + 1}/{self.r.train.epochs}  train loss {m['train_loss']:.3f} acc {m['train_acc']:.2f}%  "
                 + (f"val {m['val_acc']:.2f}%  " if self.val_loader is not None else "")
                 + f"test {m['test_acc']:.2f}% (top-5 {m['test_top5']:.2f}%)  "
                 + (f"EMA {m['test_acc_ema']:.2f}%  " if self.ema is not None else "") + f"lr {self.lr:.2e}  "
                 + speed(m) + f"  {m['epoch_seconds']:.1f}s  ETA {duration(left)}"
                 + self.clock.note(m, self.train_loader.backend))
        return m

    def evaluate(self, loader, ema: bool = False) -> dict:
        """evaluate() of the raw weights, or of the EMA's, with the recipe's test-time augmentation."""
        return evaluate(self.ema_net if ema else self.eval_net, loader, self.autocast, self.r.train.tta)

    def extension_note(self) -> str:
        """What a resume past the schedule's horizon trains at (" " + a sentence), or ''."""
        rt, p = self.r.train, self.progress
        if rt.epochs <= self.schedule_epochs:
            return ""
        steps = self.schedule_epochs * len(self.train_loader)
        lr = self.optimizer.param_groups[0]["initial_lr"] * lr_factor(steps, steps, self.r.schedule)
        first = max(p.epoch, self.schedule_epochs) + 1
        extra = f"epoch {first}" if first == rt.epochs else f"epochs {first}-{rt.epochs}"
        n = self.schedule_epochs
        return (f" The LR schedule keeps the {n} epoch{'s' * (n != 1)} it was built for; {extra} "
                f"{'trains' if first == rt.epochs else 'train'} at its final LR {lr:.3g}.")

    def reached_target(self) -> bool:
        """Whether train.stop_at_target ends the run here: an epoch has reached train.target_acc."""
        rt = self.r.train
        return rt.stop_at_target and timing.target_epoch(self.progress.history, rt.target_acc,
                                                         self.selection) is not None

    def out_of_memory(self, e: RuntimeError) -> BadInput:
        """The error for a batch the device cannot hold (summary.json says so; last.pt: the last epoch)."""
        p, r = self.progress, self.r
        self.run.stop("out of device memory")
        kept = f"last.pt holds epoch {len(p.history)}" if p.history else "no checkpoint was written"
        return BadInput(f"{self.info['name']} ran out of memory on {self.device_name()} in epoch {p.epoch + 1} "
                        f"({runtime.memory_error(e)}); {kept}. Lower data.batch_size (now {r.data.batch_size}) or "
                        f"aug.image_size (now {r.aug.image_size}), "
                        + ("use train.amp=auto (half-precision activations), " if self.amp == "none" and self.device.type == "cuda" else "")
                        + "or pick a smaller model.")

    def interrupt(self, where: str):
        """Stop on Ctrl-C/SIGTERM once last.pt is saved; other ranks wait for it (torchrun kills none)."""
        self.run.stop("interrupted")
        fdist.barrier()
        raise Interrupted(f"{where}: saved {self.out / 'last.pt'}; continue with `fastcifar train --resume {self.out}`.")

    # ---- State and reports

    def state_dict(self) -> dict:
        """What last.pt and best.pt hold: the modules' states, the RNGs, the Progress and the recipe."""
        mean, std = mean_std(self.r.aug, self.store)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": checkpoint.rng_state(self.device), "mix_rng": self.mix_gen.get_state(),
                "amp": self.amp, "schedule_epochs": self.schedule_epochs,
                "recipe": to_dict(self.r), "info": self.info, "world_size": self.world,
                # the store trained on: where it was and its arrays' checksums (resume checks them)
                "store": {"dir": str(self.store.dir.resolve()), "synthetic": self.store.synthetic,
                          "sha256": self.store.recorded_sha256},
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                # what the model means outside fastcifar (export, predict): its classes and its input
                # (size, resize filter, mean/std in 0..1 units)
                "class_names": self.store.class_names, "preprocess": {
                    "image_size": self.r.aug.image_size, "interpolation": self.r.aug.interpolation,
                    "mean": list(mean), "std": list(std)}, **self.progress.state_dict()}

    def load_state_dict(self, ck: dict, path) -> None:
        load_weights(self.model, ck["model"], path)
        if self.ema is not None:
            if not isinstance(ck.get("ema"), dict):
                raise BadInput(f"The checkpoint {path} holds no EMA weights although its recipe keeps them "
                               f"(train.ema_decay = {self.r.train.ema_decay}); it is damaged.")
            load_weights(self.ema.module, ck["ema"], path)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if ck["amp"] != self.amp:
            self.say(f"This run trained in {ck['amp']} and continues in {self.amp} ({self.amp_reason}).")
        if ck["scaler"] or not self.scaler.is_enabled():  # a disabled scaler saved {}: fp16 starts a fresh one
            self.scaler.load_state_dict(ck["scaler"])
        checkpoint.set_rng_state(ck["rng"], self.rank, self.world, self.device)
        self.mix_gen.set_state(ck["mix_rng"])
        self.progress.load_state_dict(ck)
        self.info = {**ck["info"], **{k: v for k, v in self.info.items() if v}}

    def device_name(self) -> str:
        return f"{self.device} ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "cpu"

    def banner(self) -> str:
        """The run's first line, and a line for each choice made for this machine that the recipe did not spell out."""
        r, precision = self.r, "fp32" if self.amp == "none" else self.amp
        # the precision's reason when the recipe left it to the machine (auto) or it runs slowly here
        amp_note = f"amp {precision} ({self.amp_reason})" if self.amp_reason != f"train.amp = {self.amp}" else None
        line = (f"Training {self.info['name']} on {self.device_name()}" + (f" x {self.world} ranks" if self.world > 1 else "")
                + f": {r.train.epochs} epochs x {len(self.train_loader)} steps of {r.data.batch_size} images"
                + f" ({self.train_loader.backend} loader, {r.aug.image_size}px, amp {precision}, "
                + f"compile {'on' if self.compiled else 'off'})"
                + (" on a SYNTHETIC store" if self.store.synthetic else "") + f" -> {self.out}")
        notes = (amp_note, self.compile_note, self.autotune_note, self.dtype_note)
        return "\n".join([line] + [f"  {note}." for note in notes if note])

    def summary(self, finished: bool, reason: str) -> dict:
        """summary.json's dict (RunDir writes it)."""
        p, history = self.progress, self.progress.history
        last = history[-1] if history else {}
        rates = [m["images_per_sec"] for m in history if m.get("images_per_sec") is not None]
        s = {"recipe": self.info["name"], "description": self.info.get("description", ""),
             "best_acc": p.best.get("test_acc"), "best_epoch": p.best["epoch"] or None,
             "final_acc": last.get("test_acc"), "final_top5": last.get("test_top5"),
             "epochs_done": len(history), "epochs": self.r.train.epochs,
             "train_images_per_sec": float(np.mean(rates)) if rates else None,  # the epochs' steady state
             "wall_seconds": p.wall_seconds(), "device": self.device_name(),
             "backend": self.train_loader.backend, "world_size": self.world, "synthetic": self.store.synthetic,
             "selection": self.selection, "model": self.r.model.name, "image_size": self.r.aug.image_size,
             "amp": self.amp, "finished": finished, "stop_reason": reason,
             # which weights best_acc is, and how they were evaluated
             "select_on": self.r.train.select_on, "tta": self.r.train.tta,
             **({"final_acc_ema": last.get("test_acc_ema")} if self.ema is not None else {})}
        if self.selection == "val":
            s.update(best_val_acc=p.best.get("val_acc"), best_val_epoch=p.best["epoch"] or None,
                     test_acc_at_best_val=p.best.get("test_acc"))
        s.update(timing.run_fields(history, self.r.train.target_acc, self.selection))
        s["provenance"] = provenance.for_summary(p.provenance)
        return s


def speed(m: dict) -> str:
    """The epoch line's speed: steady-state img/s, and the warm-up seconds apart when the epoch had one."""
    rate = f"{m['images_per_sec']:,.0f} img/s" if m.get("images_per_sec") is not None else "img/s n/a (warm-up only)"
    return rate + (f" (+{m['warmup_seconds']:.1f}s warm-up)" if m.get("warmup_seconds") else "")


def fed_aug(aug, amp: str):
    """The loaders' augmentation spec: aug, with float32 images where the step runs in fp32 (resolved
    amp none: an fp32 layer refuses bf16/fp16 input; reduced-precision images are for autocast)."""
    return dataclasses.replace(aug, dtype="float32") if amp == "none" and aug.dtype != "float32" else aug


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, autocast=None, tta: str = "none") -> dict:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of model over a loader, summed over ranks,
    with test-time augmentation `tta` (views made on the device); margin heads give evaluation logits."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    loader.set_epoch(0)
    for images, labels in loader:
        n = labels.shape[0]
        if n < loader.batch_size:  # the last batch, padded (its last image repeated, memory format kept):
            # a compiled net sees one static shape
            images = images[torch.arange(loader.batch_size, device=images.device).clamp(max=n - 1)]
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = predict(model, images, tta)[:n]
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (top5[:, 0] == labels).sum()
        sums[2] += (top5 == labels[:, None]).any(1).sum()
        sums[3] += labels.shape[0]
    fdist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()  # eval point: host sync
    model.train(was_training)
    n = max(n, 1)
    return {"acc": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "images": int(n)}


def evaluate_checkpoint(ref: str, data_dir=None, backend: str | None = None, batch_size: int = 500,
                        device: str = "auto", tta: str | None = None, weights: str = "auto") -> dict:
    """Test top-1/top-5/loss of a checkpoint (file or run dir) on the whole test split, of its EMA
    weights when it has them (`weights`: auto | raw | ema), with `tta` (default: its recipe's)."""
    path = checkpoint.resolve(ref, prefer="best.pt")
    ck, weights = pick_weights(checkpoint.load(path), weights)
    dev = runtime.command_device(device)
    if batch_size < 1:
        raise BadInput(f"--batch-size {batch_size}: must be at least 1.")
    if tta is not None and tta not in TTA:
        raise BadInput(f"--tta {shown(tta)}: use one of {', '.join(TTA)} (none = the images as they are).")
    store = open_store(data_dir, from_dict(ck["recipe"]).data.dataset)  # its data set's default dir, and no other
    check_classes(ck, store, path)
    model, r = net_from_checkpoint(ck, path, dev)
    amp, amp_reason = runtime.resolve_amp(dev, r.train.amp)
    loader = make_loader(store, "test", fed_aug(r.aug, amp), batch_size, backend=backend or r.data.backend, device=dev,
                         seed=r.train.seed, augment=False)
    tta = r.train.tta if tta is None else tta
    too_big = (lambda e: BadInput(f"Evaluating {path} ran out of memory on {dev} ({runtime.memory_error(e)}); lower "
                                  f"--batch-size (now {batch_size})" + (", or use --device cpu." if dev.type == "cuda" else ".")))
    with runtime.out_of_memory_as(too_big):
        res = evaluate(model, loader, runtime.autocast(dev, amp), tta)
    return {**res, "checkpoint": str(path), "recipe": ck.get("info", {}).get("name", "?"), "epoch": ck["epoch"],
            "synthetic": store.synthetic, "weights": weights, "tta": tta, "amp": amp, "amp_reason": amp_reason}


# What --resume may change: only what cannot change the run's meaning - how long it trains, how it
# logs, where it runs and at which precision (a run moved to another machine), which loader backend
# makes the (same) batches, how SyncBN gathers the global batch's statistics (as the number of ranks)
RESUMABLE = ("train.epochs", "train.log_every", "train.device", "train.amp", "train.compile", "data.backend",
             "train.target_acc", "train.stop_at_target", "model.sync_bn")


def last_checkpoint(run_dir) -> dict:
    """The last.pt that --resume run_dir continues from."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise BadInput(f"--resume {run_dir}: there is no {path} to continue from (a run writes last.pt at the end of "
                       f"its first epoch, or when stopped); start it again without --resume.")
    return checkpoint.load(path, need="resume")


def check_resume(r: Recipe, ck: dict, run_dir) -> None:
    """BadInput unless r continues the checkpoint's run: only RESUMABLE fields changed, no fewer epochs."""
    was, now = to_dict(from_dict(ck["recipe"])), to_dict(r)
    changed = [f"{s}.{k} ({shown(was[s][k])} -> {shown(v)})" for s, fields in now.items() for k, v in fields.items()
               if v != was[s][k] and f"{s}.{k}" not in RESUMABLE]
    if changed:
        raise BadInput(f"--resume {run_dir} would change {', '.join(changed)}: that is a different run. On resume "
                       f"only {', '.join(RESUMABLE)} may change; for anything else start a new run.")
    if r.train.epochs < ck["epoch"]:
        raise BadInput(f"train.epochs = {r.train.epochs}, but {run_dir} has already trained {ck['epoch']} epochs; "
                       f"resume with train.epochs >= {ck['epoch']} (unset, it keeps {was['train']['epochs']}).")
    horizon = ck["schedule_epochs"]  # the epochs the LR schedule was built for, which --resume keeps
    if r.train.epochs > horizon and lr_factor(1 << 40, 1 << 40, r.schedule) == 0:  # the factor from the end on
        raise BadInput(f"train.epochs = {r.train.epochs}: {run_dir}'s LR schedule ({r.schedule.kind}, final_lr = "
                       f"{r.schedule.final_lr:g}) ends at LR 0 after {horizon} epoch{'s' * (horizon != 1)}, and a "
                       f"resume keeps it (the LR would jump otherwise), so more epochs would train nothing. Start a "
                       f"new run instead, or fine-tune from its weights: `fastcifar train RECIPE --set "
                       f"model.init_from={run_dir} --set train.epochs=N`.")


def check_same_store(store, recorded: dict, run_dir) -> None:
    """Raise BadInput unless the store holds exactly the arrays the run trained on: what its
    meta.json records, and then what is on disk (an array changed in place leaves meta.json as it was)."""
    want = recorded["sha256"]
    if store.recorded_sha256 != want:
        raise BadInput(f"--resume {run_dir} trained on the store at {recorded['dir']}, but the store at {store.dir} "
                       f"holds other data (its arrays' sha256 differ). Resume without --data-dir (the run's own "
                       f"store), or rebuild that store from the same source.")
    try:
        changed = [name for name, sha in store.sha256().items() if sha != want.get(name)]
    except OSError as e:
        raise BadInput(f"--resume {run_dir}: cannot read the store at {store.dir} to check it ({e.strerror or e}).")
    if changed:
        raise BadInput(f"--resume {run_dir}: the store at {store.dir} no longer holds the data the run trained on: "
                       f"{', '.join(changed)} changed on disk since prepare wrote "
                       f"{'it' if len(changed) == 1 else 'them'} (sha256). Rebuild it with `fastcifar prepare --force "
                       f"--data-dir {store.dir}` from the same source.")


def new_run_dir(name: str) -> Path:
    """./runs/<recipe>-<YYYYmmdd-HHMMSS>, -2, -3, ... when taken (the names checkpoint.runs_of finds)."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def check_out(out: Path, resumed: bool) -> None:
    """Raise BadInput unless --out can become this run's directory without replacing anything."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; a run writes a directory of files there. Choose another --out.")
    if out.is_symlink() and not out.exists():
        raise BadInput(f"--out {out} is a symlink to {os.readlink(out)}, which does not exist (or is a loop); "
                       f"choose another --out, or fix the link.")
    if not resumed:  # a run already there (from before this check) may still be continued
        check_outside_stores(out)
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:  # TensorBoard's writer takes the directory as UTF-8 text, and would fail mid-setup
        c_locale = "" if sys.flags.utf8_mode or sys.getfilesystemencoding().lower() in ("utf-8", "utf8") else (
            f" (or Python reads file names as {sys.getfilesystemencoding()} here, the C locale without UTF-8 mode: "
            f"set PYTHONUTF8=1)")
        raise BadInput(f"--out {shown(str(out))}: the name holds bytes that are not UTF-8{c_locale}, and a run's "
                       f"TensorBoard events cannot be written there. Choose an --out with a UTF-8 name.")
    if out.is_dir() and not resumed and any(out.iterdir()):
        if (out / "last.pt").exists():
            raise BadInput(f"{out} already holds a run; continue it with --resume {out}, or choose another --out.")
        raise BadInput(f"--out {out} is a directory that is not empty; fastcifar writes a run only into a new or an "
                       f"empty directory, so nothing of yours (or of another run) is replaced. Choose another --out.")
    checkpoint.check_writable_parent(out)


def split_rows(n_train: int, n_test: int, d) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(train, validation, test rows) of the store; None = all rows / no validation. A fixed permutation
    (seed 0) picks them, so every run and train.seed selects on the same validation images."""
    perm = np.random.default_rng(0).permutation(n_train)
    keep = perm[:max(1, round(n_train * d.subset))]
    n_val = round(len(keep) * d.val_split)
    if d.val_split > 0 and not 0 < n_val < len(keep):
        raise BadInput(f"data.val_split = {d.val_split} of {len(keep)} train images leaves no validation "
                       f"or no training images; choose a fraction that keeps both.")
    val = np.sort(keep[:n_val]) if n_val else None
    train = np.sort(keep[n_val:]) if (n_val or d.subset < 1) else None
    test = np.sort(np.random.default_rng(1).permutation(n_test)[:max(1, round(n_test * d.test_subset))]) \
        if d.test_subset < 1 else None
    return train, val, test


def check_classes(ck: dict, store, path) -> None:
    """Raise BadInput unless the checkpoint's head has the store's number of classes."""
    n = num_classes(ck["model"], from_dict(ck["recipe"]).head.kind, path)
    if n != len(store.class_names):
        raise BadInput(f"The model in {path} has {n} classes, the store at {store.dir} {len(store.class_names)}: "
                       f"not the data it was trained on. Pass --data-dir with that store.")


def teacher_path(r: Recipe) -> Path:
    """The checkpoint r.distill.teacher names (run dir, checkpoint or recipe name)."""
    try:
        return checkpoint.resolve(r.distill.teacher, prefer="best.pt")
    except BadInput as e:
        raise BadInput(f"distill.teacher = {shown(r.distill.teacher)}: {e} Train the teacher first (e.g. `fastcifar "
                       f"train {r.distill.teacher}`), or --set distill.teacher=RUN_DIR_OR_CHECKPOINT.")


def load_teacher(r: Recipe, device: torch.device, store) -> tuple[torch.nn.Module, Recipe]:
    """The frozen teacher of r.distill.teacher and its recipe: own image size, the student's normalisation."""
    path = teacher_path(r)
    ck, _ = pick_weights(checkpoint.load(path))  # the EMA weights when the teacher kept them, as eval does
    check_classes(ck, store, path)
    # KD's temperature applies to s-scaled logits, whatever the teacher's recipe evaluated on
    teacher, tr = net_from_checkpoint(ck, path, device, SCALED_LOGITS)
    if tr.aug.normalize != r.aug.normalize:
        raise BadInput(f"The teacher {path} was trained with aug.normalize={shown(tr.aug.normalize)}, the student "
                       f"uses {shown(r.aug.normalize)}; both see one augmented batch, so set aug.normalize={tr.aug.normalize}.")
    return teacher.requires_grad_(False), tr


def open_or_prepare(data_dir, prepare_here: bool, dataset: str = "cifar100"):
    """The store of `dataset`; when none is prepared yet, prepare it (download) first, on one process per node."""
    d = Path(data_dir) if data_dir is not None else default_data_dir(dataset)
    if not (d / "meta.json").is_file() and prepare_here:
        check_replaceable(d, from_env=data_dir is None and bool(os.environ.get("FASTCIFAR_DATA")))  # user files: no hint
        try:
            prepare(d, dataset=dataset)
        except BadInput as e:
            flag = "" if dataset == "cifar100" else f" --dataset {dataset}"
            hint = "" if "--synthetic" in str(e) else (f" For a learnable stand-in without internet: `fastcifar "
                                                       f"prepare{flag} --synthetic --data-dir {d}`.")
            raise BadInput(f"No prepared store at {d}, and preparing one failed: {e}{hint} On a synthetic store, "
                           f"`fastcifar train smoke` is a one-minute check.")
    fdist.barrier()
    return open_store(d, dataset)


def image_grid(images, spec, store) -> torch.Tensor:
    """A (3, H, W) grid in 0..1 of a batch's first 64 images (the student's view), normalisation undone."""
    from torchvision.utils import make_grid

    images = images[0] if isinstance(images, tuple) else images
    mean, std = mean_std(spec, store)
    x = images[:64].detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return make_grid(x.clamp(0, 1), nrow=8)
