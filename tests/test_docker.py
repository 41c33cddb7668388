"""The Docker files cannot be built here (no Docker engine); check what can be checked without one."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_pins_ngc_base_and_copies_every_package():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", text, re.M), "base image must be a pinned NGC tag"
    packages = re.findall(r'"(\w+)"', re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)[1])
    assert packages == ["fastcifar", "pipelines"]
    for pkg in [*packages, "recipes"]:
        assert re.search(rf"^COPY {pkg} \./{pkg}$", text, re.M), f"the image would lack {pkg}/"
    # the image's own torch/torchvision/DALI builds must not be replaced by pip
    assert "--no-deps" in text


def test_train_script_needs_a_recipe():
    r = subprocess.run(["bash", str(ROOT / "docker" / "train.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: docker/train.sh RECIPE" in r.stderr
