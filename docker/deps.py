"""The image's two dependency steps, read from fastcifar's own metadata so that the floors are
written once (pyproject.toml):

  python deps.py requirements WHEEL   print what the image pip-installs: the wheel's dependencies
                                      less torch, torchvision and DALI, which the NGC base ships
  python deps.py check                exit 1 unless the installed torch, torchvision and DALI meet
                                      the installed fastcifar's floors
"""

import email
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement


def from_base(req: Requirement) -> bool:
    """torch, torchvision and DALI (any CUDA flavour) come with the NGC image, built to match."""
    return req.name in ("torch", "torchvision") or req.name.startswith("nvidia-dali")


def runtime(lines: list[str]) -> list[Requirement]:
    """The requirements that apply on this machine, extras left out."""
    return [r for r in map(Requirement, lines) if r.marker is None or r.marker.evaluate({"extra": ""})]


def image_requirements(wheel: str) -> list[str]:
    """The wheel's runtime requirements that the image must install itself."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = email.message_from_string(z.read(meta).decode()).get_all("Requires-Dist") or []
    return [str(r) for r in runtime(lines) if not from_base(r)]


def problems(reqs: list[Requirement], versions: dict[str, str | None]) -> list[str]:
    """What the base's torch, torchvision and DALI ({name: version or None}) lack against reqs."""
    out = []
    for r in filter(from_base, reqs):
        v = versions.get("nvidia-dali" if r.name.startswith("nvidia-dali") else r.name)
        if v is None:
            out.append(f"{r.name} is not installed")
        elif not r.specifier.contains(v, prereleases=True):  # NGC ships pre-releases: 2.13.0a0 >= 2.10, 2.10.0a0 < 2.10
            out.append(f"{r.name} {v} does not meet {r.specifier}")
    return out


def installed_versions() -> dict[str, str | None]:
    """The versions this environment has; DALI by its module, whatever its CUDA flavour's package name."""
    out = {}
    for name in ("torch", "torchvision"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        import nvidia.dali
        out["nvidia-dali"] = nvidia.dali.__version__
    except ImportError:
        out["nvidia-dali"] = None
    return out


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "requirements":
        print("\n".join(image_requirements(argv[1])))
        return 0
    if argv == ["check"]:
        found = installed_versions()
        bad = problems(runtime(requires("fastcifar") or []), found)
        if bad:
            print(f"error: this base image misses fastcifar's floors: {'; '.join(bad)}. Build on a newer NGC "
                  f"PyTorch release: docker/build.sh --build-arg BASE=nvcr.io/nvidia/pytorch:<tag>-py3.", file=sys.stderr)
            return 1
        print("fastcifar's floors are met: " + ", ".join(f"{k} {v}" for k, v in found.items()))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
