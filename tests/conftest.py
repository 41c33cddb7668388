"""Every fixture of the suite: synthetic stores, official-format sources, trained runs, and stand-ins
that the test's monkeypatch undoes. A session- or module-scoped store or run is made once and only
read: a test that changes one works on a copy (helpers.copy_run, shutil.copytree)."""

import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

# A suite started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT
# ignored, and so would every process it starts: Ctrl-C tests need Ctrl-C as a terminal gives it.
signal.signal(signal.SIGINT, signal.default_int_handler)

# FASTCIFAR_HIDE_DALI=1 runs the suite as on a machine without DALI, before anything imports it:
# `import nvidia.dali` fails in this process and, through tests/hide_dali/sitecustomize.py, in
# every Python process the tests start (CLI runs, torchrun ranks, doctor's steps).
if os.environ.get("FASTCIFAR_HIDE_DALI") == "1":
    sys.modules["nvidia.dali"] = None
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).parent / "hide_dali"), os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist runs a test file per worker, a worker per core: each worker's torch gets its share of
# the cores (two workers of two threads each on two cores spend much of their time waiting on each other)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, at most 4 (more workers only contend for the heaviest files'
    runs, which start processes of their own)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


# tests/ modules (helpers, cifar_files, golden_aug) import as plain modules
sys.path.insert(0, str(Path(__file__).parent))

import fastcifar.train as T  # noqa: E402
from fastcifar import data as fdata  # noqa: E402
from fastcifar.config import to_dict  # noqa: E402
from cifar_files import md5, write_official  # noqa: E402
from helpers import (BUILD_INPUTS, N_TEST, N_TRAIN, QUIET, ROOT, STUDENT, TEACHER, backend_flags, clean_env,  # noqa: E402
                     copy_run, info, run_ok, tiny)

# ---- synthetic stores


def _prepared(tmp_path_factory, name: str, n_train: int, n_test: int, **kw) -> Path:
    d = tmp_path_factory.mktemp(name) / kw.get("dataset", "cifar100")
    fdata.prepare(d, synthetic=True, n_train=n_train, n_test=n_test, **kw, **QUIET)
    return d


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A fastcifar.data.Store of N_TRAIN / N_TEST images, read by the pipeline and bench tests."""
    return fdata.open_store(_prepared(tmp_path_factory, "store", N_TRAIN, N_TEST, seed=0))


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    """The directory of a 1000 / 300 image store: 20 steps of tiny() an epoch."""
    return _prepared(tmp_path_factory, "store_dir", 1000, 300)


@pytest.fixture(scope="session")
def small_store_dir(tmp_path_factory):
    """The directory of a 300 / 64 image store: 6 steps of tiny() an epoch, one test batch of 64."""
    return _prepared(tmp_path_factory, "small_store_dir", 300, 64)


@pytest.fixture(scope="session")
def cifar10_store_dir(tmp_path_factory):
    """The directory of a 1000 / 300 image synthetic CIFAR-10 store."""
    return _prepared(tmp_path_factory, "cifar10_store_dir", 1000, 300, dataset="cifar10")


# ---- the official data sets' files (cifar_files.py), small


@pytest.fixture
def official(tmp_path):
    """(cifar-100-python.tar.gz, {member: object}) of 300 / 100 images."""
    return write_official(tmp_path / "src")


@pytest.fixture
def official_md5s(monkeypatch, official):
    """`official`, counting as the official CIFAR-100 (the md5s prepare checks patched to its own)."""
    tarball, _ = official
    d = tarball.parent / "cifar-100-python"
    monkeypatch.setattr(fdata, "TARBALL_MD5", md5(tarball))
    monkeypatch.setattr(fdata, "MEMBER_MD5", {n: md5(d / n) for n in ("train", "test", "meta")})
    return official


@pytest.fixture
def official_tarball(tmp_path):
    """A cifar-100-python.tar.gz of 300 / 100 images (its md5s are not the official ones)."""
    return write_official(tmp_path / "official")[0]


@pytest.fixture
def official10(tmp_path):
    """(cifar-10-python.tar.gz, {member: object}) of 250 / 80 images."""
    return write_official(tmp_path / "src", n_train=250, n_test=80, dataset="cifar10")


@pytest.fixture
def official10_md5s(monkeypatch, official10):
    """`official10`, counting as the official CIFAR-10 (its md5s patched in as the official ones)."""
    tarball, _ = official10
    d = tarball.parent / "cifar-10-batches-py"
    monkeypatch.setattr(fdata, "TARBALL10_MD5", md5(tarball))
    monkeypatch.setattr(fdata, "MEMBER10_MD5", {n: md5(d / n) for n in fdata.MEMBER10_MD5})
    return official10


# ---- trained runs (on store_dir unless said; never written to by a test)


def _trained(tmp_path_factory, recipe, name="tiny", data_dir=None, **kw) -> Path:
    run = tmp_path_factory.mktemp(name) / "run"
    T.train(recipe, info(name), out=run, data_dir=data_dir, **QUIET, **kw)
    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, store_dir):
    """One epoch of tiny()."""
    return _trained(tmp_path_factory, tiny(train__epochs=1), data_dir=store_dir)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, store_dir):
    """Two epochs of tiny()."""
    return _trained(tmp_path_factory, tiny(train__epochs=2), data_dir=store_dir)


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of finished_run in tmp_path that counts as fastcifar's own: a test may resume or damage it."""
    return copy_run(finished_run, tmp_path / "run")


@pytest.fixture(scope="module")
def straight_run(store_dir, tmp_path_factory):
    """straight_run(mixed) -> the run dir of tiny() (mixed: with helpers.MIXED_EMA) trained 3 epochs
    without a stop (made once each)."""
    from helpers import MIXED_EMA

    runs = {}

    def get(mixed: bool) -> Path:
        if mixed not in runs:
            runs[mixed] = _trained(tmp_path_factory, tiny(**(MIXED_EMA if mixed else {})), data_dir=store_dir)
        return runs[mixed]

    return get


@pytest.fixture(scope="session")
def ema_run(store_dir, tmp_path_factory):
    """One epoch of tiny() with an EMA (decay 0.9) and flip TTA."""
    return _trained(tmp_path_factory, tiny(train__epochs=1, train__ema_decay=0.9, train__tta="flip"),
                    data_dir=store_dir)


@pytest.fixture(scope="session")
def earlier_run(store_dir, tmp_path_factory):
    """An earlier run (linear head, 1 epoch on 30% of the store) whose weights later runs start from."""
    return _trained(tmp_path_factory, tiny(train__epochs=1, data__subset=0.3), "earlier", data_dir=store_dir)


@pytest.fixture(scope="session")
def arc_teacher(store_dir, tmp_path_factory):
    """A teacher with an ArcFace head that evaluates on the plain cosine (as the tutorial's did)."""
    return _trained(tmp_path_factory, tiny(train__epochs=1, data__subset=0.3, aug__image_size=40, head__kind="arcface",
                                           head__s=8.0, head__m=0.35, head__eval_logits="cosine"),
                    "teach", data_dir=store_dir)


# the exported runs: name -> tiny() fields, one epoch each on small_store_dir
EXPORT_RUNS = {
    "linear": {}, "stem": {"model__cifar_stem": True, "data__subset": 0.34},  # stride 1: 4x the work
    "arcface": {"head__kind": "arcface", "head__embed_dim": 32, "aug__image_size": 40, "aug__interpolation": "cubic"},
    # the tutorial's ArcFace recipes evaluate on the plain cosine
    "arcface_cosine": {"head__kind": "arcface", "head__embed_dim": 32, "head__eval_logits": "cosine"}}


@pytest.fixture(scope="session")
def export_runs(small_store_dir, tmp_path_factory):
    """A folder of one-epoch runs, one per EXPORT_RUNS entry (a few seconds each on a CPU)."""
    root = tmp_path_factory.mktemp("export_runs")
    for name, fields in EXPORT_RUNS.items():
        T.train(tiny(train__epochs=1, **fields), info(name), out=root / name, data_dir=small_store_dir, **QUIET)
    return root


@pytest.fixture(scope="session")
def onnx_log():
    """The lines that exporting onnx_files printed."""
    return []


@pytest.fixture(scope="session")
def onnx_files(export_runs, small_store_dir, onnx_log):
    """{name: the .onnx export} of the linear and arcface export_runs."""
    import fastcifar.export as ex

    return {k: ex.export(export_runs / k, "onnx", data_dir=small_store_dir, log=onnx_log.append)
            for k in ("linear", "arcface")}


@pytest.fixture(scope="session")
def crafted(export_runs, small_store_dir, onnx_files, tmp_path_factory):
    """Exports of the linear run whose fastcifar metadata was changed after export: 10 classes named
    for 100 logits, a NaN mean, a 100000 px input side, a std beyond any float, and (ONNX) a side
    the graph does not take, and an ONNX model with no metadata at all."""
    import copy
    import json

    import onnx
    from safetensors.torch import save_file

    import fastcifar.export as ex

    d = tmp_path_factory.mktemp("crafted")
    c, state = ex.read_safetensors(ex.export(export_runs / "linear", "safetensors", out=d / "good.safetensors",
                                             data_dir=small_store_dir, **QUIET))
    few = dict(c, num_classes=10, class_names=c["class_names"][:10])
    nan = copy.deepcopy(c)
    nan["preprocess"]["mean"] = [float("nan")] * 3
    huge = copy.deepcopy(c)
    huge["preprocess"]["image_size"] = 100000
    vast = copy.deepcopy(c)
    vast["preprocess"]["std"] = [10 ** 400] * 3  # an integer beyond any float
    for name, card in (("classes", few), ("nan_mean", nan), ("huge_side", huge), ("vast_std", vast)):
        save_file(state, str(d / f"{name}.safetensors"), metadata={ex.CARD_KEY: json.dumps(card)})
    side = copy.deepcopy(c)
    side["preprocess"]["image_size"] = 48  # the graph takes 32x32
    for name, card in (("side", side), ("classes", few)):
        model = onnx.load(str(onnx_files["linear"]))
        next(p for p in model.metadata_props if p.key == ex.CARD_KEY).value = json.dumps(card)
        onnx.save(model, str(d / f"{name}.onnx"))
    model = onnx.load(str(onnx_files["linear"]))
    model.ClearField("metadata_props")  # an ONNX model from elsewhere: no card
    onnx.save(model, str(d / "plain.onnx"))
    return d


@pytest.fixture
def old_run(store_dir, tmp_path):
    """A finished 1-epoch run, rewritten as fastcifar wrote it before the fields of
    helpers.NEWER_FIELDS existed: its recipes (in recipe.json, last.pt, best.pt) lack them, its
    summary lacks select_on and tta."""
    import json

    from fastcifar import checkpoint
    from helpers import without_newer_fields

    run = tmp_path / "run"
    T.train(tiny(train__epochs=1, data__subset=0.3), info(), out=run, data_dir=store_dir, **QUIET)
    for name in ("last.pt", "best.pt"):
        ck = checkpoint.load(run / name)
        ck["recipe"] = without_newer_fields(ck["recipe"])
        checkpoint.save(run / name, ck)
    recipe = json.loads((run / "recipe.json").read_text())
    (run / "recipe.json").write_text(json.dumps(without_newer_fields(recipe)))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k not in ("select_on", "tta")}))
    assert "ema_decay" not in checkpoint.load(run / "last.pt")["recipe"]["train"]
    return run


# ---- recipes and tables in a working directory of their own

OWN_RECIPE = '''"""A one-epoch run of test_resnet for the ownership tests."""
from fastcifar.config import from_dict


def recipe():
    return from_dict({!r})
'''


@pytest.fixture
def table(tmp_path):
    """A reproduce table file listing one recipe (tiny_own: test_resnet, one epoch, a fifth of the store)."""
    recipe = tmp_path / "recipes" / "tiny_own.py"
    recipe.parent.mkdir()
    recipe.write_text(OWN_RECIPE.format(to_dict(tiny(train__epochs=1, data__subset=0.2))))
    (tmp_path / "table.txt").write_text(f"{recipe}\n")
    return tmp_path / "table.txt"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A directory with ./recipes/tiny_teacher.py and tiny_student.py, a table listing the student
    first, and a small synthetic store; the working directory for the test."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny_teacher.py").write_text(TEACHER)
    (tmp_path / "recipes" / "tiny_student.py").write_text(STUDENT)
    (tmp_path / "table.txt").write_text("# the student is listed first: it must still run after its teacher\n"
                                        "tiny_student   # distilled\n\ntiny_teacher\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- the package as a user installs it (test_package.py)


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel), built the way docker/Dockerfile builds them (`python -m build`: the sdist, then
    the wheel from the sdist), offline (--no-isolation: the dev extra brings build and setuptools)."""
    import shutil

    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    out = tmp_path_factory.mktemp("dist")
    run_ok([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], cwd=src, env=clean_env())
    sdist, = out.glob("fastcifar-*.tar.gz")
    wheel, = out.glob("fastcifar-*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory):
    """A fresh virtual environment holding the wheel, with this interpreter's site-packages behind it."""
    import sysconfig

    root = tmp_path_factory.mktemp("venv")
    run_ok([sys.executable, "-m", "venv", "--without-pip", root], cwd=root, env=clean_env())
    py = root / "bin" / "python"
    site = Path(run_ok([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root,
                       clean_env()).stdout.strip())
    ours = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    (site / "zz_fastcifar_test_deps.pth").write_text("\n".join(ours) + "\n")  # torch, timm, ... without a download
    run_ok([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", dists[1]],
           cwd=root, env=clean_env())
    return root


@pytest.fixture
def user_dir(tmp_path):
    """An empty working directory, away from the checkout."""
    d = tmp_path / "work"
    d.mkdir()
    return d


# ---- stand-ins and process-wide settings, undone when the test ends


@pytest.fixture
def odd_flags(monkeypatch):
    """Backend flags set to values no run chooses, so a run that forgets one leaves a visible change."""
    saved = backend_flags()
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, False
    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield backend_flags()
    torch.use_deterministic_algorithms(saved["deterministic"])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved["cudnn.benchmark"], saved["cudnn.allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = saved["matmul.allow_tf32"]


@pytest.fixture
def fast_math():
    """What the trainer sets for speed (TF32 matmuls and convolutions), then 'medium', which on a
    CPU lets oneDNN run float32 matmuls through bfloat16 where the CPU has it; restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())

    def on(precision):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision(precision)

    yield on
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend, the keyword arguments of each call recorded (the
    list yielded); dynamo's caches empty before and after. Dynamo decides about recompiling before
    any backend runs, so a test of recompiles takes seconds, not inductor's minutes on a CPU."""
    calls, real = [], torch.compile

    def compile_(model, **kw):
        calls.append(kw)
        return real(model, backend="aot_eager", **kw)

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()  # no graph another test compiled in this process
    yield calls
    torch._dynamo.reset()


class Unhandled(Exception):
    pass


@pytest.fixture
def tripwire():
    """tripwire(sig): until the test ends, sig raises Unhandled where fastcifar does not handle it
    (rather than killing the test process as it would kill fastcifar)."""
    saved = {}

    def arm(sig):
        def handler(signum, frame):
            raise Unhandled(signal.Signals(signum).name)
        saved[sig] = signal.signal(sig, handler)
        return handler

    yield arm
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def tiny_models(monkeypatch):
    """timm's 0.4M-parameter test_resnet stands in for resnet18/50 in the bench: the same code path,
    seconds not minutes."""
    from fastcifar import bench

    monkeypatch.setattr(bench, "MODELS", ("test_resnet",))
    monkeypatch.setattr(bench, "CPU_STEP_BATCH", {32: 8, 224: 2})


@pytest.fixture
def short_bench_plans(monkeypatch):
    """--quick's plans cut to one warm-up and one timed batch per row: the same rows through the same
    code, in a fraction of the time (the figures are the bench's business, not the tests')."""
    from fastcifar import bench

    monkeypatch.setitem(bench.PLAN, "quick", {32: (1, 1, 1), 224: (1, 1, 1)})
    monkeypatch.setitem(bench.STEP_PLAN, "quick", (1, 1, 1))


# what bench reads of a store before measuring: whether it is synthetic and its data set (meta.store)
STUB_STORE = SimpleNamespace(synthetic=True, dataset="cifar100", meta={}, dir=Path("stub-store"))


@pytest.fixture
def bench_spy(monkeypatch):
    """(fastcifar.bench, ran): ran records whether the bench got as far as its store or a stage."""
    from fastcifar import bench

    ran = []
    monkeypatch.setattr(bench, "bench_store", lambda *a, **k: ran.append("store") or STUB_STORE)
    monkeypatch.setattr(bench, "STAGES", {name: (lambda name=name, **k: ran.append(name) or []) for name in bench.STAGES})
    return bench, ran
