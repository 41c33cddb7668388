"""ResNet-18, CIFAR stem, crop+flip, label smoothing, SGD one-cycle, bf16 where native, 30 epochs at 32x32: aims at >= 75%."""

from fastcifar.config import Recipe


def recipe() -> Recipe:
    r = Recipe()
    r.data.batch_size = 512            # global: split over the ranks under torchrun
    r.aug.image_size = 32
    r.aug.pad_crop = 4                 # random 32x32 crop of the 4-px zero-padded image
    r.aug.hflip = 0.5
    r.aug.normalize = "cifar"          # the store's per-channel mean/std
    r.model.name = "resnet18"
    r.model.cifar_stem = True          # 3x3 stride-1 first conv, no max-pool: the last stage sees 4x4, not 1x1
    r.head.kind = "linear"
    r.loss.label_smoothing = 0.1
    r.optim.name = "sgd"
    r.optim.lr = 0.1                   # per 256 images: 0.2 at batch 512 (linear rule)
    r.optim.lr_ref_batch = 256
    r.optim.lr_scaling = "linear"
    r.optim.momentum = 0.9
    r.optim.nesterov = True
    r.optim.weight_decay = 5e-4        # on conv/linear weights only (norms and biases excluded)
    r.schedule.kind = "onecycle"       # linear up over the first 15% of steps, linear down to 0
    r.schedule.warmup = 0.15
    r.schedule.final_lr = 0.0
    r.train.epochs = 30
    r.train.amp = "auto"               # bf16 on GPUs with bf16 tensor cores, fp16 on older ones, fp32 on most CPUs
    r.train.compile = None             # on with CUDA, off on a CPU
    return r
