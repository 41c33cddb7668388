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
import re
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version as installed_version
from pathlib import Path

from packaging.requirements import Requirement
from helpers import ROOT, clean_env, dependency_floors, run_ok

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if not p.name.startswith("_"))
VERSION = ast.literal_eval(re.search(r"^__version__ = (.+)$", (ROOT / "fastcifar" / "__init__.py").read_text(), re.M)[1])
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
    env = clean_env(venv / "bin")
    where = run_ok(["python", "-c", "import fastcifar, fastcifar.pipelines as pipelines; "
                    "from fastcifar.config import installed_recipes_dir, load; "
                    "r, info = load('r18_lbsmooth'); "
                    "print(fastcifar.__file__, pipelines.__file__, installed_recipes_dir(), info['path'], info['parent'])"],
                   user_dir, env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where[:4]), f"not the wheel's: {where}"
    assert where[4] == "r18_baseline"  # a derived recipe finds its parent by name, installed

    assert run_ok(["fastcifar", "--version"], user_dir, env).stdout.strip() == f"fastcifar {VERSION}"

    listing = run_ok(["fastcifar", "recipes"], user_dir, env).stdout
    rows = {cols[0]: cols[1] for cols in map(str.split, listing.splitlines()[1:]) if len(cols) > 1}
    assert {r: "installed" for r in RECIPES}.items() <= rows.items()
    assert re.search(rf"^installed: +{re.escape(str(venv))}/\S+/fastcifar/recipes$", listing, re.M)

    run_ok(["fastcifar", "prepare", "--synthetic", "--train", "500", "--test", "200"], user_dir, env)
    assert (user_dir / "data" / "cifar100" / "meta.json").is_file()
    run_ok(["fastcifar", "train", "smoke", "--set", "train.epochs=1", "--set", "data.backend=torch",
            "--set", "data.subset=0.2", "--out", "runs/smoke"], user_dir, env)
    summary = (user_dir / "runs" / "smoke" / "summary.json").read_text()
    assert '"recipe": "smoke"' in summary and '"epochs_done": 1' in summary


def test_shell_completion_installs_and_completes_recipe_names(venv, user_dir):
    home = user_dir / "home"
    env = clean_env(venv / "bin", HOME=str(home))
    # `fastcifar --help` offers exactly these root options, and each one works
    assert set(re.findall(r"--[a-z][a-z-]+", run_ok(["fastcifar", "--help"], user_dir, env).stdout)) == {
        "--version", "--install-completion", "--show-completion", "--help"}
    # bash -c '...; exit': bash stays the parent process, the shell that typer detects
    shown = run_ok(["bash", "-c", "fastcifar --show-completion; exit $?"], user_dir, env).stdout
    run_ok(["bash", "-c", "fastcifar --install-completion; exit $?"], user_dir, env)
    script = home / ".bash_completions" / "fastcifar.sh"
    assert script.read_text().strip() == shown.strip() and f"source '{script}'" in (home / ".bashrc").read_text()
    # and bash, with that script, completes recipe names from the installed recipes and commands
    complete = ('source "$1"; COMP_WORDS=(fastcifar $2); COMP_CWORD=$3; _fastcifar_completion fastcifar; '
                'printf "%s\\n" "${COMPREPLY[@]}"')
    got = run_ok(["bash", "-c", complete, "bash", script, "train r18_arc", "2"], user_dir, env).stdout.split()
    assert got == ["r18_arcface", "r18_arcface_224", "r18_arcface_kd", "r18_arcface_mst"]
    assert run_ok(["bash", "-c", complete, "bash", script, "tr", "1"], user_dir, env).stdout.split() == ["train"]


def test_docker_dependency_steps_read_the_real_wheel(dists, venv, user_dir):
    """docker/deps.py as the image runs it: requirements from the wheel, then the floors of the installed one."""
    env, script = clean_env(venv / "bin"), ROOT / "docker" / "deps.py"
    reqs = run_ok(["python", script, "requirements", dists[1]], user_dir, env).stdout.split()
    floors = [r for r in dependency_floors() if not r.startswith(("torch>", "torchvision>", "nvidia-dali"))]
    assert reqs == [r.replace(" ", "") for r in floors]  # pyproject's floors, as the wheel carries them
    assert not [r for r in reqs if r.startswith(("torch", "nvidia-dali", "pytest"))]
    check = subprocess.run(["python", script, "check"], cwd=user_dir, env=env, capture_output=True, text=True, timeout=300)
    if importlib.util.find_spec("nvidia.dali") is None and sys.platform == "linux":  # the suite runs without DALI too
        assert check.returncode == 1 and "nvidia-dali-cuda120 is not installed" in check.stderr, check.stderr
    else:
        assert check.returncode == 0, check.stderr
        assert f"torch {installed_version('torch')}, torchvision {installed_version('torchvision')}" in check.stdout
