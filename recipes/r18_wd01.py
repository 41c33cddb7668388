"""r18_baseline with weight decay 0.1: tutorial 40.12%."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_baseline")
    r.optim.weight_decay = 0.1
    return r
