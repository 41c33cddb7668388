"""Training: `train(recipe, info)` builds a `Trainer` and runs `fit()`, the loop on one screen.

    Trainer(recipe, info)   builds everything once: device and ranks, store and loaders, the net,
                            optimizer, LR schedule, GradScaler, the objective and the mixing, and
                            the `Progress` that resume restores
    fit()                   for each epoch: train_epoch() (the steps), end_epoch() (evaluate,
                            select, checkpoint, log); Ctrl-C/SIGTERM saves and stops
    Progress                where the run is: the one state object resume restores besides the
                            modules' own state_dicts
    RunDir (checkpoint.py)  the run's files: recipe.json, TensorBoard, metrics.jsonl, last/best.pt,
                            summary.json (written from one place)

Host syncs (`.item()`, `.tolist()`) happen only at the marked log and eval points, so on a GPU the
Python loop runs ahead of the kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastcifar import BadInput, checkpoint, runtime
from fastcifar import dist as fdist
from fastcifar.checkpoint import RunDir
from fastcifar.config import Recipe, to_dict
from fastcifar.data import default_data_dir, open_store, prepare
from fastcifar.losses import Classify, Distill, MultiScale
from fastcifar.models import build_model, init_from, load_weights, net_from_checkpoint
from fastcifar.optim import build_optimizer, build_scheduler
from fastcifar.report import duration
from pipelines.loader import make_loader
from pipelines.spec import mean_std

NONE_YET = 2 ** 62  # "no non-finite loss seen" in the device-side first-bad-step tracker


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: last.pt was saved; the CLI exits 130."""


class Diverged(Exception):
    """A NaN/inf loss: the run stopped, keeping the last good checkpoint; the CLI exits 1."""


def train(r: Recipe, info: dict, out: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, log=print) -> dict:
    """Train recipe r (info: name, description, parent, source) and return summary.json's dict.
    resume: a run directory whose last.pt to continue from (then out defaults to it)."""
    with Trainer(r, info, out=out, data_dir=data_dir, resume=resume, log=log) as trainer:
        return trainer.fit()


@dataclasses.dataclass
class Progress:
    """Where a run is. Saved in every checkpoint beside the modules' states; resume restores it."""

    epoch: int = 0                      # epochs done
    batch: int = 0                      # batches done of the epoch in progress (a mid-epoch stop)
    step: int = 0                       # optimizer steps done
    best: dict = dataclasses.field(default_factory=lambda: {"score": -1.0, "epoch": 0})  # the selected epoch
    history: list = dataclasses.field(default_factory=list)  # one metrics dict per epoch done
    partial: torch.Tensor | None = None  # sums of the stopped epoch's batches so far (all ranks)
    elapsed: float = 0.0                # wall seconds of this run's earlier processes
    started: float = dataclasses.field(default_factory=time.perf_counter)  # this process's clock start

    def wall_seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.batch, "step": self.step, "best": self.best,
                "history": self.history, "partial": self.partial, "wall_seconds": self.wall_seconds()}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.batch, self.step = d["epoch"], d["step_in_epoch"], d["step"]
        self.best, self.history, self.elapsed = d["best"], d["history"], d["wall_seconds"]
        self.partial = d["partial"] if self.batch else None


class Trainer:
    """One run of a recipe, built once; `fit()` trains it. A context manager: leaving it restores
    the backend flags and leaves the process group."""

    def __init__(self, r: Recipe, info: dict, out=None, data_dir=None, resume=None, log=print):
        r.validate()
        if resume is None and out is not None and (Path(out) / "last.pt").exists():
            raise BadInput(f"{out} already holds a run; continue it with --resume {out}, or choose another --out.")
        self.r, self.info, self.log = r, dict(info), log
        self._exit = contextlib.ExitStack()
        try:
            self._build(data_dir, resume)
        except BaseException:
            self._exit.close()
            raise
        name = self.info["name"]
        self.out = Path(out if out is not None else resume if resume is not None
                        else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.run = RunDir(self.out, self.summary, writes=self.main)
        self.stop = runtime.StopSignals(self.say)

    def _build(self, data_dir, resume) -> None:
        r, rt = self.r, self.r.train
        # ---- Where: device and ranks (one process per GPU under torchrun; data.batch_size is global)
        self.device, self.rank, self.world = self._exit.enter_context(runtime.distributed(rt.device))
        self.main = self.rank == 0
        self.say = self.log if self.main else (lambda *a, **k: None)
        if r.data.batch_size % self.world:
            raise BadInput(f"data.batch_size = {r.data.batch_size} is the global batch and must divide evenly "
                           f"over the {self.world} ranks; pick a multiple of {self.world}.")
        self.batch = r.data.batch_size // self.world  # per rank
        self._exit.enter_context(runtime.backend_settings(rt.deterministic, rt.tf32))
        random.seed(rt.seed)
        torch.manual_seed(rt.seed)  # model init: the same on every rank (DDP also broadcasts rank 0's)

        # ---- Data: the store, the train/val/test rows, one loader per split
        self.store = open_or_prepare(data_dir, fdist.local_rank() == 0)
        self.num_classes = len(self.store.class_names)
        self.teacher, teacher_recipe = (load_teacher(r, self.device, self.num_classes) if r.distill.teacher
                                        else (None, None))
        train_rows, val_rows, test_rows = split_rows(len(self.store.labels("train")), len(self.store.labels("test")), r.data)
        common = dict(backend=r.data.backend, device=self.device, seed=rt.seed, shard=(self.rank, self.world))
        # distillation: the student's and the teacher's view; multi-scale training: one view per scale
        sizes = ((r.aug.image_size, teacher_recipe.aug.image_size) if self.teacher is not None
                 else tuple(r.loss.scales) or None)
        self.train_loader = make_loader(self.store, "train", r.aug, self.batch, shuffle=r.data.shuffle,
                                        drop_last=r.data.drop_last, indices=train_rows, augment=True, sizes=sizes, **common)
        self.test_loader = make_loader(self.store, "test", r.aug, self.batch, indices=test_rows, augment=False, **common)
        self.val_loader = (make_loader(self.store, "train", r.aug, self.batch, indices=val_rows, augment=False, **common)
                           if val_rows is not None else None)

        # ---- Model, optimizer, LR schedule, precision, mixing
        self.model = build_model(r.model, r.head, self.num_classes).to(
            self.device, memory_format=runtime.memory_format(r.model.channels_last))
        if r.model.init_from and resume is None:  # a resumed run's weights come from its last.pt
            init_from(self.model, r.model.init_from, log=self.say)
        self.optimizer = build_optimizer(self.model, r.optim, r.data.batch_size)
        self.scheduler = build_scheduler(self.optimizer, rt.epochs * len(self.train_loader), r.schedule)
        # fp16 overflows without loss scaling; bf16 has fp32's range and needs none (disabled = pass-through)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=rt.amp == "fp16")
        self.autocast = runtime.autocast(self.device, rt.amp)
        self.mix_gen = torch.Generator(device="cpu")
        self.mix = no_mix
        if r.aug.mixup_alpha > 0 or r.aug.cutmix_alpha > 0:  # MixUp/CutMix on the device: soft targets
            from pipelines.mix import mix
            self.mix = functools.partial(mix, spec=r.aug, num_classes=self.num_classes, generator=self.mix_gen)

        # ---- Resume: everything that decides the next step comes from last.pt
        self.progress = Progress()
        if resume is not None:
            self.load_state_dict(checkpoint.load(Path(resume) / "last.pt"), Path(resume) / "last.pt")
            p = self.progress
            self.say(f"Resuming {resume} at epoch {p.epoch + 1}" + (f", batch {p.batch + 1}" if p.batch else "") + ".")

        # ---- The net the steps run: compiled, DDP-wrapped; and the objective, chosen once
        self.compiled = (self.device.type == "cuda") if rt.compile is None else rt.compile
        if self.compiled:
            if self.teacher is not None:
                self.teacher.compile()
            self.model.compile()  # in place: state_dict keys stay plain, and DDP below wraps the compiled module
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
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
        self.lr = self.optimizer.param_groups[0]["lr"]  # of the last step taken

    # ---- The loop

    def fit(self) -> dict:
        """Train epochs progress.epoch+1 .. train.epochs; returns summary.json's dict."""
        with self.stop, self.run.open(self.recipe_json(), self.info.get("source"), self.progress.history):
            self.say(self.banner())
            self.progress.started = time.perf_counter()  # wall_seconds continues across resumes
            for epoch in range(self.progress.epoch, self.r.train.epochs):
                stats = self.train_epoch(epoch, self.progress.batch)
                self.end_epoch(epoch, stats)
                if fdist.any_rank(self.stop.requested, self.device):
                    self.interrupt(f"Interrupted after epoch {epoch + 1}")
            result = self.run.finish()
            self.say(f"Done: best test top-1 {result['best_acc']:.2f}% at epoch {result['best_epoch']}"
                     + (f" (selected on val: {result['best_val_acc']:.2f}%)" if result["selection"] == "val" else "")
                     + f", final {result['final_acc']:.2f}%, {duration(result['wall_seconds'])}. Run: {self.out}")
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
        bar = tqdm(total=len(self.train_loader) * self.batch * world, initial=start_batch * self.batch * world,
                   unit="img", unit_scale=True, desc=f"epoch {epoch + 1}/{rt.epochs}", disable=not self.main,
                   leave=False, mininterval=1.0)
        t0, images_trained = time.perf_counter(), 0
        for i, (images, labels) in enumerate(self.train_loader, start=start_batch):
            images, targets = self.mix(images, labels)
            if p.step == 0 and self.main:
                self.run.image("train/augmented_batch", image_grid(images, self.r.aug, self.store))
            parts = self.train_step(images, labels, targets)
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
                p.batch, p.partial = i + 1, fdist.all_reduce(sums.clone()).cpu()
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
        return parts

    def log_point(self, epoch: int, sums: torch.Tensor, bar) -> None:
        """Log point (host sync, and one all-reduce with several ranks): stop on a NaN/inf loss,
        show the running loss."""
        p = self.progress
        first_bad = int(fdist.all_reduce(self.bad_step.clone(), torch.distributed.ReduceOp.MIN).item())
        if first_bad != NONE_YET:
            steps = len(self.train_loader)
            reason = (f"non-finite loss (NaN or inf) at step {first_bad} (epoch {epoch + 1}, batch "
                      f"{first_bad - epoch * steps}); stopped at step {p.step}")
            kept = f"last.pt holds epoch {len(p.history)}" if p.history else "no checkpoint was written"
            self.run.stop(reason)
            raise Diverged(f"{self.info['name']}: {reason}. {kept} (the last good one); lower optim.lr, add "
                           f"optim.grad_clip, or use train.amp=bf16 instead of fp16.")
        loss_now = (sums[0] / sums[2].clamp(min=1)).item()
        bar.set_postfix(loss=f"{loss_now:.3f}", lr=f"{self.lr:.2e}", refresh=False)
        self.run.scalars(p.step, {"train/loss_running": loss_now, "train/lr": self.lr})

    def end_epoch(self, epoch: int, stats: dict) -> dict:
        """All-reduce the epoch's sums, evaluate, select, checkpoint, log (host syncs). Returns
        the epoch's metrics (metrics.jsonl's line)."""
        p = self.progress
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - stats["t0"]
        loss_sum, correct, seen = fdist.all_reduce(stats["sums"]).tolist()
        test = self.evaluate(self.test_loader)
        m = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
             "test_acc": test["acc"], "test_top5": test["top5"], "test_loss": test["loss"]}
        if self.val_loader is not None:
            val = self.evaluate(self.val_loader)
            m.update(val_acc=val["acc"], val_top5=val["top5"], val_loss=val["loss"])
        m.update(lr=self.lr, images_per_sec=stats["images"] * self.world / train_seconds,
                 epoch_seconds=time.perf_counter() - stats["t0"], wall_seconds=p.wall_seconds())
        p.history.append(m)
        score = m["val_acc"] if self.val_loader is not None else m["test_acc"]
        improved = score > p.best["score"]
        if improved:
            p.best = {"score": score, "epoch": epoch + 1, "test_acc": m["test_acc"], "test_top5": m["test_top5"],
                      **({"val_acc": m["val_acc"]} if self.val_loader is not None else {})}
        p.epoch, p.batch = epoch + 1, 0
        self.run.checkpoint(self.state_dict(), best=improved)  # checkpoints first: the log never names an epoch without one
        self.run.epoch(m)
        left = (self.r.train.epochs - epoch - 1) * (m["wall_seconds"] / max(1, len(p.history)))
        self.say(f"epoch {epoch + 1}/{self.r.train.epochs}  train loss {m['train_loss']:.3f} acc {m['train_acc']:.2f}%  "
                 + (f"val {m['val_acc']:.2f}%  " if self.val_loader is not None else "")
                 + f"test {m['test_acc']:.2f}% (top-5 {m['test_top5']:.2f}%)  lr {self.lr:.2e}  "
                 + f"{m['images_per_sec']:,.0f} img/s  {m['epoch_seconds']:.1f}s  ETA {duration(left)}")
        return m

    def evaluate(self, loader) -> dict:
        return evaluate(self.model, loader, self.autocast)

    def interrupt(self, where: str):
        """Stop on Ctrl-C/SIGTERM once last.pt holds the run: summary.json says so, and the other
        ranks wait until rank 0 has saved (so torchrun kills nothing early)."""
        self.run.stop("interrupted")
        fdist.barrier()
        raise Interrupted(f"{where}: saved {self.out / 'last.pt'}; continue with `fastcifar train --resume {self.out}`.")

    # ---- State and reports

    def state_dict(self) -> dict:
        """What last.pt and best.pt hold: the modules' states, the RNGs, the Progress and the recipe."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": checkpoint.rng_state(), "mix_rng": self.mix_gen.get_state(),
                "recipe": to_dict(self.r), "info": self.info, "world_size": self.world, **self.progress.state_dict()}

    def load_state_dict(self, ck: dict, path) -> None:
        load_weights(self.model, ck["model"], path)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        checkpoint.set_rng_state(ck["rng"])
        self.mix_gen.set_state(ck["mix_rng"])
        self.progress.load_state_dict(ck)
        self.info = {**ck["info"], **{k: v for k, v in self.info.items() if v}}

    def recipe_json(self) -> dict:
        meta = {"name": self.info["name"], "description": self.info.get("description", "")}
        if self.info.get("parent"):
            meta["parent"] = self.info["parent"]
        return {**meta, **to_dict(self.r)}

    def device_name(self) -> str:
        return f"{self.device} ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "cpu"

    def banner(self) -> str:
        r = self.r
        return (f"Training {self.info['name']} on {self.device_name()}" + (f" x {self.world} ranks" if self.world > 1 else "")
                + f": {r.train.epochs} epochs x {len(self.train_loader)} steps of {r.data.batch_size} images"
                + f" ({self.train_loader.backend} loader, {r.aug.image_size}px, amp {r.train.amp}, "
                + f"compile {'on' if self.compiled else 'off'})"
                + (" on a SYNTHETIC store" if self.store.synthetic else "") + f" -> {self.out}")

    def summary(self, finished: bool, reason: str) -> dict:
        """summary.json's dict (RunDir writes it)."""
        p, history = self.progress, self.progress.history
        last = history[-1] if history else {}
        selection = "val" if self.val_loader is not None else "test"
        s = {"recipe": self.info["name"], "description": self.info.get("description", ""),
             "best_acc": p.best.get("test_acc"), "best_epoch": p.best["epoch"] or None,
             "final_acc": last.get("test_acc"), "final_top5": last.get("test_top5"),
             "epochs_done": len(history), "epochs": self.r.train.epochs,
             "train_images_per_sec": float(np.mean([m["images_per_sec"] for m in history])) if history else None,
             "wall_seconds": p.wall_seconds(), "device": self.device_name(),
             "backend": self.train_loader.backend, "world_size": self.world, "synthetic": self.store.synthetic,
             "selection": selection, "model": self.r.model.name, "image_size": self.r.aug.image_size,
             "finished": finished, "stop_reason": reason}
        if selection == "val":
            s.update(best_val_acc=p.best.get("val_acc"), best_val_epoch=p.best["epoch"] or None,
                     test_acc_at_best_val=p.best.get("test_acc"))
        return s

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._exit.close()
        return False


def no_mix(images, labels):
    """The batch transform when MixUp/CutMix are off: hard labels are the targets."""
    return images, labels


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, autocast=None) -> dict:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of model over a loader, summed
    over ranks. Margin heads give their evaluation logits here (no labels, no margin)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    loader.set_epoch(0)
    for images, labels in loader:
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        sums[1] += (top5[:, 0] == labels).sum()
        sums[2] += (top5 == labels[:, None]).any(1).sum()
        sums[3] += labels.shape[0]
    fdist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()  # eval point: host sync
    model.train(was_training)
    n = max(n, 1)
    return {"acc": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "images": int(n)}


def evaluate_checkpoint(ref: str, data_dir=None, backend: str | None = None, batch_size: int = 500,
                        device: str = "auto") -> dict:
    """Test top-1/top-5/loss of a checkpoint (file or run dir) on the whole test split."""
    path = checkpoint.resolve(ref, prefer="best.pt")
    ck = checkpoint.load(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInput(f"--device {device!r}: use auto, cpu, cuda or cuda:N.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: torch sees no CUDA device.")
    if batch_size < 1:
        raise BadInput(f"--batch-size {batch_size}: must be at least 1.")
    store = open_store(data_dir)
    model, r = net_from_checkpoint(ck, path, dev, len(store.class_names))
    loader = make_loader(store, "test", r.aug, batch_size, backend=backend or r.data.backend, device=dev,
                         seed=r.train.seed, augment=False)
    res = evaluate(model, loader, runtime.autocast(dev, r.train.amp))
    return {**res, "checkpoint": str(path), "recipe": ck.get("info", {}).get("name", "?"), "epoch": ck["epoch"],
            "synthetic": store.synthetic}


def split_rows(n_train: int, n_test: int, d) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(train rows, validation rows, test rows) of the store; None = all rows / no validation.
    A fixed permutation (seed 0) picks the subsets and the held-out images, so every run and
    every train.seed selects on the same validation images."""
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


def load_teacher(r: Recipe, device: torch.device, num_classes: int) -> tuple[torch.nn.Module, Recipe]:
    """The frozen teacher of r.distill.teacher (run dir, checkpoint or recipe name) and its recipe,
    read from its checkpoint: it sees its own image size and must share the student's normalisation."""
    try:
        path = checkpoint.resolve(r.distill.teacher, prefer="best.pt")
    except BadInput as e:
        raise BadInput(f"distill.teacher = {r.distill.teacher!r}: {e} Train the teacher first (e.g. `fastcifar "
                       f"train {r.distill.teacher}`), or --set distill.teacher=RUN_DIR_OR_CHECKPOINT.")
    # KD's temperature applies to s-scaled logits, whatever the teacher's recipe evaluated on
    teacher, tr = net_from_checkpoint(checkpoint.load(path), path, device, num_classes, ("head.eval_logits=scaled",))
    if tr.aug.normalize != r.aug.normalize:
        raise BadInput(f"The teacher {path} was trained with aug.normalize={tr.aug.normalize!r}, the student "
                       f"uses {r.aug.normalize!r}; both see one augmented batch, so set aug.normalize={tr.aug.normalize}.")
    return teacher.requires_grad_(False), tr


def open_or_prepare(data_dir, prepare_here: bool):
    """The store; when none is prepared yet, prepare it (download) first, on one process per node."""
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    if not (d / "meta.json").is_file() and prepare_here:
        try:
            prepare(d)
        except BadInput as e:
            hint = "" if "--synthetic" in str(e) else (f" For a learnable stand-in without internet: `fastcifar "
                                                       f"prepare --synthetic --data-dir {d}`.")
            raise BadInput(f"No prepared store at {d}, and preparing one failed: {e}{hint} On a synthetic store, "
                           f"`fastcifar train smoke` is a one-minute check.")
    fdist.barrier()
    return open_store(d)


def image_grid(images, spec, store) -> torch.Tensor:
    """A (3, H, W) grid of the first 64 images of a batch (the student's view) in 0..1, undoing the
    loader's normalisation."""
    from torchvision.utils import make_grid

    images = images[0] if isinstance(images, tuple) else images
    mean, std = mean_std(spec, store)
    x = images[:64].detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return make_grid(x.clamp(0, 1), nrow=8)
