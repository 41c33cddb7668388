"""r50_arcface at 224x224, the distillation teacher: tutorial 81.21% (best epoch 174 of 200)."""

from fastcifar.config import derive


def recipe():
    r = derive("r50_arcface")
    r.aug.image_size = 224
    r.aug.interpolation = "linear"
    return r
