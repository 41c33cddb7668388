"""Heads: shapes and gradients for every head; the margin goes on the target class exactly when
labels are given; ArcFace is cos(theta + m), falls back past theta = pi - m so the target logit
keeps falling with theta, and its two gradient modes give the gradients they name; the evaluation
logits are s * cos or the plain cosine; everything stays finite at cosine +-1 under bf16."""

import math

import pytest
import torch

from fastcifar.config import Head
from fastcifar.heads import HEADS, MARGIN_GRADS

N, C, K = 8, 32, 10  # batch, feature width, classes


def make(kind, **kw):
    torch.manual_seed(0)
    return HEADS[kind](C, K, Head(kind=kind, embed_dim=16, **kw))


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_shapes_and_gradients(kind):
    head = make(kind).train()
    x = torch.randn(N, C, requires_grad=True)
    y = torch.randint(0, K, (N,))
    logits = head(x, y)
    assert logits.shape == (N, K) and logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.eval()(x).shape == (N, K)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_margin_on_the_target_exactly_when_labels_are_given(kind, mode):
    """Labels mean the margin, in either mode (the KD teacher gets it in eval mode too); evaluation
    passes none."""
    head = make(kind, s=10.0, m=0.3).train(mode == "train")
    head.bn.eval()  # same normalisation in every call, so only the margin can differ
    x, y = torch.randn(N, C), torch.randint(0, K, (N,))
    with_t, without = head(x, y), head(x)
    assert torch.allclose(without, head.cosine(x) * 10.0)
    changed = with_t != without
    assert changed[torch.arange(N), y].all()            # the target logit moves ...
    changed[torch.arange(N), y] = False
    assert not changed.any()                            # ... and nothing else does
    assert (with_t[torch.arange(N), y] < without[torch.arange(N), y]).all()  # a margin makes it harder


@pytest.mark.parametrize("grad", MARGIN_GRADS)
def test_arcface_is_cos_theta_plus_m_and_cosface_cos_minus_m(grad):
    s, m = 8.0, 0.35
    x, y = torch.randn(N, C), torch.randint(0, K, (N,))
    arc, cos = make("arcface", s=s, m=m, margin_grad=grad), make("cosface", s=s, m=m, margin_grad=grad)
    for head in (arc, cos):
        head.train()
        head.bn.eval()
    c = arc.cosine(x)[torch.arange(N), y].double()
    assert (c > -math.cos(m)).all()  # random features: all on the cos(theta + m) branch
    got = arc(x, y)[torch.arange(N), y].double() / s
    want = torch.tensor([math.cos(math.acos(v) + m) for v in c.tolist()], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-5)
    c = cos.cosine(x)[torch.arange(N), y].double()
    assert torch.allclose(cos(x, y)[torch.arange(N), y].double() / s, c - m, atol=1e-5)


@pytest.mark.parametrize("grad", MARGIN_GRADS)
@pytest.mark.parametrize("m", [0.35, 0.5, math.pi / 2])
def test_arcface_target_logit_keeps_falling_as_theta_grows(grad, m):
    """cos(theta + m) turns back up past theta = pi - m; the fallback cos(theta) - m sin(m) takes
    over there, so over the whole range cos = -1..1 the target's value never rises with theta."""
    head = make("arcface", s=8.0, m=m, margin_grad=grad)
    c = torch.linspace(-1, 1, 4001, dtype=torch.float32)[:, None]
    t = head.with_margin(c).squeeze(1).double()
    assert (t[1:] >= t[:-1]).all()  # rising in cos = falling in theta
    past = c.squeeze(1) < -math.cos(m)  # theta > pi - m
    assert past.sum() > 10
    assert torch.allclose(t[past], c.squeeze(1)[past].double() - m * math.sin(m), atol=1e-6)
    inside = (c.squeeze(1) > -math.cos(m) + 1e-3) & (c.squeeze(1) < 1 - 1e-3)
    assert torch.allclose(t[inside], torch.cos(torch.acos(c.squeeze(1)[inside].double()) + m), atol=1e-5)


def target_gradients(grad, kind="arcface", s=8.0, m=0.35):
    """(target cosines, d target logit / d its cosine, d other logits / d their cosines) through
    the head's forward, with the cosines as the leaf."""
    head = make(kind, s=s, m=m, margin_grad=grad).train()
    cos_t = torch.tensor([-0.99, -0.95, -0.5, 0.0, 0.3, 0.7, 0.95, 0.99])
    cos = torch.full((N, K), 0.1)
    y = torch.arange(N) % K
    cos[torch.arange(N), y] = cos_t
    cos.requires_grad_(True)
    head.cosine = lambda features: cos  # the head's own cosine, replaced by a leaf we can differentiate by
    logits = head(torch.zeros(N, C), y)
    (g,) = torch.autograd.grad(logits[torch.arange(N), y].sum(), cos, retain_graph=True)
    others = torch.ones(N, K, dtype=torch.bool)
    others[torch.arange(N), y] = False
    (g_other,) = torch.autograd.grad(logits[others].sum(), cos)
    return cos_t.double(), g[torch.arange(N), y].double(), g_other[others]


def test_straight_through_gradient_is_s_on_the_target_cosine():
    c, g, g_other = target_gradients("straight_through")
    assert torch.allclose(g, torch.full_like(g, 8.0))  # as if no margin were there: factor s
    assert torch.allclose(g_other, torch.full_like(g_other, 8.0))


def test_exact_gradient_scales_by_sin_theta_plus_m_over_sin_theta():
    s, m = 8.0, 0.35
    c, g, g_other = target_gradients("exact", s=s, m=m)
    theta = torch.acos(c)
    arc = c > -math.cos(m)
    assert arc.sum() == 6 and (~arc).sum() == 2
    assert torch.allclose(g[arc], s * torch.sin(theta[arc] + m) / torch.sin(theta[arc]), rtol=1e-4)
    assert torch.allclose(g[~arc], torch.full_like(g[~arc], s))  # the fallback cos - m sin m: slope 1
    assert not torch.allclose(g[arc], torch.full_like(g[arc], s), rtol=0.05)  # the two modes really differ
    assert torch.allclose(g_other, torch.full_like(g_other, s))


def test_cosface_gradient_modes_agree():
    a, b = target_gradients("exact", "cosface"), target_gradients("straight_through", "cosface")
    assert torch.allclose(a[1], b[1]) and torch.allclose(a[1], torch.full_like(a[1], 8.0))


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_eval_logits_scaled_or_plain_cosine_same_ranking(kind):
    x, y = torch.randn(N, C), torch.randint(0, K, (N,))
    scaled = make(kind, s=8.0, m=0.35, eval_logits="scaled").eval()
    plain = make(kind, s=8.0, m=0.35, eval_logits="cosine").eval()
    cos = scaled.cosine(x)
    assert torch.allclose(scaled(x), 8.0 * cos) and torch.allclose(plain(x), cos)
    assert torch.equal(scaled(x).argmax(1), plain(x).argmax(1))  # accuracy: unchanged
    assert torch.allclose(plain(x, y), scaled(x, y))  # training logits: s-scaled in both
    ce = torch.nn.functional.cross_entropy
    assert not math.isclose(ce(scaled(x), y).item(), ce(plain(x), y).item(), rel_tol=1e-3)  # the reported loss differs


@pytest.mark.parametrize("grad", MARGIN_GRADS)
def test_arcface_finite_at_cosine_plus_minus_one_in_bf16(grad):
    """Features pointing exactly at (or away from) their class centre give cosine +-1; acos' slope
    is infinite there, so without clamping the logits or gradients would be NaN."""
    d = 16
    head = HEADS["arcface"](d, K, Head(kind="arcface", embed_dim=d, s=64.0, m=0.5, margin_grad=grad))
    with torch.no_grad():
        head.embed.weight.copy_(torch.eye(d))
        head.weight.copy_(torch.eye(K, d))
    head.train()
    head.bn.eval()  # running mean 0, var 1: the embedding is the feature itself (up to eps)
    y = torch.arange(4) % K
    feats = torch.eye(K, d)[y] * 3.0
    feats[2:] *= -1  # two at cosine +1, two at cosine -1 to their class centre
    feats.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(feats, y)
    c = head.cosine(feats.detach())[torch.arange(4), y]
    assert torch.allclose(c.abs(), torch.ones(4), atol=1e-3)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert torch.isfinite(feats.grad).all()
    assert torch.isfinite(head.weight.grad).all() and torch.isfinite(head.embed.weight.grad).all()


def test_linear_head_logits_are_fp32_under_autocast_so_near_ties_keep_their_order():
    """Class 1's logit is 2**-9 above class 0's: bf16 (8-bit mantissa) would round both to 1.0 and
    top-1 would pick class 0; fp32 logits keep the order (evaluation's top-1/top-5 read them)."""
    from fastcifar.heads import LinearHead

    head = LinearHead(2, 2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        head.fc.bias.zero_()
    x = torch.tensor([[1.0, 2.0 ** -9]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
    assert logits.dtype == torch.float32 and logits.argmax(1).item() == 1


def test_linear_head_takes_bf16_features_and_gives_fp32_logits():
    """Under autocast the backbone's pooled features come in bf16; the head casts them to fp32 itself
    (inside its autocast-off block a bf16 input against fp32 weights would be a dtype error)."""
    from fastcifar.heads import LinearHead

    torch.manual_seed(0)
    head = LinearHead(C, K)
    x = torch.randn(N, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x.bfloat16())
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, head(x.bfloat16().float()))


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_cosine_is_the_cosine_to_each_class_centre(kind):
    """Both the embedding and the class weights are L2-normalised: the values are true cosines
    (in -1..1, not changed by rescaling a class centre) and match a hand computation."""
    head = make(kind).eval()
    x = torch.randn(N, C)
    with torch.no_grad():
        e = head.bn(head.embed(x))
        w = head.weight
        want = (e @ w.T) / (e.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :])
        got = head.cosine(x)
        assert torch.allclose(got, want, atol=1e-5)
        head.weight[3] *= 50.0  # a class centre's length says nothing about the angle to it
        assert torch.allclose(head.cosine(x), got, atol=1e-5)
