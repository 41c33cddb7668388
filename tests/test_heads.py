"""Heads: shapes and gradients for every head; margins only in training with targets; ArcFace is
cos(theta + m) and stays finite at cosine +-1 under bf16 autocast."""

import math

import pytest
import torch

from fastcifar.config import Head
from fastcifar.heads import HEADS

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


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_margin_only_in_training_with_targets(kind):
    head = make(kind, s=10.0, m=0.3)
    x, y = torch.randn(N, C), torch.randint(0, K, (N,))
    head.eval()
    plain = head(x)
    assert torch.equal(head(x, y), plain)  # eval: targets change nothing
    head.train()
    head.bn.eval()  # same normalisation in both calls, so only the margin can differ
    with_t, without = head(x, y), head(x)
    assert torch.allclose(without, plain)
    changed = with_t != without
    assert changed[torch.arange(N), y].all()            # the target logit moves ...
    changed[torch.arange(N), y] = False
    assert not changed.any()                            # ... and nothing else does
    assert (with_t[torch.arange(N), y] < without[torch.arange(N), y]).all()  # a margin makes it harder


def test_arcface_is_cos_theta_plus_m_and_cosface_cos_minus_m():
    s, m = 8.0, 0.35
    x, y = torch.randn(N, C), torch.randint(0, K, (N,))
    arc, cos = make("arcface", s=s, m=m), make("cosface", s=s, m=m)
    for head in (arc, cos):
        head.train()
        head.bn.eval()
    c = arc.cosine(x)[torch.arange(N), y].double()
    got = arc(x, y)[torch.arange(N), y].double() / s
    want = torch.tensor([math.cos(math.acos(v) + m) for v in c.tolist()], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-5)
    c = cos.cosine(x)[torch.arange(N), y].double()
    assert torch.allclose(cos(x, y)[torch.arange(N), y].double() / s, c - m, atol=1e-5)


def test_arcface_finite_at_cosine_plus_minus_one_in_bf16():
    """Features pointing exactly at (or away from) their class centre give cosine +-1; acos' slope
    is infinite there, so without clamping the logits or gradients would be NaN."""
    d = 16
    head = HEADS["arcface"](d, K, Head(kind="arcface", embed_dim=d, s=64.0, m=0.5))
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
