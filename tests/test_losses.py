"""Losses return dicts of parts; CE handles hard, smoothed and soft targets; the KD loss is 0 when
student equals teacher and matches a hand computation."""

import math

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
