"""r18_baseline + the tutorial's OneOf(shift-scale-rotate, dropout, colour jitter, h/v flip) at p=1: tutorial 36.48%."""

from fastcifar.config import derive
from fastcifar.pipelines.spec import tutorial_oneof


def recipe():
    r = derive("r18_baseline")
    for k, v in tutorial_oneof(p=1.0).items():  # image_aug_ratio: 1.0 in its YAML
        setattr(r.aug, k, v)
    return r
