"""fastcifar: CIFAR-100 training at the speed of the GPU, not of the data loader."""

from pathlib import Path

__version__ = "0.1.0"

# pipelines/ sits beside fastcifar/ in the repository and inside it once installed (pyproject's package-dir).
# Run from a checkout that is not installed, fastcifar's submodules are also looked up beside it, so
# `fastcifar.pipelines` is one package either way: a search path, not an alias module, so nothing is
# imported before it is asked for, and a wheel (which has fastcifar/pipelines/) never takes this branch.
if not (Path(__file__).parent / "pipelines").is_dir():
    __path__.append(str(Path(__file__).resolve().parent.parent))
