"""The tutorial's data path (docs/pipelines.md), kept as the baseline of `fastcifar bench` and for
tests; never the default. A torch DataLoader whose worker processes augment and resize one image
at a time on the CPU, at 32 before the resize: with the `bench` extra the tutorial's own code
(albumentations, the OneOf policy as `A.OneOf`, then the cv2 resize), else the batched backends'
ops in torch. Either way the draws are not those of pipelines.draw; they are seeded per (seed,
epoch, worker), so the same seed still gives the same batches. The policies (TrivialAugment,
RandAugment) run on the torch path only: albumentations has neither.
"""

from __future__ import annotations

import gc
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from fastcifar.errors import BadInput, shown
from fastcifar.pipelines import torch_backend as tb
from fastcifar.pipelines.draw import OP_P, SIDE, draw
from fastcifar.pipelines.spec import AugSpec

# the tutorial's training DataLoader used 16 worker processes (its test loader 8); here at most
# as many as the machine has cores (2 for the README's CPU tables)
WORKERS = 16


def albumentations_available() -> bool:
    """Whether the tutorial's own libraries (albumentations, cv2) are installed."""
    try:
        import albumentations  # noqa: F401
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def albumentations_pipeline(spec: AugSpec):
    """The spec as an albumentations Compose on the stored 32x32 images."""
    import albumentations as A
    import cv2

    ops = {
        "hflip": lambda p: A.HorizontalFlip(p=p),
        "vflip": lambda p: A.VerticalFlip(p=p),
        "shift_scale_rotate": lambda p: A.ShiftScaleRotate(
            shift_limit=spec.ssr_shift, scale_limit=spec.ssr_scale, rotate_limit=spec.ssr_degrees,
            border_mode=cv2.BORDER_CONSTANT, fill=0, p=p),
        "color_jitter": lambda p: A.ColorJitter(brightness=spec.brightness, contrast=spec.contrast,
                                                saturation=spec.saturation, hue=spec.hue, p=p),
        "coarse_dropout": lambda p: A.CoarseDropout(num_holes_range=spec.erase_holes, hole_height_range=spec.erase_size,
                                                    hole_width_range=spec.erase_size, fill=spec.erase_fill, p=p),
    }
    own_p = {op: getattr(spec, p) for op, p in OP_P.items()}
    steps = []
    if spec.pad_crop:
        padded = SIDE + 2 * spec.pad_crop
        steps += [A.PadIfNeeded(padded, padded, border_mode=cv2.BORDER_CONSTANT, fill=0), A.RandomCrop(SIDE, SIDE)]
    elif spec.rrc_scale is not None:
        steps.append(A.RandomResizedCrop(size=(SIDE, SIDE), scale=spec.rrc_scale, ratio=spec.rrc_ratio))
    steps += [make(own_p[op]) for op, make in ops.items() if op not in spec.oneof and own_p[op] > 0]
    if spec.oneof and spec.oneof_p > 0:
        steps.append(A.OneOf([ops[op](1.0) for op in spec.oneof], p=spec.oneof_p))
    return A.Compose(steps)


class TutorialDataset(torch.utils.data.Dataset):
    """One image at a time: augment at 32, resize, normalise, cast to spec.dtype; HWC out (stacks to
    channels_last)."""

    def __init__(self, images, labels, spec: AugSpec, sizes, augment: bool, mean, std, use_albumentations: bool):
        # in RAM, as the tutorial held its unpickled arrays (indexing a memmap per image costs
        # 3x the rest of the per-image work); forked workers share these pages
        self.images, self.labels = np.array(images), np.array(labels).tolist()
        self.spec, self.sizes, self.dtype = spec, sizes, tb.TORCH_DTYPES[spec.dtype]
        self.augment = augment and spec.augments
        self.mean = np.array(mean, np.float32) * 255
        self.inv_std = 1 / (np.array(std, np.float32) * 255)
        self.alb = use_albumentations
        self._norm = {}  # image shape -> (scale, shift) arrays
        self.rng = np.random.default_rng(0)  # reseeded per worker and epoch (seed_worker)
        self.compose = None

    def seed(self, seed: int):
        self.rng = np.random.default_rng(seed)
        if self.alb and self.augment:
            with warnings.catch_warnings():  # ShiftScaleRotate: "use Affine instead"; the tutorial used it
                warnings.simplefilter("ignore")
                self.compose = albumentations_pipeline(self.spec)
            self.compose.set_random_seed(seed)

    def __len__(self):
        return len(self.labels)

    def _normalise(self, img: np.ndarray) -> torch.Tensor:
        """(x - mean) / std with full-size scale and shift arrays (numpy broadcasting a length-3
        channel axis runs 3-element inner loops, 4x slower than this per image), as spec.dtype: the
        worker casts, so the batch the DataLoader pins is the one the device copy reads."""
        if img.shape not in self._norm:
            self._norm[img.shape] = (np.broadcast_to(self.inv_std, img.shape).copy(),
                                     np.broadcast_to(-self.mean * self.inv_std, img.shape).copy())
        scale, shift = self._norm[img.shape]
        x = img.astype(np.float32)
        x *= scale
        x += shift
        return torch.from_numpy(x).to(self.dtype)

    def __getitem__(self, row):
        img = self.images[row]  # (32, 32, 3) uint8
        if self.alb:
            import cv2

            interp = cv2.INTER_CUBIC if self.spec.interpolation == "cubic" else cv2.INTER_LINEAR
            resize = lambda im, s: im if s == im.shape[0] else cv2.resize(im, (s, s), interpolation=interp)
            if self.augment:  # the tutorial's order: augment the 32x32 image, then resize (each view: one draw)
                img = self.compose(image=img)["image"]
            outs = tuple(resize(img, s) for s in self.sizes)
        else:  # the batched backends' ops, one image at a time (torch, no albumentations)
            x = torch.from_numpy(img[None].copy())
            if self.augment:
                x = tb.augment(x, draw(self.spec, 1, self.rng), self.spec)
            x = x.permute(0, 3, 1, 2)
            mode = tb._MODES[self.spec.interpolation]
            outs = tuple((x if s == SIDE else F.interpolate(x, size=(s, s), mode=mode, align_corners=False,
                                                             antialias=s < SIDE))[0].permute(1, 2, 0).numpy()
                         for s in self.sizes)
        return tuple(self._normalise(o) for o in outs), self.labels[row]


class TutorialBackend:
    """Batches from a torch DataLoader over TutorialDataset, WORKERS processes, one epoch each."""

    def __init__(self, store, split, *, spec: AugSpec, sizes, device, augment: bool, seed: int, rank: int,
                 mean, std):
        self.name, self.spec, self.device, self.seed, self.rank = "tutorial", spec, device, seed, rank
        self.workers = min(WORKERS, len(os.sched_getaffinity(0)))  # at least 1
        alb = albumentations_available()
        if alb and augment and spec.policy != "none":
            raise BadInput(f"aug.policy = {shown(spec.policy)}: backend 'tutorial' runs albumentations here (the bench "
                           f"extra), which has no TrivialAugment or RandAugment. Use backend 'dali' or 'torch' (or "
                           f"'auto'), which run the policy; the tutorial path runs it only without albumentations.")
        self.dataset = TutorialDataset(store.images(split), store.labels(split), spec, sizes, augment,
                                       mean, std, alb)

    def epoch(self, batches, epoch: int):
        base = int(np.random.default_rng([self.seed, epoch, self.rank, 0x7E7]).integers(2**31))

        def seed_worker(worker_id):  # each worker's draws: a function of (seed, epoch, rank, worker)
            torch.utils.data.get_worker_info().dataset.seed(base + worker_id)

        gc.collect()  # free garbage cycles now, not in a forked worker (where a dead DALI pipeline aborts)
        # Batches come out of the workers in spec.dtype already, so the copy to the device changes
        # nothing but the device: from page-locked memory (pinned by the DataLoader's own thread) it
        # is asynchronous. A dtype change in the copy would convert through a pageable temporary.
        pinned = self.device.type == "cuda"  # GPU only: page-locked batches
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=[idx.tolist() for _, idx in batches], num_workers=self.workers,
            worker_init_fn=seed_worker, pin_memory=pinned, prefetch_factor=4)
        for images, labels in loader:
            # (N, H, W, C) -> NCHW view with channels_last memory, on the device
            images = tuple(x.permute(0, 3, 1, 2).to(self.device, non_blocking=True) for x in images)
            yield images, labels.to(self.device, non_blocking=True)
