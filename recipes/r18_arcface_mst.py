"""r18_arcface trained on each image at 32 or 64 px (p=0.5), tested at 32: the tutorial's multi-scale experiment (no result published)."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_arcface")
    r.loss.scales = (32, 64)  # a forward per scale, the margin on each, one cross-entropy over the batch
    r.aug.image_size = 32     # evaluation at 32
    return r
