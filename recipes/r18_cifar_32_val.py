"""r18_cifar_32 selecting its best epoch on 10% of train held out, so the test figure is honest."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_cifar_32")
    r.data.val_split = 0.1  # 45000 train / 5000 validation images; test is only reported
    return r
