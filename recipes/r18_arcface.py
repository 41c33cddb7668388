"""r18_pretrained with the ArcFace margin head as its code trained it (s=8, m=0.35): tutorial 57.92% (best epoch 199 of 200)."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_pretrained")
    r.head.kind = "arcface"
    r.head.embed_dim = 512  # MarginHead: Linear(512 -> 512, no bias) -> BatchNorm1d -> cosine
    r.head.s = 8.0          # its model's values; the article prints the class defaults s=64, m=0.5
    r.head.m = 0.35         # (--set head.s=64 --set head.m=0.5)
    r.head.margin_grad = "straight_through"  # its margin was set under no_grad (--set head.margin_grad=exact)
    r.head.eval_logits = "cosine"  # it evaluated the plain cosine: the same accuracy, another test_loss
    return r
