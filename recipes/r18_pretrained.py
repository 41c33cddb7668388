"""r18_baseline from ImageNet-pretrained weights (timm hub): tutorial 56.70% (best epoch 112 of 200)."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_baseline")
    r.model.pretrained = True  # offline: --set model.pretrained_file=resnet18.pth
    return r
