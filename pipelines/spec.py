"""What augmentation a run gets, as data. A recipe fills an AugSpec; every backend (DALI graph,
torch batched ops, the tutorial's per-sample path) reads the same one and must give the same
kind of output for it. Fields, defaults (albumentations 2.x's, which the tutorial used) and the
order of operations: docs/pipelines.md.

Every op runs at the stored 32x32 and the resize comes last (49x fewer pixels at 224). All
geometry is one affine map per image, so a policy's shears, translations and rotations join the
crop and flips in one warp; its colour ops run before it, on the stored image, in the order drawn
(pipelines.torch_backend.augment says why). An op listed in `oneof` does not run on its own: the
OneOf policy picks one listed op per image, uniformly, and applies it with probability `oneof_p`,
ignoring the op's own p, as albumentations' OneOf does. `policy` and `oneof` are two policies: a
spec sets at most one. MixUp/CutMix are batch-level, in the train loop (pipelines.mix).
"""

from __future__ import annotations

import dataclasses

from fastcifar.errors import BadInput, shown

ONEOF_OPS = ("shift_scale_rotate", "coarse_dropout", "color_jitter", "hflip", "vflip")
NORMALIZE = ("none", "cifar", "imagenet")  # none = x / 255, as the tutorial
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = ("float32", "bfloat16", "float16")
INTERPOLATIONS = ("linear", "cubic")
MAX_SIDE = 1024  # px: 32x the stored 32x32 images; a larger side adds no detail, only memory (a typo's 100000 px
                 # would fail deep in the loader's allocation instead of here)
POLICIES = ("none", "trivialaugment", "randaugment")
# the ops both policies draw from, uniformly: torchvision's TrivialAugmentWide / RandAugment list
POLICY_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
              "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
RA_MAX_M = 30  # RandAugment's magnitude scale: torchvision's 31 bins, 0..30
RA_MAX_N = 10  # ops per image; each adds a step of conditional branches to the DALI graph


@dataclasses.dataclass(slots=True)
class AugSpec:
    # output
    image_size: int = 32                 # output side in px; the store holds 32x32
    interpolation: str = "linear"        # resize filter: linear | cubic
    normalize: str = "none"              # none (x/255) | cifar (the store's mean/std) | imagenet
    dtype: str = "float32"               # float32 | bfloat16 | float16
    # crops (at most one of the two)
    pad_crop: int = 0                    # px of padding for a random crop back to 32 (0 = off)
    rrc_scale: tuple[float, float] | None = None  # random resized crop, area fraction (None = off)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect-ratio range
    # flips: probabilities
    hflip: float = 0.0
    vflip: float = 0.0
    # shift-scale-rotate
    ssr_p: float = 0.0
    ssr_shift: float = 0.0625            # max shift, fraction of the side
    ssr_scale: float = 0.1               # zoom in 1 +- this
    ssr_degrees: float = 45.0            # rotation in +- degrees
    # colour jitter: factors drawn in 1 +- brightness/contrast/saturation; hue shift in +- hue
    # turns of the colour wheel (0.5 = +-180 degrees)
    jitter_p: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.5
    # coarse dropout (erasing)
    erase_p: float = 0.0
    erase_holes: tuple[int, int] = (1, 2)          # number of holes, inclusive range
    erase_size: tuple[float, float] = (0.1, 0.2)   # hole side, fraction of the image side
    erase_fill: int = 0                            # fill value 0..255, all channels
    # the tutorial's policy: exactly one of these ops, with probability oneof_p
    oneof: tuple[str, ...] = ()
    oneof_p: float = 0.0
    # an automatic augmentation policy, its colour ops first and its geometry in the crop's warp:
    # none | trivialaugment (one op per image, magnitude uniform over torchvision's 31 wide bins) |
    # randaugment (ra_n ops per image, drawn with replacement, each at magnitude ra_m of 30)
    policy: str = "none"
    ra_n: int = 2
    ra_m: int = 9
    # batch-level mixing, applied on the device by the train loop (soft targets)
    mixup_alpha: float = 0.0             # Beta(alpha, alpha) mixing weight; 0 = off
    cutmix_alpha: float = 0.0            # 0 = off; with both on, each mixed batch picks one
    mix_p: float = 1.0                   # probability that a batch is mixed

    def validate(self) -> "AugSpec":
        """Raise BadInput naming the first field that is out of range."""
        def bad(field, why):
            raise BadInput(f"aug.{field} = {shown(getattr(self, field))}: {why}.")

        if not 8 <= self.image_size <= MAX_SIDE:
            bad("image_size", f"must be at least 8 px and at most {MAX_SIDE} px")
        for f, choices in (("interpolation", INTERPOLATIONS), ("normalize", NORMALIZE), ("dtype", DTYPES),
                           ("policy", POLICIES)):
            if getattr(self, f) not in choices:
                bad(f, f"must be one of {', '.join(choices)}")
        for f in ("pad_crop", "brightness", "contrast", "saturation", "ssr_shift", "ssr_scale", "ssr_degrees",
                  "mixup_alpha", "cutmix_alpha"):
            if getattr(self, f) < 0:
                bad(f, "must be >= 0")
        if self.pad_crop and self.rrc_scale is not None:
            bad("pad_crop", "pad-and-crop and random resized crop exclude each other; set one")
        for f in ("hflip", "vflip", "ssr_p", "jitter_p", "erase_p", "oneof_p", "mix_p"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                bad(f, "is a probability and must lie in [0, 1]")
        if not 0.0 <= self.hue <= 0.5:
            bad("hue", "must lie in [0, 0.5] turns")
        unknown = [op for op in self.oneof if op not in ONEOF_OPS]
        if unknown:
            bad("oneof", f"unknown op {shown(unknown[0])}; choose from {', '.join(ONEOF_OPS)}")
        if self.rrc_scale is not None and not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            bad("rrc_scale", "must be (lo, hi) with 0 < lo <= hi <= 1")
        if not 1 <= self.erase_holes[0] <= self.erase_holes[1]:
            bad("erase_holes", "must be (lo, hi) with 1 <= lo <= hi")
        if not 0 < self.erase_size[0] <= self.erase_size[1] <= 1:
            bad("erase_size", "must be (lo, hi) with 0 < lo <= hi <= 1")
        if not 0 <= self.erase_fill <= 255:
            bad("erase_fill", "must lie in 0..255")
        for f, lo, hi in (("ra_n", 1, RA_MAX_N), ("ra_m", 0, RA_MAX_M)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                bad(f, f"must be a whole number in {lo}..{hi}")
        if self.policy != "none" and self.oneof and self.oneof_p > 0:
            bad("policy", "cannot run beside the OneOf policy (aug.oneof with aug.oneof_p > 0): a spec takes one "
                          f"policy; set aug.oneof_p=0 to use {self.policy}, or aug.policy=none to keep OneOf")
        return self

    @property
    def augments(self) -> bool:
        """Whether any per-image random op is on (with none, an epoch is a pure resize of the store)."""
        return bool(self.pad_crop or self.rrc_scale or self.hflip or self.vflip or self.ssr_p
                    or self.jitter_p or self.erase_p or (self.oneof and self.oneof_p) or self.policy != "none")

    @property
    def policy_steps(self) -> int:
        """Ops the policy applies to each image: 0 (none), 1 (TrivialAugment) or ra_n (RandAugment)."""
        return {"none": 0, "trivialaugment": 1}.get(self.policy, self.ra_n)


def mean_std(spec: AugSpec, store=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) in 0..1 units that `spec.normalize` asks for (none = x / 255)."""
    if spec.normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if spec.normalize == "cifar":
        if store is None:
            raise BadInput("aug.normalize = 'cifar' needs the store's mean/std (meta.json); pass the store.")
        return tuple(store.mean), tuple(store.std)
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def tutorial_oneof(p: float = 1.0) -> dict:
    """AugSpec fields for the tutorial's DefaultImageAug: A.OneOf over all five ops, with probability p."""
    return {"oneof": ONEOF_OPS, "oneof_p": p}
