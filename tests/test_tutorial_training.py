"""The tutorial's experiments as training runs on a CPU: model.init_from (its is_restore),
distillation with the margin on the teacher and its BatchNorm in train mode, multi-scale
training that resumes exactly."""

import os
import pickle

import pytest
import torch

import fastcifar.train as T
from fastcifar import checkpoint
from fastcifar.errors import BadInput
from fastcifar.models import build_model, init_from
from helpers import QUIET, cli, fit, info, interrupt_at, resume_matches_straight, tiny


# ---- model.init_from


def test_init_from_starts_from_the_earlier_runs_last_weights(store_dir, earlier_run, tmp_path):
    said, start = [], {}

    def grab(trainer):
        start.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    with T.Trainer(tiny(train__epochs=1, data__subset=0.3, model__init_from=str(earlier_run)), info(),
                   out=tmp_path / "run", data_dir=store_dir, log=said.append) as trainer:
        grab(trainer)
        s = trainer.fit()
    last = checkpoint.load(earlier_run / "last.pt")["model"]
    assert set(start) == set(last) and all(torch.equal(start[k], last[k]) for k in last)
    line = next(l for l in said if l.startswith("Weights from"))
    assert f"{len(last)} of {len(last)} tensors loaded" in line and str(earlier_run / "last.pt") in line
    assert s["finished"]
    # fresh weights would look different: the start really came from the file
    fresh = build_model(tiny().model, tiny().head, 100).state_dict()
    assert not all(torch.equal(fresh[k], last[k]) for k in last)


def test_init_from_reports_missing_and_unexpected_keys(earlier_run):
    r = tiny(head__kind="arcface")
    torch.manual_seed(0)
    net = build_model(r.model, r.head, 100)
    head_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("head.")}
    said = []
    rep = init_from(net, str(earlier_run), log=said.append)
    assert rep["unexpected"] == ["head.fc.weight", "head.fc.bias"]  # the earlier run's linear head
    assert set(rep["missing"]) == set(head_before)  # the margin head: kept as built
    assert all(k.startswith("backbone.") for k in rep["loaded"]) and rep["other_shape"] == []
    assert all(torch.equal(net.state_dict()[k], v) for k, v in head_before.items())
    assert "unexpected 2 (head.fc.weight, head.fc.bias)" in said[0] and "missing there" in said[0]


def test_init_from_skips_and_reports_tensors_of_another_shape(earlier_run):
    r = tiny()
    net = build_model(r.model, r.head, 10)  # 10 classes: the head's fc has another shape
    rep = init_from(net, str(earlier_run), log=lambda *a: None)
    assert sorted(rep["other_shape"]) == ["head.fc.bias (100,) vs (10,)", "head.fc.weight (100, 96) vs (10, 96)"]


def test_init_from_nothing_matching_is_bad_input_and_exits_2(store_dir, tmp_path, monkeypatch):
    ck = {"model": {"some.other.weight": torch.zeros(3)}, "recipe": {}}
    torch.save(ck, tmp_path / "other.pt")
    net = build_model(tiny().model, tiny().head, 100)
    with pytest.raises(BadInput, match="no weight in .*other.pt fits this model"):
        init_from(net, str(tmp_path / "other.pt"))
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("train", "smoke", "--data-dir", store_dir, "--out", "run", "--set", "data.backend=torch",
                       "--set", "model.init_from=other.pt")
    assert code == 2 and "model.init_from = 'other.pt'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing half-written


class Boom:
    """A pickle that runs code when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("what", ["missing", "a directory", "text", "hostile pickle", "tensor", "system file"])
def test_init_from_bad_sources_are_bad_input(tmp_path, what):
    marker = tmp_path / "pwned"
    ref = {"missing": str(tmp_path / "nope" / "last.pt"), "a directory": str(tmp_path),
           "text": str(tmp_path / "notes.txt"), "hostile pickle": str(tmp_path / "evil.pt"),
           "tensor": str(tmp_path / "tensor.pt"), "system file": "/etc/passwd"}[what]
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Boom(str(marker)), "recipe": {}}, protocol=2))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    net = build_model(tiny().model, tiny().head, 100)
    with pytest.raises(BadInput, match="model.init_from = "):
        init_from(net, ref)
    assert not marker.exists()  # loading ran no code


def test_resume_does_not_reload_init_from(store_dir, earlier_run, tmp_path):
    """A resumed run's weights come from its own last.pt, even if init_from's file is gone."""
    src = tmp_path / "src"
    os.symlink(earlier_run, src)
    recipe = tiny(train__epochs=2, data__subset=0.3, model__init_from=str(src))
    run = tmp_path / "run"
    interrupt_at(recipe, run, store_dir, epoch=1, batch=2)
    os.unlink(src)
    s = T.train(recipe, {}, data_dir=store_dir, resume=run, **QUIET)
    assert s["finished"] and s["epochs_done"] == 2


# ---- distillation as the tutorial ran it


@pytest.mark.parametrize("teacher_bn", ["train", "eval"])
def test_kd_run_margin_on_both_and_the_teachers_batchnorm(store_dir, arc_teacher, tmp_path, teacher_bn):
    seen, bn = [], {}

    def spy(trainer):
        teacher = trainer.teacher
        assert teacher.head.eval_scale == teacher.head.s == 8.0  # KD's T applies to s-scaled logits
        bn["module"] = next(m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn["before"] = bn["module"].running_mean.clone()
        teacher.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[1])))

    recipe = tiny(train__epochs=1, data__subset=0.2, head__kind="arcface", head__s=8.0, head__m=0.35,
                  distill__teacher=str(arc_teacher), distill__teacher_margin=True, distill__teacher_bn=teacher_bn)
    s = fit(recipe, info(), out=tmp_path / "run", data_dir=store_dir, setup=spy)
    assert s["finished"] and seen
    assert all(training == (teacher_bn == "train") for training, _ in seen)
    assert all(labels is not None and labels.dtype == torch.int64 for _, labels in seen)  # the margin: true labels
    moved = not torch.equal(bn["module"].running_mean, bn["before"])
    assert moved == (teacher_bn == "train")  # train mode keeps moving its running statistics


def test_kd_without_teacher_margin_gives_the_teacher_no_labels(store_dir, arc_teacher, tmp_path):
    seen = []
    fit(tiny(train__epochs=1, data__subset=0.2, distill__teacher=str(arc_teacher)), info(), out=tmp_path / "run",
        data_dir=store_dir, setup=lambda t: t.teacher.register_forward_pre_hook(lambda m, a: seen.append(a[1:])))
    assert seen and all(a == (None,) for a in seen)


# ---- multi-scale training


def test_multiscale_run_trains_both_scales_and_tests_at_one(store_dir, tmp_path):
    sizes = {"train": set(), "eval": set()}

    def spy(trainer):
        trainer.model.register_forward_pre_hook(
            lambda m, args: sizes["train" if m.training else "eval"].add(args[0].shape[-1]))

    s = fit(tiny(train__epochs=1, data__subset=0.3, loss__scales=(32, 48), head__kind="arcface"), info(), out=tmp_path / "run",
            data_dir=store_dir, setup=spy)
    assert s["finished"] and sizes == {"train": {32, 48}, "eval": {32}}


def test_multiscale_mid_epoch_resume_matches_a_straight_run(store_dir, tmp_path):
    resume_matches_straight(tiny(train__epochs=1, data__subset=0.4, loss__scales=(32, 48)), store_dir, tmp_path,
                            batch=3)

