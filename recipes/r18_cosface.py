"""r18_arcface with a CosFace head (s=64, m=0.4): tutorial "close behind" ArcFace's 57.92% (no figure given)."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_arcface")
    r.head.kind = "cosface"
    r.head.s = 64.0
    r.head.m = 0.4
    return r
