"""What produced a run (code, software, hardware, ranks, data, command line) as plain JSON data for
summary.json, and the checks `fastcifar report` makes before it puts runs side by side. Collecting
never fails a run: a probe that errors (no git, a slow disk, no nvidia-smi) leaves its field None."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from fastcifar import __version__

GIT_TIMEOUT = 3.0    # seconds per git call: a slow network file system must not hold a run up
SMI_TIMEOUT = 5.0    # seconds for nvidia-smi (the driver version; torch does not expose it)
SOFTWARE = ("torch", "timm", "dali")  # the versions `report` compares between runs


def _run(cmd: list[str], timeout: float, cwd=None) -> str | None:
    """A command's stripped stdout, or None if it is missing, fails or takes longer than timeout."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                           env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state(root: Path | None = None) -> dict | None:
    """{commit, dirty} of the checkout fastcifar runs from (dirty: tracked files differ from the
    commit); None when it is installed (no .git), git is missing or slow, or it is unreadable."""
    root = Path(__file__).resolve().parent.parent if root is None else Path(root)
    if not (root / ".git").exists():  # a file in a git worktree, a directory in a clone
        return None
    commit = _run(["git", "-C", str(root), "rev-parse", "HEAD"], GIT_TIMEOUT)
    if not commit:
        return None
    status = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], GIT_TIMEOUT)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def version(module: str) -> str | None:
    """An installed package's __version__, None when it is missing or fails to import."""
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:  # an optional package may fail to import in any way (DALI without its CUDA libs)
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_info(device: torch.device) -> dict | None:
    """Name, compute capability, memory and driver of a CUDA device; None on a CPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(index)], SMI_TIMEOUT)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "driver": driver or None,
            "count": torch.cuda.device_count()}


def data_info(store) -> dict:
    """The store a run trains on: its data set, where it came from and meta.json's checksums."""
    meta = store.meta
    sums = meta.get("checksums") or {}
    # CIFAR-100 runs keep the labels they had before CIFAR-10 ("cifar100", "synthetic"), so report
    # does not tell old and new runs of one store apart; CIFAR-10's are "cifar10", "synthetic cifar10"
    dataset = (f"synthetic {store.dataset}" if store.synthetic else store.dataset).replace("synthetic cifar100", "synthetic")
    return {"dataset": dataset, "dir": str(Path(store.dir).resolve()),
            "source": meta.get("source"), "counts": meta.get("counts"),
            "outputs_sha256": sums.get("outputs_sha256"), "source_md5": sums.get("source_md5")}


def software(device: torch.device) -> dict:
    """The software and hardware a figure comes from: versions, the GPU (or none) and the CPU."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"fastcifar": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": version("timm"), "dali": version("nvidia.dali"), "cuda": torch.version.cuda, "cudnn": cudnn,
            "device": str(device), "gpu": gpu_info(device), "cpu": cpu_model(),
            "cpu_cores": len(os.sched_getaffinity(0))}


def collect(device: torch.device, world: int, store) -> dict:
    """Provenance of this process's part of a run (JSON data: no tuples, so summary.json reads back equal)."""
    p = {**software(device), "git": git_state(), "platform": platform.platform(), "world_size": world,
         "data": data_info(store), "argv": list(sys.argv), "cwd": os.getcwd()}
    # plain JSON types only: torch.__version__ is a str subclass that a weights_only load of last.pt refuses
    return json.loads(json.dumps(p, default=str))


def for_summary(processes: list[dict]) -> dict | None:
    """summary.json's `provenance`: the latest process's, a resumed run's earlier ones in `earlier`."""
    return {**processes[-1], **({"earlier": processes[:-1]} if processes[:-1] else {})} if processes else None


# ---- What `fastcifar report` checks before it puts runs side by side


def mismatches(runs: list[tuple[str, dict | None]]) -> list[str]:
    """Warnings about runs (label, summary.json's provenance) a table would compare although they
    differ in data or software, or were resumed under other software; runs without any named apart."""
    known = [(label, p) for label, p in runs if isinstance(p, dict)]
    out = []
    missing = [label for label, p in runs if not isinstance(p, dict)]
    if missing and known:
        out.append(f"No provenance for {', '.join(missing)} (their summary.json has none): their data and "
                   f"software cannot be checked against the others'.")
    groups: dict[str, list[str]] = {}  # a run's data: its data set and a short hash of its arrays' checksums
    for label, p in known:
        d, tag = p.get("data"), "unknown data"
        if isinstance(d, dict):  # a damaged summary may name no data set, or not as a string
            sha = d.get("outputs_sha256")
            short = hashlib.sha256(json.dumps(sha, sort_keys=True).encode()).hexdigest()[:8]
            tag = f"{d.get('dataset') or 'unnamed data'}" + (f" (store {short})" if sha else "")
        groups.setdefault(tag, []).append(label)
    if len(groups) > 1:
        out.append("These runs trained on different data, so their accuracies do not compare: "
                   + "; ".join(f"{tag}: {', '.join(labels)}" for tag, labels in groups.items()) + ".")
    for name in SOFTWARE:
        versions: dict[str, list[str]] = {}
        for label, p in known:
            versions.setdefault(str(p.get(name) or "none"), []).append(label)
        if len(versions) > 1:
            out.append(f"These runs used different {name} versions: "
                       + "; ".join(f"{v}: {', '.join(labels)}" for v, labels in versions.items()) + ".")
    for label, p in known:
        earlier = [e for e in p.get("earlier") or [] if isinstance(e, dict)] if isinstance(p.get("earlier"), list) else []
        changed = [k for k in SOFTWARE if any(e.get(k) != p.get(k) for e in earlier)]
        if changed:
            out.append(f"{label} was resumed under other software than it started with ({', '.join(changed)}).")
    return out
