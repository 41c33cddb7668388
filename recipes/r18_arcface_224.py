"""r18_arcface with the 32x32 images resized to 224x224 (bilinear): tutorial 79.57% (best epoch 29 of 200)."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_arcface")
    r.aug.image_size = 224
    r.aug.interpolation = "linear"
    # The tutorial's run continued an earlier run's weights (is_restore, loaded non-strictly; which
    # run is not published), so its 79.57% is not a run from ImageNet weights. To continue one of
    # yours the same way: --set model.init_from=RUN_DIR (its last.pt, weights only).
    r.model.init_from = ""
    return r
