"""A tiny CPU run: timm's test_resnet on 10% of the store for 4 epochs (well under a minute)."""

from fastcifar.config import Recipe


def recipe() -> Recipe:
    r = Recipe()
    r.data.batch_size = 100
    r.data.subset = 0.1        # 5000 of the 50000 train images
    r.data.test_subset = 0.2   # 2000 of the 10000 test images
    r.aug.normalize = "cifar"
    r.model.name = "test_resnet"  # timm's 0.4M-parameter ResNet for tests
    r.head.kind = "linear"
    r.optim.name = "adamw"
    r.optim.lr = 3e-3
    r.optim.weight_decay = 0.05
    r.schedule.kind = "onecycle"
    r.schedule.warmup = 0.1
    r.train.epochs = 4
    r.train.compile = False
    r.train.log_every = 10
    return r
