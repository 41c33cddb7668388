"""r18_pretrained with an ArcFace margin head (s=64, m=0.5): tutorial 57.92% (best epoch 199 of 200)."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_pretrained")
    r.head.kind = "arcface"
    r.head.embed_dim = 512  # MarginHead: Linear(512 -> 512, no bias) -> BatchNorm1d -> cosine
    r.head.s = 64.0         # the text's s=64, m=0.5; its model code used s=8, m=0.35:
    r.head.m = 0.5          # --set head.s=8 --set head.m=0.35
    return r
