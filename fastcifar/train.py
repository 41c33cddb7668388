"""The training loop: `train(recipe, info)` reads top to bottom, from picking the device to
writing summary.json. Everything a run does is in the recipe; this file only executes it.

Host syncs (`.item()`, `.tolist()`) happen only at the marked log and eval points, so on a GPU
the Python loop runs ahead of the kernels.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastcifar import BadInput, checkpoint
from fastcifar import dist as fdist
from fastcifar.config import Recipe, from_dict, to_dict, validate
from fastcifar.data import default_data_dir, open_store, prepare
from fastcifar.losses import cross_entropy, distillation
from fastcifar.models import build_model
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
    validate(r)
    rt = r.train
    if resume is None and out is not None and (Path(out) / "last.pt").exists():
        raise BadInput(f"{out} already holds a run; continue it with --resume {out}, or choose another --out.")

    # ---- Where: device and ranks. One process per GPU under torchrun; data.batch_size is global.
    want_cuda = rt.device.startswith("cuda") or (rt.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise BadInput(f"train.device = {rt.device!r} but torch sees no CUDA device; use train.device=cpu or auto.")
    rank, world, local_rank = fdist.init("cuda" if want_cuda else "cpu")
    try:
        return _train(r, info, out, data_dir, resume, log, want_cuda, rank, world, local_rank)
    finally:
        fdist.destroy()


def _train(r, info, out, data_dir, resume, log, want_cuda, rank, world, local_rank) -> dict:
    """The loop itself; train() holds the process group around it."""
    rt = r.train
    if want_cuda:
        index = int(rt.device.split(":")[1]) if rt.device.startswith("cuda:") and world == 1 else local_rank
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    main = rank == 0
    say = log if main else (lambda *a, **k: None)
    if r.data.batch_size % world:
        raise BadInput(f"data.batch_size = {r.data.batch_size} is the global batch and must divide evenly "
                       f"over the {world} ranks; pick a multiple of {world}.")
    batch = r.data.batch_size // world  # per rank

    previous_determinism = torch.are_deterministic_algorithms_enabled()
    if rt.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True        # fixed shapes: let cuDNN time and pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls/convs on tensor cores (10-bit mantissa)
        torch.backends.cudnn.allow_tf32 = True
    random.seed(rt.seed)
    torch.manual_seed(rt.seed)  # model init: the same on every rank (DDP also broadcasts rank 0's)

    try:
        # ---- Data: the store, the train/val/test rows, one loader per split
        store = _open_or_prepare(data_dir, local_rank == 0)
        num_classes = len(store.class_names)
        train_rows, val_rows, test_rows = split_rows(len(store.labels("train")), len(store.labels("test")), r.data)
        teacher, teacher_recipe = None, None
        if r.distill.teacher:
            teacher, teacher_recipe = load_teacher(r, device, num_classes)
        common = dict(backend=r.data.backend, device=device, seed=rt.seed, shard=(rank, world))
        train_loader = make_loader(store, "train", r.aug, batch, shuffle=r.data.shuffle, drop_last=r.data.drop_last,
                                   indices=train_rows, augment=True,
                                   sizes=(r.aug.image_size, teacher_recipe.aug.image_size) if teacher else None,
                                   **common)
        test_loader = make_loader(store, "test", r.aug, batch, indices=test_rows, augment=False, **common)
        val_loader = (make_loader(store, "train", r.aug, batch, indices=val_rows, augment=False, **common)
                      if val_rows is not None else None)
        mixing = r.aug.mixup_alpha > 0 or r.aug.cutmix_alpha > 0
        if mixing:
            try:
                from pipelines.mix import mix
            except ImportError as e:
                raise BadInput(f"aug.mixup_alpha/aug.cutmix_alpha need pipelines.mix, which does not import here ({e}).")

        # ---- Model, optimizer, LR schedule, precision
        memory_format = torch.channels_last if r.model.channels_last else torch.contiguous_format
        model = build_model(r.model, r.head, num_classes).to(device, memory_format=memory_format)
        steps_per_epoch = len(train_loader)
        total_steps = rt.epochs * steps_per_epoch
        optimizer = build_optimizer(model, r.optim, r.data.batch_size, device)
        scheduler = build_scheduler(optimizer, total_steps, r.schedule)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(rt.amp)

        def autocast():
            return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

        # fp16 overflows without loss scaling; bf16 has fp32's range and needs none (disabled = pass-through)
        scaler = torch.amp.GradScaler(device.type, enabled=rt.amp == "fp16")
        mix_gen = torch.Generator(device="cpu")

        # ---- Resume: everything that decides the next step comes from last.pt
        start_epoch, skip, step, elapsed, partial = 0, 0, 0, 0.0, None
        best = {"score": -1.0, "epoch": 0}
        history: list[dict] = []
        if resume is not None:
            ck = checkpoint.load(Path(resume) / "last.pt")
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            checkpoint.set_rng_state(ck["rng"])
            mix_gen.set_state(ck["mix_rng"])
            start_epoch, skip, step = ck["epoch"], ck["step_in_epoch"], ck["step"]
            best, history, elapsed = ck["best"], ck["history"], ck["wall_seconds"]
            partial = ck["partial"] if skip else None
            info = {**ck["info"], **{k: v for k, v in info.items() if v}}
            say(f"Resuming {resume} at epoch {start_epoch + 1}" + (f", batch {skip + 1}" if skip else "") + ".")

        use_compile = (device.type == "cuda") if rt.compile is None else rt.compile
        if use_compile:
            if teacher is not None:
                teacher.compile()
            model.compile()  # in place: state_dict keys stay plain, and DDP below wraps the compiled module
        net = model
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        # ---- Outputs (rank 0 only): run dir, recipe, TensorBoard, metrics.jsonl
        if out is None:
            out = resume if resume is not None else Path("runs") / f"{info['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path(out)
        writer, metrics_file = None, None
        if main:
            out.mkdir(parents=True, exist_ok=True)
            meta = {"name": info["name"], "description": info.get("description", "")}
            if info.get("parent"):
                meta["parent"] = info["parent"]
            checkpoint.write_json(out / "recipe.json", {**meta, **to_dict(r)})
            if info.get("source") and not (out / "recipe.py").exists():
                (out / "recipe.py").write_text(info["source"])
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out))
            # the log must agree with last.pt: rewrite it from the checkpoint's history, then append
            with open(out / "metrics.jsonl.tmp", "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in history)
            os.replace(out / "metrics.jsonl.tmp", out / "metrics.jsonl")
            metrics_file = open(out / "metrics.jsonl", "a")

        device_name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
        selection = "val" if val_loader is not None else "test"

        def summary(finished: bool, reason: str) -> dict:
            last = history[-1] if history else {}
            s = {"recipe": info["name"], "description": info.get("description", ""),
                 "best_acc": best.get("test_acc"), "best_epoch": best["epoch"] or None,
                 "final_acc": last.get("test_acc"), "final_top5": last.get("test_top5"),
                 "epochs_done": len(history), "epochs": rt.epochs,
                 "train_images_per_sec": float(np.mean([m["images_per_sec"] for m in history])) if history else None,
                 "wall_seconds": time.perf_counter() - t_start, "device": device_name,
                 "backend": train_loader.backend, "world_size": world, "synthetic": store.synthetic,
                 "selection": selection, "model": r.model.name, "image_size": r.aug.image_size,
                 "finished": finished, "stop_reason": reason}
            if selection == "val":
                s.update(best_val_acc=best.get("val_acc"), best_val_epoch=best["epoch"] or None,
                         test_acc_at_best_val=best.get("test_acc"))
            return s

        def state(epochs_done: int, step_in_epoch: int, partial_sums) -> dict:
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epochs_done, "step_in_epoch": step_in_epoch, "step": step,
                    "partial": partial_sums, "rng": checkpoint.rng_state(), "mix_rng": mix_gen.get_state(),
                    "best": best, "history": history, "wall_seconds": time.perf_counter() - t_start,
                    "recipe": to_dict(r), "info": info, "world_size": world}

        # ---- Ctrl-C / SIGTERM: finish the step, save last.pt, exit 130. A second Ctrl-C quits at once.
        stop = {"signal": None}

        def on_signal(signum, frame):
            if stop["signal"] is not None:
                raise KeyboardInterrupt
            stop["signal"] = signum
            say(f"\n{signal.Signals(signum).name}: saving last.pt after this step (again to quit at once).")

        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

        say(f"Training {info['name']} on {device_name}" + (f" x {world} ranks" if world > 1 else "")
            + f": {rt.epochs} epochs x {steps_per_epoch} steps of {r.data.batch_size} images"
            + f" ({train_loader.backend} loader, {r.aug.image_size}px, amp {rt.amp}, compile {'on' if use_compile else 'off'})"
            + (" on a SYNTHETIC store" if store.synthetic else "") + f" -> {out}")

        # ---- The loop
        t_start = time.perf_counter() - elapsed  # wall_seconds continues across resumes
        bad_step = torch.full((), NONE_YET, dtype=torch.int64, device=device)  # first step with a NaN/inf loss
        step_t = torch.full((), step, dtype=torch.int64, device=device)        # the step counter, on the device
        try:
            for epoch in range(start_epoch, rt.epochs):
                net.train()
                train_loader.set_epoch(epoch, start_batch=skip)  # resumed mid-epoch: batches skip.. of it
                if epoch != start_epoch or not skip:
                    mix_gen.manual_seed(rt.seed * 100_003 + epoch)
                sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * images, correct, images
                if partial is not None and main:
                    sums += partial.to(device)  # the resumed epoch's batches before the interrupt
                partial = None
                lr = optimizer.param_groups[0]["lr"]
                bar = tqdm(total=len(train_loader) * batch * world, initial=skip * batch * world, unit="img",
                           unit_scale=True, desc=f"epoch {epoch + 1}/{rt.epochs}", disable=not main,
                           leave=False, mininterval=1.0)
                t_epoch = time.perf_counter()
                images_trained = 0
                for i, (images, labels) in enumerate(train_loader, start=skip):
                    targets = labels
                    if mixing:  # MixUp/CutMix on the device: soft targets (N, num_classes); a KD pair mixes alike
                        images, targets = mix(images, labels, r.aug, num_classes, mix_gen)
                    teacher_images = None
                    if teacher is not None:
                        images, teacher_images = images
                    if step == 0 and main:
                        grid = _image_grid(images[:64], r.aug, store)
                        writer.add_image("train/augmented_batch", grid, 0)
                    with autocast():
                        logits = net(images, labels)  # margin heads put the margin on the labelled class
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_logits = teacher(teacher_images)
                    if teacher is not None:
                        parts = distillation(logits, targets, teacher_logits, r.distill.alpha,
                                             r.distill.temperature, r.loss.label_smoothing)
                    else:
                        parts = cross_entropy(logits, targets, r.loss.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(parts["loss"]).backward()
                    if r.optim.grad_clip:
                        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                        torch.nn.utils.clip_grad_norm_(model.parameters(), r.optim.grad_clip)
                    lr = optimizer.param_groups[0]["lr"]
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    step += 1
                    step_t += 1

                    # running sums stay on the device: no host sync here
                    n = labels.shape[0]
                    loss = parts["loss"].detach()
                    sums[0] += loss.double() * n
                    sums[1] += (logits.detach().argmax(1) == labels).sum()
                    sums[2] += n
                    bad_step = torch.where(torch.isfinite(loss), bad_step, torch.minimum(bad_step, step_t))
                    images_trained += n
                    bar.update(n * world)

                    at_log = step % rt.log_every == 0 or i == len(train_loader) - 1
                    if at_log:
                        # log point: host sync (and one all-reduce with several ranks)
                        first_bad = int(fdist.all_reduce(bad_step.clone(), torch.distributed.ReduceOp.MIN).item())
                        if first_bad != NONE_YET:
                            reason = (f"non-finite loss (NaN or inf) at step {first_bad} (epoch {epoch + 1}, batch "
                                      f"{first_bad - epoch * steps_per_epoch}); stopped at step {step}")
                            kept = f"last.pt holds epoch {len(history)}" if history else "no checkpoint was written"
                            if main:
                                checkpoint.write_json(out / "summary.json", summary(False, reason))
                            raise Diverged(f"{info['name']}: {reason}. {kept} (the last good one); lower "
                                           f"optim.lr, add optim.grad_clip, or use train.amp=bf16 instead of fp16.")
                        loss_now = (sums[0] / sums[2].clamp(min=1)).item()
                        bar.set_postfix(loss=f"{loss_now:.3f}", lr=f"{lr:.2e}", refresh=False)
                        if main:
                            writer.add_scalar("train/loss_running", loss_now, step)
                            writer.add_scalar("train/lr", lr, step)
                    if (at_log or world == 1) and fdist.any_rank(stop["signal"] is not None, device):
                        done = fdist.all_reduce(sums.clone())
                        if main:
                            checkpoint.save(out / "last.pt", state(epoch, i + 1, done.cpu()))
                            checkpoint.write_json(out / "summary.json", summary(False, "interrupted"))
                        fdist.barrier()  # the others wait until rank 0 has saved, so torchrun kills nothing early
                        raise Interrupted(f"Interrupted at epoch {epoch + 1}, step {step}: saved {out / 'last.pt'}; "
                                          f"continue with `fastcifar train --resume {out}`.")
                bar.close()
                skip = 0

                # ---- End of epoch: all-reduce, evaluate, select, checkpoint, log (host syncs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                train_seconds = time.perf_counter() - t_epoch
                fdist.all_reduce(sums)
                loss_sum, correct, seen = sums.tolist()
                test = evaluate(model, test_loader, autocast)
                m = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
                     "test_acc": test["acc"], "test_top5": test["top5"], "test_loss": test["loss"]}
                if val_loader is not None:
                    val = evaluate(model, val_loader, autocast)
                    m.update(val_acc=val["acc"], val_top5=val["top5"], val_loss=val["loss"])
                m.update(lr=lr, images_per_sec=images_trained * world / train_seconds,
                         epoch_seconds=time.perf_counter() - t_epoch, wall_seconds=time.perf_counter() - t_start)
                history.append(m)
                score = m["val_acc"] if val_loader is not None else m["test_acc"]
                improved = score > best["score"]
                if improved:
                    best = {"score": score, "epoch": epoch + 1, "test_acc": m["test_acc"], "test_top5": m["test_top5"],
                            **({"val_acc": m["val_acc"]} if val_loader is not None else {})}
                if main:
                    ck = state(epoch + 1, 0, None)
                    checkpoint.save(out / "last.pt", ck)  # checkpoints first: the log never names an epoch without one
                    if improved:
                        checkpoint.save(out / "best.pt", ck)
                    metrics_file.write(json.dumps(m) + "\n")
                    metrics_file.flush()
                    for k, v in m.items():
                        if k != "epoch":
                            writer.add_scalar(f"epoch/{k}", v, epoch + 1)
                    writer.flush()
                    checkpoint.write_json(out / "summary.json", summary(False, "running"))
                left = (rt.epochs - epoch - 1) * (m["wall_seconds"] / max(1, len(history)))
                say(f"epoch {epoch + 1}/{rt.epochs}  train loss {m['train_loss']:.3f} acc {m['train_acc']:.2f}%  "
                    + (f"val {m['val_acc']:.2f}%  " if val_loader is not None else "")
                    + f"test {m['test_acc']:.2f}% (top-5 {m['test_top5']:.2f}%)  lr {lr:.2e}  "
                    + f"{m['images_per_sec']:,.0f} img/s  {m['epoch_seconds']:.1f}s  ETA {duration(left)}")
                if fdist.any_rank(stop["signal"] is not None, device):
                    if main:
                        checkpoint.write_json(out / "summary.json", summary(False, "interrupted"))
                    fdist.barrier()
                    raise Interrupted(f"Interrupted after epoch {epoch + 1}: saved {out / 'last.pt'}; "
                                      f"continue with `fastcifar train --resume {out}`.")

            result = summary(True, "completed")
            if main:
                checkpoint.write_json(out / "summary.json", result)
                say(f"Done: best test top-1 {result['best_acc']:.2f}% at epoch {result['best_epoch']}"
                    + (f" (selected on val: {result['best_val_acc']:.2f}%)" if selection == "val" else "")
                    + f", final {result['final_acc']:.2f}%, {duration(result['wall_seconds'])}. Run: {out}")
            return result
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if writer is not None:
                writer.close()
            if metrics_file is not None:
                metrics_file.close()
    finally:
        torch.use_deterministic_algorithms(previous_determinism)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, autocast=None) -> dict:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of model over a loader, summed
    over ranks. Margin heads give their scaled cosine here (no margin in eval mode)."""
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
    r = from_dict(ck["recipe"])
    r.model.pretrained, r.model.pretrained_file = False, ""  # the weights come from the checkpoint
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
    model = build_model(r.model, r.head, len(store.class_names))
    model.load_state_dict(ck["model"])
    memory_format = torch.channels_last if r.model.channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=memory_format).eval()
    loader = make_loader(store, "test", r.aug, batch_size, backend=backend or r.data.backend, device=dev,
                         seed=r.train.seed, augment=False)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.train.amp)
    res = evaluate(model, loader, lambda: torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None))
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
    ck = checkpoint.load(path)
    tr = from_dict(ck["recipe"])
    if tr.aug.normalize != r.aug.normalize:
        raise BadInput(f"The teacher {path} was trained with aug.normalize={tr.aug.normalize!r}, the student "
                       f"uses {r.aug.normalize!r}; both see one augmented batch, so set aug.normalize={tr.aug.normalize}.")
    tr.model.pretrained, tr.model.pretrained_file = False, ""  # its weights come from the checkpoint
    teacher = build_model(tr.model, tr.head, num_classes)
    teacher.load_state_dict(ck["model"])
    memory_format = torch.channels_last if tr.model.channels_last else torch.contiguous_format
    teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    return teacher, tr


def _open_or_prepare(data_dir, prepare_here: bool):
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


def _image_grid(images: torch.Tensor, spec, store) -> torch.Tensor:
    """A (3, H, W) grid of images in 0..1, undoing the loader's normalisation."""
    from torchvision.utils import make_grid

    mean, std = mean_std(spec, store)
    x = images.detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return make_grid(x.clamp(0, 1), nrow=8)
