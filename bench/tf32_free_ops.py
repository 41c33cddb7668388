"""Cost on this machine of the torch backend's TF32-free ops against the matmuls they replace.

Once TF32 is on (the trainer turns it on for speed), a CUDA float32 matmul rounds its inputs to
10 mantissa bits, so colour jitter (a 3x3 matrix per image), the mean grey (a dot with the luma
weights) and the affine grid (a batched matmul inside F.affine_grid) would no longer match DALI.
The torch backend computes them as per-channel multiply-adds instead; this times both ways on a
batch as the loader sees it (uint8 NHWC at 32x32), median of repeats, in ms per batch.

    python bench/tf32_free_ops.py [--batch 250] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastcifar.pipelines import torch_backend as tb


def timed(fn, device, repeats=50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dev, n = torch.device(a.device), a.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g).to(dev)
    m, k = torch.rand(n, 3, 3, generator=g).to(dev), torch.rand(n, generator=g).to(dev)
    grey = tb.grey(x)
    theta = torch.rand(n, 2, 3, generator=g).to(dev)
    luma = torch.tensor(tb.LUMA, dtype=torch.float32, device=dev)
    matmul = {
        "colour jitter": lambda: (torch.einsum("nhwc,ndc->nhwd", x.float(), m) + (k * grey)[:, None, None, None])
        .round_().clamp_(0, 255).to(torch.uint8),
        "mean grey": lambda: (x.float() @ luma).mean((1, 2)),
        "affine grid": lambda: F.affine_grid(theta, [n, 3, 32, 32], align_corners=False),
    }
    free = {"colour jitter": lambda: tb.colour(x, m, k, grey), "mean grey": lambda: tb.grey(x),
            "affine grid": lambda: tb.grid(theta, 32, 32)}
    print(f"{torch.__version__}, {dev}, batch {n} at 32x32, {torch.get_num_threads()} threads; ms per batch (median)")
    print("| op | matmul (as before) | multiply-adds (now) |\n|---|---|---|")
    for name in matmul:
        print(f"| {name} | {timed(matmul[name], dev):.3f} | {timed(free[name], dev):.3f} |")


if __name__ == "__main__":
    main()
