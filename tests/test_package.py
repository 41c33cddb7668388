"""fastcifar as a user installs it: build the sdist and the wheel (offline), install the wheel, not
the checkout, into a fresh virtual environment, and run it from an empty directory.

That environment reuses this interpreter's dependencies instead of downloading torch again: a .pth
line names our site-packages and the wheel goes in with --no-deps. So the tests check that those
dependencies meet the wheel's own requirements, and that fastcifar, pipelines and the recipes are
the wheel's, never the checkout's.
"""

import ast
import email
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from test_docker import _floors

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if not p.name.startswith("_"))
VERSION = ast.literal_eval(re.search(r"^__version__ = (.+)$", (ROOT / "fastcifar" / "__init__.py").read_text(), re.M)[1])
# What a checkout holds that the build reads; anything else (data, runs, caches) stays out.
BUILD_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "fastcifar", "pipelines", "recipes"]


def _run(args, cwd, env, timeout=300):
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _clean_env(extra_path=None, **extra):
    """This environment without anything that would let the checkout in (PYTHONPATH) or move the data."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "FASTCIFAR_DATA")}
    if extra_path:
        env["PATH"] = f"{extra_path}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel), built the way docker/Dockerfile builds them (`python -m build`: the sdist, then
    the wheel from the sdist), offline (--no-isolation: the dev extra brings build and setuptools)."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], cwd=src, env=_clean_env())
    sdist, = out.glob("fastcifar-*.tar.gz")
    wheel, = out.glob("fastcifar-*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory):
    """A fresh virtual environment holding the wheel, with this interpreter's site-packages behind it."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root, env=_clean_env())
    py = root / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root,
                     _clean_env()).stdout.strip())
    ours = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    (site / "zz_fastcifar_test_deps.pth").write_text("\n".join(ours) + "\n")  # torch, timm, ... without a download
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", dists[1]],
         cwd=root, env=_clean_env())
    return root


@pytest.fixture
def user_dir(tmp_path):
    """An empty working directory, away from the checkout."""
    d = tmp_path / "work"
    d.mkdir()
    return d


def test_sdist_holds_the_sources_recipes_readme_and_license(dists):
    with tarfile.open(dists[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "LICENSE", "fastcifar/cli.py", "pipelines/dali.py"} <= names
    assert {f"recipes/{r}.py" for r in RECIPES} <= names


def test_wheel_carries_every_recipe_and_the_license_but_no_tests(dists):
    names = set(zipfile.ZipFile(dists[1]).namelist())
    assert {f"fastcifar/recipes/{r}.py" for r in RECIPES} <= names
    assert {"fastcifar/cli.py", "fastcifar/pipelines/__init__.py", f"fastcifar-{VERSION}.dist-info/licenses/LICENSE"} <= names
    assert not [n for n in names if n.startswith(("tests/", "recipes/", "pipelines/", "bench/", "docker/"))]


def test_wheel_metadata_is_fit_for_an_index(dists):
    meta = email.message_from_string(zipfile.ZipFile(dists[1]).read(f"fastcifar-{VERSION}.dist-info/METADATA").decode())
    assert meta["Name"] == "fastcifar" and meta["Version"] == VERSION and meta["License-Expression"] == "MIT"
    assert meta["Requires-Python"] == ">=3.10" and meta.get_all("Classifier")
    assert "CIFAR-100 tutorial, https://github.com/DocsaidLab/cifar100_training_demo" in meta.get_all("Project-URL")
    # the long description is the README, as markdown. Its relative links go to the reference in docs/ and
    # bench/RESULTS.md (tests/test_readme.py checks they resolve), which work where the repository is browsed;
    # no other link may depend on the repository.
    readme = (ROOT / "README.md").read_text()
    assert meta["Description-Content-Type"] == "text/markdown" and meta.get_payload().strip() == readme.strip()
    relative = [u for u in re.findall(r"\]\(([^)\s]+)\)", readme)
                if not u.startswith(("http://", "https://", "#", "docs/", "bench/RESULTS.md"))]
    assert not relative, f"links that break on an index page: {relative}"
    # the floors (docs/install.md) hold, and the dependencies the venv reuses meet them
    reqs = {r.name: r for r in map(Requirement, meta.get_all("Requires-Dist")) if not r.marker or "extra" not in str(r.marker)}
    for name, too_old in [("torch", "2.9.1"), ("torchvision", "0.24.1"), ("nvidia-dali-cuda120", "1.53.0")]:
        assert not reqs[name].specifier.contains(too_old, prereleases=True), f"{name} {too_old} must be refused"
    for name in ("torch", "torchvision", "timm", "numpy", "typer", "tensorboard", "tqdm", "matplotlib"):
        assert reqs[name].specifier.contains(installed_version(name), prereleases=True), \
            f"the test environment's {name} {installed_version(name)} does not meet {reqs[name]}"
    assert reqs["nvidia-dali-cuda120"].specifier.contains("2.4.0")


def test_installed_wheel_runs_from_an_empty_directory(venv, user_dir):
    env = _clean_env(venv / "bin")
    where = _run(["python", "-c", "import fastcifar, fastcifar.pipelines as pipelines; "
                  "from fastcifar.config import installed_recipes_dir, load; "
                  "r, info = load('r18_lbsmooth'); "
                  "print(fastcifar.__file__, pipelines.__file__, installed_recipes_dir(), info['path'], info['parent'])"],
                 user_dir, env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where[:4]), f"not the wheel's: {where}"
    assert where[4] == "r18_baseline"  # a derived recipe finds its parent by name, installed

    assert _run(["fastcifar", "--version"], user_dir, env).stdout.strip() == f"fastcifar {VERSION}"

    listing = _run(["fastcifar", "recipes"], user_dir, env).stdout
    rows = {cols[0]: cols[1] for cols in map(str.split, listing.splitlines()[1:]) if len(cols) > 1}
    assert {r: "installed" for r in RECIPES}.items() <= rows.items()
    assert re.search(rf"^installed: +{re.escape(str(venv))}/\S+/fastcifar/recipes$", listing, re.M)

    _run(["fastcifar", "prepare", "--synthetic", "--train", "500", "--test", "200"], user_dir, env)
    assert (user_dir / "data" / "cifar100" / "meta.json").is_file()
    _run(["fastcifar", "train", "smoke", "--set", "train.epochs=1", "--set", "data.backend=torch",
          "--set", "data.subset=0.2", "--out", "runs/smoke"], user_dir, env)
    summary = (user_dir / "runs" / "smoke" / "summary.json").read_text()
    assert '"recipe": "smoke"' in summary and '"epochs_done": 1' in summary


def test_shell_completion_installs_and_completes_recipe_names(venv, user_dir):
    home = user_dir / "home"
    env = _clean_env(venv / "bin", HOME=str(home))
    # `fastcifar --help` offers exactly these root options, and each one works
    assert set(re.findall(r"--[a-z][a-z-]+", _run(["fastcifar", "--help"], user_dir, env).stdout)) == {
        "--version", "--install-completion", "--show-completion", "--help"}
    # bash -c '...; exit': bash stays the parent process, the shell that typer detects
    shown = _run(["bash", "-c", "fastcifar --show-completion; exit $?"], user_dir, env).stdout
    _run(["bash", "-c", "fastcifar --install-completion; exit $?"], user_dir, env)
    script = home / ".bash_completions" / "fastcifar.sh"
    assert script.read_text().strip() == shown.strip() and f"source '{script}'" in (home / ".bashrc").read_text()
    # and bash, with that script, completes recipe names from the installed recipes and commands
    complete = ('source "$1"; COMP_WORDS=(fastcifar $2); COMP_CWORD=$3; _fastcifar_completion fastcifar; '
                'printf "%s\\n" "${COMPREPLY[@]}"')
    got = _run(["bash", "-c", complete, "bash", script, "train r18_arc", "2"], user_dir, env).stdout.split()
    assert got == ["r18_arcface", "r18_arcface_224", "r18_arcface_kd", "r18_arcface_mst"]
    assert _run(["bash", "-c", complete, "bash", script, "tr", "1"], user_dir, env).stdout.split() == ["train"]


def test_docker_dependency_steps_read_the_real_wheel(dists, venv, user_dir):
    """docker/deps.py as the image runs it: requirements from the wheel, then the floors of the installed one."""
    env, script = _clean_env(venv / "bin"), ROOT / "docker" / "deps.py"
    reqs = _run(["python", script, "requirements", dists[1]], user_dir, env).stdout.split()
    floors = [r for r in _floors() if not r.startswith(("torch>", "torchvision>", "nvidia-dali"))]
    assert reqs == [r.replace(" ", "") for r in floors]  # pyproject's floors, as the wheel carries them
    assert not [r for r in reqs if r.startswith(("torch", "nvidia-dali", "pytest"))]
    check = subprocess.run(["python", script, "check"], cwd=user_dir, env=env, capture_output=True, text=True, timeout=300)
    if importlib.util.find_spec("nvidia.dali") is None and sys.platform == "linux":  # the suite runs without DALI too
        assert check.returncode == 1 and "nvidia-dali-cuda120 is not installed" in check.stderr, check.stderr
    else:
        assert check.returncode == 0, check.stderr
        assert f"torch {installed_version('torch')}, torchvision {installed_version('torchvision')}" in check.stdout
