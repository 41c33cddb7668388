"""What a run decides for the machine it runs on, and what a resume on another machine, or for
more epochs, keeps: train.amp=auto trains a shipped recipe in fp32 on a CPU without native bf16
and says why; a GradScaler that starts on resume; each rank's own RNG states; an LR schedule
that keeps its horizon when a resume adds epochs, or refuses when it ends at LR 0; a mid-epoch
stop that resumes exactly with dropout and drop path (the global RNG) and on the DALI backend."""

import pytest
import torch

import fastcifar.train as T
from fastcifar import checkpoint, config, runtime
from fastcifar import dist as fdist
from fastcifar.errors import BadInput
from fastcifar.optim import lr_factor, peak_lr
from helpers import QUIET, cli, info, metrics, needs_dali, one_paragraph, resume_matches_straight, tiny


def logged(recipe, run_info=None, **kw) -> tuple[dict, list[str]]:
    lines = []
    s = T.train(recipe, run_info if run_info is not None else info(), log=lines.append, **kw)
    return s, lines


# ---- train.amp = auto


@pytest.mark.parametrize("flag, picked", [(None, "none"), ("avx512_bf16", "bf16")])
def test_a_shipped_recipe_trains_at_the_cpus_native_precision_and_says_why(store_dir, tmp_path, monkeypatch, flag,
                                                                           picked):
    """r18_cifar_32 (train.amp = auto) on a CPU without native bf16 trains in fp32, and with it in
    bf16; the banner says which and why, summary.json and its provenance record it."""
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: flag)
    r, run_info = config.load("r18_cifar_32")
    assert r.train.amp == "auto"
    config.apply_overrides(r, ["model.name=test_resnet", "data.batch_size=50", "data.subset=0.1", "data.backend=torch",
                               "data.test_subset=0.1", "train.epochs=1", "train.device=cpu"])  # 2 steps, 30 test images
    seen = {}
    lines = []
    with T.Trainer(r, run_info, out=tmp_path / "run", data_dir=store_dir, log=lines.append) as trainer:
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, out: None if "dtype" in seen else seen.update(dtype=out.dtype))
        s = trainer.fit()
    assert seen["dtype"] == (torch.float32 if picked == "none" else torch.bfloat16)
    assert s["amp"] == picked and s["provenance"]["amp"] == picked
    banner = "\n".join(lines[:3])
    if picked == "none":
        assert "amp fp32, " in banner and "amp fp32 (auto: this CPU has no native bf16" in banner
    else:
        assert "amp bf16, " in banner and "amp bf16 (auto: this CPU has native bf16 (avx512_bf16))" in banner


def test_bfloat16_images_with_auto_on_an_fp32_machine_are_read_as_float32(store_dir, tmp_path, monkeypatch):
    """aug.dtype=bfloat16 saves bytes for an autocast step; where auto trains in fp32 the loaders make
    float32 images instead (an fp32 layer refuses bf16 input), for training and for eval alike."""
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: None)
    r = tiny(train__epochs=1, train__amp="auto", aug__dtype="bfloat16", data__subset=0.1, data__test_subset=0.1)
    s, lines = logged(r, out=tmp_path / "run", data_dir=store_dir)
    assert s["finished"] and s["amp"] == "none"
    assert any("aug.dtype = bfloat16 read as float32" in line for line in lines)
    ev = T.evaluate_checkpoint(str(tmp_path / "run"), data_dir=store_dir, device="cpu")  # bf16 images would not run
    assert ev["amp"] == "none" and ev["images"] == 300


def test_a_resume_that_switches_to_fp16_starts_a_fresh_grad_scaler(store_dir, tmp_path):
    """A bf16 run's disabled GradScaler saved {}; resumed where the precision is fp16 (another GPU, or
    train.amp=fp16), the enabled scaler starts fresh instead of failing to load {}; the run says so."""
    run = tmp_path / "run"
    small = dict(data__subset=0.1, data__test_subset=0.1)
    T.train(tiny(train__epochs=1, train__amp="bf16", **small), info(), out=run, data_dir=store_dir, **QUIET)
    assert checkpoint.load(run / "last.pt")["scaler"] == {}
    s, lines = logged(tiny(train__epochs=2, train__amp="fp16", **small), {}, resume=run, data_dir=store_dir)
    assert s["finished"] and s["amp"] == "fp16"
    assert any("trained in bf16 and continues in fp16" in line for line in lines)
    ck = checkpoint.load(run / "last.pt")
    assert ck["amp"] == "fp16" and ck["scaler"]["scale"] > 0  # the scaler ran
    assert [p["amp"] for p in [*s["provenance"]["earlier"], s["provenance"]]] == ["bf16", "fp16"]


# ---- each rank's own RNG states


def test_each_rank_saves_and_restores_its_own_rng_states(monkeypatch, tmp_path):
    """Two ranks, each with its own CPU and CUDA generator states: last.pt keeps both, and on resume
    rank 1 restores rank 1's, not rank 0's (torch.cuda stands in: there is no GPU here)."""
    torch.manual_seed(0)
    mine = checkpoint.rng_state(torch.device("cpu"))["ranks"][0]
    torch.manual_seed(1)
    other = {**checkpoint.rng_state(torch.device("cpu"))["ranks"][0]}
    cuda_states = {0: torch.full((16,), 0, dtype=torch.uint8), 1: torch.full((16,), 1, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: cuda_states[device.index])
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    # what rank 0 (on cuda:0) gathers from rank 1 (on cuda:1)
    monkeypatch.setattr(fdist, "all_gather_object", lambda own: [own, {**other, "cuda_device": cuda_states[1]}])
    torch.set_rng_state(mine["torch"])
    saved = checkpoint.rng_state(torch.device("cuda", 0))
    assert len(saved["ranks"]) == 2 and torch.equal(saved["ranks"][0]["cuda_device"], cuda_states[0])
    checkpoint.save(tmp_path / "rng.pt", saved)
    saved = checkpoint.torch_load(tmp_path / "rng.pt")  # as resume reads it: tensors and plain data only

    checkpoint.set_rng_state(saved, rank=1, world=2, device=torch.device("cuda", 1))
    assert torch.equal(torch.get_rng_state(), other["torch"])
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_states[1]) and restored[0][1] == torch.device("cuda", 1)
    checkpoint.set_rng_state(saved, rank=0, world=2, device=torch.device("cuda", 0))
    assert torch.equal(torch.get_rng_state(), mine["torch"]) and torch.equal(restored[-1][0], cuda_states[0])
    # resumed on 3 ranks: the data is sharded otherwise, so every rank takes rank 0's
    checkpoint.set_rng_state(saved, rank=2, world=3, device=torch.device("cuda", 2))
    assert torch.equal(restored[-1][0], cuda_states[0]) and restored[-1][1] == torch.device("cuda", 2)


# ---- more epochs on resume


def test_more_epochs_on_resume_continue_at_the_schedules_final_lr(store_dir, tmp_path):
    """A finished 1-epoch cosine run resumed for 2: the schedule keeps its 1-epoch horizon, so the
    first new step's LR is the schedule's final LR (no jump back up), and so is every later one."""
    run = tmp_path / "run"
    recipe = lambda epochs: tiny(train__epochs=epochs, schedule__kind="cosine", schedule__final_lr=0.1, data__subset=0.3,
                                 data__test_subset=0.1)
    T.train(recipe(1), info(), out=run, data_dir=store_dir, **QUIET)
    ck = checkpoint.load(run / "last.pt")
    steps, peak = ck["step"], peak_lr(recipe(1).optim, 50)
    assert ck["schedule_epochs"] == 1
    last_lr = metrics(run)[0]["lr"]  # the LR of the first run's last step
    assert last_lr == pytest.approx(peak * lr_factor(steps - 1, steps, recipe(1).schedule))
    lrs, lines = [], []

    def setup(trainer):
        step = trainer.train_step

        def spy(*args):
            lrs.append(trainer.optimizer.param_groups[0]["lr"])  # the LR this step uses
            return step(*args)

        trainer.train_step = spy

    with T.Trainer(recipe(2), {}, resume=run, data_dir=store_dir, log=lines.append) as trainer:
        setup(trainer)
        s = trainer.fit()
    assert s["finished"] and s["epochs_done"] == 2 and len(lrs) == steps
    assert lrs == pytest.approx([0.1 * peak] * steps)  # the final LR from the first new step on
    assert lrs[0] < last_lr  # down from the last LR of the first run, not back up: no jump at the resume point
    assert any(f"keeps the 1 epoch it was built for; epoch 2 trains at its final LR {0.1 * peak:.3g}" in l for l in lines)
    assert checkpoint.load(run / "last.pt")["schedule_epochs"] == 1  # and a later resume keeps it too


def test_more_epochs_past_a_schedule_that_ends_at_lr_0_are_refused(store_dir, tmp_path):

    run = tmp_path / "run"
    T.train(tiny(train__epochs=1, schedule__final_lr=0.0, data__subset=0.1, data__test_subset=0.1), info(), out=run,
            data_dir=store_dir, **QUIET)
    before = (run / "last.pt").read_bytes()
    code, _, err = cli("train", "--resume", run, "--set", "train.epochs=2")
    assert code == 2 and one_paragraph(err), err
    err = " ".join(err.split())
    assert "ends at LR 0" in err and "would train nothing" in err and "model.init_from=" in err, err
    assert (run / "last.pt").read_bytes() == before
    # a run stopped before its horizon may still be resumed to it, and a constant schedule extended
    with pytest.raises(BadInput, match="ends at LR 0"):
        T.check_resume(tiny(train__epochs=4, schedule__final_lr=0.0), {"recipe": config.to_dict(
            tiny(train__epochs=3, schedule__final_lr=0.0)), "epoch": 1, "schedule_epochs": 3}, run)
    T.check_resume(tiny(train__epochs=3, schedule__final_lr=0.0), {"recipe": config.to_dict(
        tiny(train__epochs=3, schedule__final_lr=0.0)), "epoch": 1, "schedule_epochs": 3}, run)
    T.check_resume(tiny(train__epochs=9, schedule__kind="constant"), {"recipe": config.to_dict(
        tiny(train__epochs=3, schedule__kind="constant")), "epoch": 3, "schedule_epochs": 3}, run)


# ---- mid-epoch resume: the global RNG (dropout) and the DALI backend continue exactly


@pytest.mark.parametrize("fields", [
    pytest.param(dict(model__drop_rate=0.5, model__drop_path=0.2), id="dropout_droppath"),
    pytest.param(dict(data__backend="dali"), id="dali", marks=needs_dali),
])
def test_mid_epoch_resume_matches_a_straight_run(store_dir, tmp_path, fields):
    """Dropout and drop path (stochastic depth) draw from torch's global RNG, which only a restored
    RNG state reproduces; the DALI backend (CPU mode) must train, stop mid-epoch, resume and evaluate
    like the torch one."""
    # 400 train images (8 batches an epoch, the stop after the 7th) and 60 test images
    s = resume_matches_straight(tiny(train__epochs=2, data__subset=0.4, data__test_subset=0.2, **fields), store_dir,
                                tmp_path, batch=6)
    assert s["backend"] == ("dali-cpu" if fields.get("data__backend") == "dali" else "torch")
