"""Losses return dicts of parts; CE handles hard, smoothed and soft targets; the KD loss is 0 when
student equals teacher and matches a hand computation; the objectives: KD with the margin on the
teacher and its BatchNorm modes, multi-scale training."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcifar.losses import cross_entropy, distillation, soft_cross_entropy


def test_cross_entropy_hard_and_smoothed_match_torch():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    out = cross_entropy(logits, y)
    assert set(out) >= {"loss", "ce"}
    assert torch.allclose(out["loss"], F.cross_entropy(logits, y))
    assert torch.allclose(cross_entropy(logits, y, 0.1)["loss"], F.cross_entropy(logits, y, label_smoothing=0.1))


def test_soft_targets_one_hot_smoothing_and_mixup_identity():
    torch.manual_seed(1)
    logits, a, b = torch.randn(6, 5), torch.randint(0, 5, (6,)), torch.randint(0, 5, (6,))
    one_hot = F.one_hot(a, 5).float()
    assert torch.allclose(cross_entropy(logits, one_hot)["loss"], F.cross_entropy(logits, a))
    assert torch.allclose(soft_cross_entropy(logits, one_hot, 0.2), F.cross_entropy(logits, a, label_smoothing=0.2))
    lam = 0.3  # a MixUp target is linear in the two labels, and so is CE
    mixed = lam * one_hot + (1 - lam) * F.one_hot(b, 5).float()
    want = lam * F.cross_entropy(logits, a) + (1 - lam) * F.cross_entropy(logits, b)
    assert torch.allclose(cross_entropy(logits, mixed)["loss"], want, atol=1e-6)


def test_kd_is_zero_when_student_equals_teacher():
    torch.manual_seed(2)
    logits, y = torch.randn(5, 7) * 3, torch.randint(0, 7, (5,))
    out = distillation(logits, y, logits.clone(), alpha=0.7, temperature=4.0)
    assert abs(out["kd"].item()) < 1e-6
    assert torch.allclose(out["loss"], 0.3 * F.cross_entropy(logits, y))


def test_kd_matches_hand_computation():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
    y = [1, 2]
    a, T = 0.7, 2.0

    def softmax(v, temp):
        e = [math.exp(x / temp) for x in v]
        return [x / sum(e) for x in e]

    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(ti, T), softmax(si, T))) for si, ti in zip(s, t)) / 2
    ce = sum(-math.log(softmax(si, 1.0)[yi]) for si, yi in zip(s, y)) / 2
    out = distillation(torch.tensor(s), torch.tensor(y), torch.tensor(t), alpha=a, temperature=T)
    assert math.isclose(out["kd"].item(), T * T * kl, rel_tol=1e-5)
    assert math.isclose(out["ce"].item(), ce, rel_tol=1e-5)
    assert math.isclose(out["loss"].item(), (1 - a) * ce + a * T * T * kl, rel_tol=1e-5)


def test_kd_ce_term_is_label_smoothed_in_the_loss_and_the_objective():
    """distill.label_smoothing reaches the CE term, both in distillation() and through Distill
    (a dropped argument would train KD runs without the smoothing their recipe asks for)."""
    from fastcifar.losses import Distill
    from fastcifar.runtime import autocast

    torch.manual_seed(4)
    s, t, y = torch.randn(6, 5) * 3, torch.randn(6, 5), torch.randint(0, 5, (6,))
    smoothed = F.cross_entropy(s, y, label_smoothing=0.2)
    assert not torch.allclose(smoothed, F.cross_entropy(s, y))
    out = distillation(s, y, t, alpha=0.7, temperature=4.0, label_smoothing=0.2)
    assert torch.allclose(out["ce"], smoothed) and torch.allclose(out["loss"], 0.3 * smoothed + 0.7 * out["kd"])
    student, teacher = Recorder(12), Recorder(12)
    x = torch.randn(6, 3, 2, 2)
    got = Distill(student, teacher, autocast(torch.device("cpu"), "none"), 0.7, 4.0, label_smoothing=0.2)((x, x), y, y)
    assert torch.allclose(got["ce"], F.cross_entropy(got["logits"], y, label_smoothing=0.2))


def test_kd_sends_no_gradient_to_the_teacher_and_computes_in_fp32():
    s = torch.randn(4, 6, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.bfloat16, requires_grad=True)
    out = distillation(s, torch.randint(0, 6, (4,)), t)
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert s.grad is not None and t.grad is None


# ---- the objectives a training step optimises (each tested on its own, as timm tests its tasks)


class Recorder(torch.nn.Module):
    """A linear 'net' that records what it was called with (and whether autocast was on)."""

    def __init__(self, in_features=12, classes=5):
        super().__init__()
        self.fc = torch.nn.Linear(in_features, classes)
        self.calls = []

    def forward(self, x, targets=None):
        self.calls.append((x.shape, targets, torch.is_autocast_enabled("cpu")))
        return self.fc(x.flatten(1))


def test_classify_passes_labels_to_the_net_under_autocast_and_returns_logits():
    from fastcifar.losses import Classify
    from fastcifar.runtime import autocast

    torch.manual_seed(0)
    net, x, y = Recorder(), torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    out = Classify(net, autocast(torch.device("cpu"), "bf16"), label_smoothing=0.1)(x, y, y)
    assert net.calls == [((4, 3, 2, 2), y, True)]  # margin heads need the labels; autocast was on
    assert out["logits"].dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
    assert torch.allclose(out["loss"], F.cross_entropy(out["logits"].float(), y, label_smoothing=0.1))
    out["loss"].backward()
    assert net.fc.weight.grad is not None


def test_distill_feeds_each_net_its_view_and_never_trains_the_teacher():
    from fastcifar.losses import Distill
    from fastcifar.runtime import autocast

    torch.manual_seed(1)
    student, teacher = Recorder(12), Recorder(48)
    x_s, x_t, y = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 4, 4), torch.tensor([4, 3, 2, 1])
    soft = F.one_hot(y, 5).float() * 0.8 + 0.04  # targets may be soft (MixUp) while labels stay hard
    out = Distill(student, teacher, autocast(torch.device("cpu"), "none"), alpha=0.7, temperature=4.0)((x_s, x_t), y, soft)
    assert student.calls[0][0] == (4, 3, 2, 2) and torch.equal(student.calls[0][1], y)
    assert teacher.calls[0][0] == (4, 3, 4, 4) and teacher.calls[0][1] is None  # the teacher: no margin
    want = distillation(student.fc(x_s.flatten(1)), soft, teacher.fc(x_t.flatten(1)), 0.7, 4.0)
    assert torch.allclose(out["loss"], want["loss"]) and torch.allclose(out["kd"], want["kd"])
    out["loss"].backward()
    assert student.fc.weight.grad is not None and teacher.fc.weight.grad is None


# ---- distillation as the tutorial ran it: the margin on both, the teacher's BatchNorm


def margin_net(seed: int, s: float = 8.0, m: float = 0.35, features: int = 12, classes: int = 5):
    """Flatten -> Linear -> BatchNorm1d -> ArcFace head: a small Net with a margin and batch statistics."""
    from fastcifar.config import Head
    from fastcifar.heads import HEADS
    from fastcifar.models import Net

    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(features, 16), torch.nn.BatchNorm1d(16))
    return Net(backbone, HEADS["arcface"](16, classes, Head(kind="arcface", s=s, m=m, embed_dim=8)))


@pytest.mark.parametrize("teacher_margin", [False, True])
def test_distill_puts_the_margin_on_the_teachers_logits_when_asked(teacher_margin):
    from fastcifar.losses import Distill
    from fastcifar.runtime import autocast

    student, teacher = margin_net(0).train(), margin_net(1).requires_grad_(False)
    x_s, x_t, y = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 4, 0])
    out = Distill(student, teacher, autocast(torch.device("cpu"), "none"), 0.7, 4.0,
                  teacher_margin=teacher_margin, teacher_bn="eval")((x_s, x_t), y, y)
    with torch.no_grad():
        t_margin, t_plain = teacher(x_t, y), teacher(x_t)
    assert not torch.allclose(t_margin, t_plain)
    want = distillation(student(x_s, y), y, t_margin if teacher_margin else t_plain, 0.7, 4.0)
    assert torch.allclose(out["kd"], want["kd"]) and torch.allclose(out["loss"], want["loss"])
    assert torch.allclose(out["logits"], student(x_s, y))  # the student's logits carry the margin in both


@pytest.mark.parametrize("teacher_bn", ["eval", "train"])
def test_teacher_batchnorm_modes(teacher_bn):
    """train: batch statistics, and the frozen teacher's running statistics keep moving (the
    tutorial's teacher); eval: running statistics, which stay as loaded."""
    from fastcifar.losses import Distill
    from fastcifar.runtime import autocast

    student, teacher = margin_net(0).train(), margin_net(1).requires_grad_(False)
    bn = teacher.backbone[2]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = Distill(student, teacher, autocast(torch.device("cpu"), "none"), 0.7, 4.0, teacher_margin=True,
                 teacher_bn=teacher_bn)
    x_s, x_t, y = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2) * 3 + 1, torch.tensor([0, 1, 2, 3, 4, 0])
    out = kd((x_s, x_t), y, y)
    out["loss"].backward()
    assert teacher.training == (teacher_bn == "train") and bn.training == (teacher_bn == "train")
    moved = not torch.equal(bn.running_mean, before["backbone.2.running_mean"])
    assert moved == (teacher_bn == "train")
    assert bn.num_batches_tracked.item() == (1 if teacher_bn == "train" else 0)
    assert all(p.grad is None for p in teacher.parameters())  # frozen either way
    params = {k: v for k, v in teacher.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, before[k]) for k, v in params.items())


# ---- multi-scale training: each image at one scale, a forward per scale, one CE


class PerImage(torch.nn.Module):
    """A net with no batch coupling (so one image's logits do not depend on the others), that
    records each call's input size and labels."""

    def __init__(self, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 4, classes)
        self.calls = []

    def forward(self, x, targets=None):
        self.calls.append((x.shape[0], x.shape[-1], targets))
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # any size -> (N, 12)
        return self.fc(pooled) * x.shape[-1] / 32  # the size shows in the logits


def multiscale(step=0, seed=0, rank=0, ls=0.0, net=None):
    from fastcifar.losses import MultiScale
    from fastcifar.runtime import autocast

    return MultiScale(net or PerImage(), autocast(torch.device("cpu"), "none"), seed, rank, lambda: step, ls)


def test_multiscale_trains_each_image_at_its_drawn_scale_with_one_ce():
    torch.manual_seed(3)
    n = 40
    small, large = torch.randn(n, 3, 32, 32), torch.randn(n, 3, 64, 64)
    y = torch.randint(0, 5, (n,))
    obj = multiscale(step=7, ls=0.1)
    pick = obj.scale_of(n, 2)
    assert 0 < pick.sum() < n
    out = obj((small, large), y, y)
    net = obj.net
    assert [c[:2] for c in net.calls] == [(int((pick == 0).sum()), 32), (int((pick == 1).sum()), 64)]
    assert torch.equal(net.calls[0][2], y[torch.from_numpy(pick == 0)])  # each forward gets its labels (the margin)
    assert torch.equal(net.calls[1][2], y[torch.from_numpy(pick == 1)])
    with torch.no_grad():  # back in the batch's order, image by image
        want = torch.stack([net(large[i:i + 1] if pick[i] else small[i:i + 1])[0] for i in range(n)])
    assert torch.allclose(out["logits"], want, atol=1e-6)
    assert torch.allclose(out["loss"], F.cross_entropy(want, y, label_smoothing=0.1), atol=1e-6)  # one CE over both
    out["loss"].backward()
    assert net.fc.weight.grad is not None


def test_multiscale_draws_are_a_function_of_seed_step_and_rank():
    n = 250
    a = multiscale(step=5).scale_of(n, 2)
    assert np.array_equal(a, multiscale(step=5).scale_of(n, 2))  # a resumed run draws the same
    for other in (multiscale(step=6), multiscale(step=5, seed=1), multiscale(step=5, rank=1)):
        assert not np.array_equal(a, other.scale_of(n, 2))
    assert 0.4 < a.mean() < 0.6  # p = 0.5 for each of two scales
    assert set(multiscale(step=5).scale_of(n, 3)) == {0, 1, 2}


def test_multiscale_never_trains_batchnorm_on_a_single_image():
    obj = multiscale()
    for step in range(200):
        obj.step = lambda: step
        counts = np.bincount(obj.scale_of(5, 2), minlength=2)
        assert 1 not in counts, (step, counts)
    x = (torch.randn(3, 3, 32, 32), torch.randn(3, 3, 64, 64))
    for step in range(50):  # a whole batch at one scale: one forward, no empty one
        obj = multiscale(step=step)
        out = obj(x, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
        assert sum(c[0] for c in obj.net.calls) == 3 and all(c[0] >= 2 for c in obj.net.calls)
        assert out["logits"].shape == (3, 5)
