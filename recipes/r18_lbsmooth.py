"""r18_baseline with label smoothing 0.1: tutorial 44.81% (best epoch 59 of 200)."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_baseline")
    r.loss.label_smoothing = 0.1
    return r
