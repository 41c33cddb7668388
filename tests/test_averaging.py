"""The EMA of the weights and test-time augmentation (fastcifar/averaging.py), and how the loop and
`fastcifar eval` use them: the documented average, no host sync, TTA on every loader backend, both
weights evaluated each epoch, selection on either, eval's --weights and --tta. (Exact resume with
an EMA: tests/test_train.py, the mid-epoch mixed case.)"""

import json
import math

import pytest
import torch
from torch import nn

import fastcifar.train as T
from fastcifar import checkpoint
from fastcifar.averaging import EMA, hflip, predict
from fastcifar.data import open_store
from fastcifar.pipelines.loader import dali_available, make_loader
from fastcifar.pipelines.spec import AugSpec
from fastcifar.errors import BadInput
from helpers import cli, copy_run, fit, info, metrics, one_paragraph, tiny


# ---- the EMA itself


def test_ema_is_the_documented_average_of_weights_and_batchnorm_statistics():
    """decay 0.9 per step, an update every 2 steps: each update moves weights and BN running stats
    1 - 0.9**2 of the way to the model's; BN's integer batch counter is copied; odd steps do nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.9, every=2, warmup=False)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 4) * step)  # training mode: moves BN's running mean/var and its counter
        ema.update(step)
        if step % 2 == 0:
            for k, v in model.state_dict().items():
                expected[k] = expected[k] + (1 - 0.9 ** 2) * (v - expected[k]) if v.is_floating_point() else v.clone()
        got = ema.state_dict()
        assert set(got) == set(expected)
        for k in expected:
            assert torch.allclose(got[k], expected[k], atol=1e-6), (step, k)
    assert int(got["1.num_batches_tracked"]) == 6
    assert not ema.module.training and ema.module is not model


def test_ema_warmup_ramps_the_decay_as_documented():
    model = nn.Linear(2, 2)
    warm, cold = EMA(model, 0.999, warmup=True), EMA(model, 0.999, warmup=False)
    assert [warm.decay_at(s) for s in (1, 8, 80, 890, 10 ** 6)] == pytest.approx([2 / 11, 0.5, 0.9, 0.99, 0.999])
    assert cold.decay_at(1) == cold.decay_at(10 ** 6) == 0.999


def test_ema_update_reads_nothing_back_from_the_device():
    """Meta tensors hold no data: any .item(), .tolist() or data-dependent branch on them raises, so an
    update that runs on them launches kernels and never waits for one (no host sync per step)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        model(torch.empty(2, 3, 8, 8))
    ema = EMA(model, decay=0.99, every=1)
    for step in range(1, 4):
        ema.update(step)
    assert ema.module[0].weight.device.type == "meta"


# ---- test-time augmentation


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(6, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    net(x)
    assert torch.equal(predict(net, x, "none"), net(x))
    assert torch.allclose(predict(net, x, "flip"), (net(x) + net(x.flip(3))) / 2, atol=1e-6)
    assert not torch.allclose(predict(net, x, "flip"), net(x))  # the net is not mirror-symmetric
    mirrored = hflip(x)
    assert mirrored.is_contiguous(memory_format=torch.channels_last) and torch.equal(mirrored, x.flip(3))


class LeftMinusRight(nn.Module):
    """Logits 10 x (left half's mean - right half's mean) for class 0, minus that for class 1, 0 for the
    rest: exactly antisymmetric under a left-right mirror, so flip TTA makes every logit 0."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes
        self.unused = nn.Parameter(torch.zeros(1))  # evaluate() finds the device from a parameter

    def forward(self, x):
        w = x.shape[3] // 2
        d = 10 * (x[..., :w].float().mean((1, 2, 3)) - x[..., w:].float().mean((1, 2, 3)))
        logits = torch.zeros(len(x), self.classes)
        logits[:, 0], logits[:, 1] = d, -d
        return logits


@pytest.mark.parametrize("backend", ["torch", "tutorial",
                                     pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                                   reason="DALI is not installed here"))])
def test_flip_tta_mirrors_the_batches_of_every_backend(store_dir, backend):
    """The mirror is made once, on the device after the loader: whichever backend made the batch,
    TTA flip gives all-zero logits here, so a mean cross-entropy of exactly ln(100)."""
    st = open_store(store_dir)
    loader = make_loader(st, "test", AugSpec(normalize="cifar"), 64, backend=backend, augment=False,
                         indices=torch.arange(100).numpy())
    net = LeftMinusRight(100)
    flipped, plain = T.evaluate(net, loader, tta="flip"), T.evaluate(net, loader, tta="none")
    assert flipped["images"] == plain["images"] == 100
    assert flipped["loss"] == pytest.approx(math.log(100), abs=1e-6)
    assert abs(plain["loss"] - math.log(100)) > 1e-2  # without TTA the images' asymmetry shows


# ---- the loop: both weights each epoch, selection on either, and eval's choices


def fixed_scores(raw_acc: list[float], ema_acc: list[float]):
    """A setup(trainer) that makes the k-th evaluation's accuracy raw_acc[k] for the raw weights,
    ema_acc[k] for the EMA's."""
    def setup(trainer):
        seen = {False: 0, True: 0}

        def evaluate(loader, ema=False):
            acc = (ema_acc if ema else raw_acc)[seen[ema]]
            seen[ema] += 1
            return {"acc": acc, "top5": min(100.0, acc + 10), "loss": 5 - acc / 100, "images": loader.num_samples}

        trainer.evaluate = evaluate

    return setup


@pytest.mark.parametrize("select_on", ["raw", "ema"])
def test_selection_follows_the_chosen_weights(store_dir, tmp_path, select_on):
    raw, ema = [10.0, 30.0, 20.0], [15.0, 12.0, 40.0]
    run = tmp_path / "run"
    s = fit(tiny(train__ema_decay=0.9, train__select_on=select_on, data__subset=0.2), info(), out=run,
            data_dir=store_dir, setup=fixed_scores(raw, ema))
    ms = metrics(run)
    assert [m["test_acc"] for m in ms] == raw and [m["test_acc_ema"] for m in ms] == ema
    assert all({"test_top5_ema", "test_loss_ema"} <= set(m) for m in ms)
    best_epoch, best_acc = (3, 40.0) if select_on == "ema" else (2, 30.0)
    assert (s["select_on"], s["best_epoch"], s["best_acc"]) == (select_on, best_epoch, best_acc)
    assert (s["final_acc"], s["final_acc_ema"]) == (20.0, 40.0)
    best = checkpoint.load(run / "best.pt")
    assert best["epoch"] == best_epoch and set(best["ema"]) == set(best["model"])


def test_validation_selection_on_the_ema_reports_val_ema_beside_val(store_dir, tmp_path):
    run = tmp_path / "run"
    fit(tiny(train__epochs=1, train__ema_decay=0.9, train__select_on="ema", data__val_split=0.2, data__subset=0.5),
        info(), out=run, data_dir=store_dir, setup=fixed_scores([10.0, 11.0], [20.0, 21.0]))
    m = metrics(run)[0]
    # test is evaluated first, then val: raw 10 (test), 11 (val); EMA 20 (test), 21 (val)
    assert (m["test_acc"], m["val_acc"], m["test_acc_ema"], m["val_acc_ema"]) == (10.0, 11.0, 20.0, 21.0)
    s = json.loads((run / "summary.json").read_text())
    assert (s["best_val_acc"], s["test_acc_at_best_val"], s["best_acc"]) == (21.0, 20.0, 20.0)


def test_the_loop_evaluates_raw_and_ema_weights_with_its_tta(store_dir, ema_run):
    """metrics.jsonl's test_* are the raw weights with flip TTA, test_*_ema the EMA's: `fastcifar eval`
    of last.pt with those choices gives the same figures, and other choices other ones."""
    m, s = metrics(ema_run)[0], json.loads((ema_run / "summary.json").read_text())
    assert s["tta"] == "flip" and s["select_on"] == "raw"
    ev = {w: T.evaluate_checkpoint(str(ema_run / "last.pt"), data_dir=store_dir, batch_size=64, device="cpu", weights=w)
          for w in ("auto", "raw", "ema")}
    assert (ev["auto"]["weights"], ev["raw"]["weights"], ev["ema"]["tta"]) == ("ema", "raw", "flip")  # the recipe's TTA
    assert ev["raw"]["loss"] == pytest.approx(m["test_loss"], rel=1e-5) and ev["raw"]["acc"] == pytest.approx(m["test_acc"])
    assert ev["ema"]["loss"] == pytest.approx(m["test_loss_ema"], rel=1e-5) and ev["ema"]["acc"] == pytest.approx(m["test_acc_ema"])
    assert ev["auto"]["loss"] == ev["ema"]["loss"] != ev["raw"]["loss"]
    plain = T.evaluate_checkpoint(str(ema_run / "last.pt"), data_dir=store_dir, batch_size=64, device="cpu",
                                  weights="raw", tta="none")
    assert plain["tta"] == "none" and plain["loss"] != pytest.approx(m["test_loss"], rel=1e-5)


def test_cli_eval_says_which_weights_and_tta_and_refuses_bad_choices(store_dir, ema_run, tmp_path):
    code, out, err = cli("eval", ema_run / "last.pt", "--data-dir", store_dir, "--device", "cpu",
                         "--tta", "none")
    assert code == 0 and "ema weights, TTA none" in out, err
    ck = checkpoint.load(ema_run / "last.pt")
    del ck["ema"]
    checkpoint.save(tmp_path / "raw_only.pt", ck)
    code, out, err = cli("eval", tmp_path / "raw_only.pt", "--data-dir", store_dir, "--device", "cpu")
    assert code == 0 and "raw weights, TTA flip" in out, err  # auto: no EMA in it, so the raw weights
    ck["ema"] = [1, 2, 3]
    checkpoint.save(tmp_path / "damaged.pt", ck)
    for ref, args, message in [("raw_only.pt", ("--weights", "ema"), "holds no EMA weights"),
                               ("raw_only.pt", ("--weights", "best"), "--weights 'best'"),
                               ("raw_only.pt", ("--tta", "rotate"), "--tta 'rotate'"),
                               ("damaged.pt", (), "EMA weights are a list, not a state dict")]:
        code, out, err = cli("eval", tmp_path / ref, "--data-dir", store_dir, *args)
        assert code == 2 and one_paragraph(err) and message in err.replace("\n", " "), (args, err)


def test_resuming_a_checkpoint_that_lost_its_ema_is_bad_input(ema_run, tmp_path):
    run = copy_run(ema_run, tmp_path / "run")
    ck = checkpoint.load(run / "last.pt")
    del ck["ema"]
    checkpoint.save(run / "last.pt", ck, by="train")  # damaged as if written so
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(BadInput, match="holds no EMA weights although its recipe keeps them"):
        T.train(tiny(train__epochs=2, train__ema_decay=0.9, train__tta="flip"), {}, resume=run, log=lambda *a, **k: None)
    assert (run / "metrics.jsonl").read_bytes() == before
