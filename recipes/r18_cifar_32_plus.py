"""r18_cifar_32 + TrivialAugment, an EMA of the weights (selected on) and flip TTA: aims at >= 76% on CIFAR-100."""

from fastcifar.config import derive


def recipe():
    # What helps a 30-epoch ResNet-18 at 32 px, on top of r18_cifar_32 (CIFAR stem, crop+flip,
    # label smoothing 0.1, SGD one-cycle): TrivialAugment adds about a point on CIFAR-100 in its
    # paper (longer schedules), the EMA and flip TTA a few tenths each in published CIFAR runs; not
    # yet measured on a GPU.
    r = derive("r18_cifar_32")
    r.aug.policy = "trivialaugment"    # one op per image after the crop and flip's draws, magnitude uniform
    r.train.ema_decay = 0.995          # per step: averages the last ~200 steps (~2 epochs of 97)
    r.train.select_on = "ema"          # best.pt is the best EMA epoch; `fastcifar eval` reads its EMA weights
    r.train.tta = "flip"               # logits of the image and its mirror, averaged
    return r
