"""ResNet-50 (pretrained) with the ArcFace head at 32x32: tutorial 61.76% (best epoch 199 of 200)."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_arcface")
    r.model.name = "resnet50"
    return r
