"""What a hostile or unlucky user does to `fastcifar prepare` and the store: point prepare at their
own files, kill it at the worst moment, feed it a gzip bomb or malformed pickles, ask for a
synthetic store bigger than the disk, damage a store. Each test names its case and what it
guards against (data loss, a traceback, or gigabytes of memory)."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from cifar_files import make_split, md5, write_official
from fastcifar.errors import BadInput
from fastcifar import data as fdata
from helpers import QUIET, cli, contents, one_paragraph

SMALL = dict(synthetic=True, n_train=200, n_test=100, **QUIET)


def _user_dir(d: Path) -> Path:
    """A directory of someone's own files."""
    (d / "thesis").mkdir(parents=True)
    (d / "thesis" / "chapter1.tex").write_text("months of work")
    (d / "notes.txt").write_text("do not delete")
    return d


def _leftovers(parent: Path, name: str = "store") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---- 1. prepare replaces only nothing, an empty directory, or a fastcifar store


def test_prepare_refuses_a_directory_of_user_files(tmp_path):
    mine = _user_dir(tmp_path / "mine")
    before = contents(mine)
    with pytest.raises(BadInput, match="not a fastcifar store") as e:
        fdata.prepare(mine, **SMALL, force=True)
    assert str(mine) in str(e.value)
    assert contents(mine) == before and _leftovers(tmp_path, "mine") == []


def test_prepare_refuses_a_regular_file(tmp_path, official_tarball):
    f = tmp_path / "results.csv"
    f.write_text("a,b\n1,2\n")
    for kwargs in (SMALL, dict(source=official_tarball, verify=False, **QUIET)):
        with pytest.raises(BadInput, match="is a file"):
            fdata.prepare(f, force=True, **kwargs)
    assert f.read_text() == "a,b\n1,2\n"


def test_prepare_refuses_the_data_folder_that_holds_the_store(tmp_path):
    data = tmp_path / "data"
    fdata.prepare(data / "cifar100", **SMALL)
    (data / "cifar-100-python.tar.gz").write_bytes(b"the cached download")
    before = contents(data)
    with pytest.raises(BadInput, match="not a fastcifar store"):
        fdata.prepare(data, **SMALL, force=True)
    assert contents(data) == before
    fdata.open_store(data / "cifar100")


def test_prepare_refuses_home_through_FASTCIFAR_DATA(tmp_path, monkeypatch):
    home = _user_dir(tmp_path / "home")
    (home / ".bashrc").write_text("export PATH")
    before = contents(home)
    monkeypatch.setenv("FASTCIFAR_DATA", str(home))
    with pytest.raises(BadInput, match=r"\$FASTCIFAR_DATA"):
        fdata.prepare(**SMALL)
    code, _, err = cli("prepare", "--synthetic", "--train", "200", "--test", "100", env={"FASTCIFAR_DATA": str(home)},
                       spawn=True)
    assert code == 2 and one_paragraph(err, home, "$FASTCIFAR_DATA"), err
    assert contents(home) == before


@pytest.mark.parametrize("where", ["the extracted source", "the folder holding it", "the tarball"])
def test_prepare_refuses_the_from_source_itself(tmp_path, where):
    tarball, _ = write_official(tmp_path / "src")
    extracted = tarball.parent / "cifar-100-python"
    data_dir, source = {"the extracted source": (extracted, extracted),
                        "the folder holding it": (tmp_path / "src", extracted),
                        "the tarball": (tarball, tarball)}[where]
    before = contents(tmp_path / "src")
    with pytest.raises(BadInput, match="holds the --from source"):
        fdata.prepare(data_dir, source=source, verify=False, force=True, **QUIET)
    assert contents(tmp_path / "src") == before


def test_prepare_refuses_a_store_that_also_holds_user_files(tmp_path):
    store = fdata.prepare(tmp_path / "store", **SMALL)
    (store / "my_notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="my_notes.txt"):
        fdata.prepare(store, **SMALL, seed=1, force=True)
    assert (store / "my_notes.txt").read_text() == "mine"
    assert fdata.open_store(store).meta["source"]["seed"] == 0


def test_prepare_replaces_empty_dirs_and_the_stores_it_built(tmp_path):
    (tmp_path / "empty").mkdir()
    assert fdata.open_store(fdata.prepare(tmp_path / "empty", **SMALL)).meta["creator"] == "fastcifar"
    store = fdata.prepare(tmp_path / "store", **SMALL)
    fdata.prepare(store, **SMALL, seed=1, force=True)
    assert fdata.open_store(store).meta["source"]["seed"] == 1
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path, "empty") == []


def test_a_store_whose_meta_json_was_rewritten_is_not_replaced(tmp_path):
    """meta.json's "creator" is content anyone can write: only the store's manifest (owned.py) lets
    prepare replace it, and a file rewritten by hand is no longer the one prepare wrote."""
    store = fdata.prepare(tmp_path / "store", **SMALL)
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "note": "mine"}))
    before = contents(store)
    with pytest.raises(BadInput, match=r"changed since \(meta.json\)"):
        fdata.prepare(store, **SMALL, seed=1, force=True)
    assert contents(store) == before


def test_symlinked_data_dir_keeps_its_link(tmp_path):
    target = fdata.prepare(tmp_path / "disk" / "cifar100", **SMALL)
    (tmp_path / "home").mkdir()
    link = tmp_path / "home" / "data"
    link.symlink_to(target)
    fdata.prepare(link, **SMALL, seed=1, force=True)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert fdata.open_store(link).meta["source"]["seed"] == 1 and fdata.open_store(target).meta["source"]["seed"] == 1
    assert sorted(os.listdir(tmp_path / "home")) == ["data"] and sorted(os.listdir(tmp_path / "disk")) == ["cifar100"]


def test_symlink_to_user_files_is_refused(tmp_path):
    mine = _user_dir(tmp_path / "mine")
    link = tmp_path / "data"
    link.symlink_to(mine)
    before = contents(mine)
    with pytest.raises(BadInput, match=f"which is {mine}"):
        fdata.prepare(link, **SMALL)
    assert link.is_symlink() and contents(mine) == before


def test_symlink_loop_is_refused_and_kept(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(BadInput, match="a loop"):
        fdata.prepare(tmp_path / "a", **SMALL)
    assert os.readlink(tmp_path / "a") == str(tmp_path / "b") and sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_cli_prepare_on_user_files_is_one_paragraph_exit_2(tmp_path):
    mine = _user_dir(tmp_path / "mine")
    before = contents(mine)
    code, _, err = cli("prepare", "--synthetic", "--train", "200", "--test", "100", "--force", "--data-dir", str(mine),
                       spawn=True)
    assert code == 2 and one_paragraph(err, mine, "fastcifar never replaces what it did not create"), err
    assert contents(mine) == before


def test_train_auto_prepare_refuses_user_files(tmp_path):
    """train() prepares a missing store itself: through data.prepare, so under the same guard."""
    from fastcifar.config import Recipe
    from fastcifar.train import train

    mine = _user_dir(tmp_path / "mine")
    before = contents(mine)
    r = Recipe()
    r.model.name, r.train.device, r.train.compile = "test_resnet", "cpu", False
    with pytest.raises(BadInput, match="not a fastcifar store") as e:
        train(r, {"name": "t", "description": "", "source": ""}, out=tmp_path / "run", data_dir=mine,
              log=lambda *a, **k: None)
    assert contents(mine) == before
    assert "prepare --synthetic" not in str(e.value)  # no advice the guard would refuse as well


# ---- 2. kill -9 at any point leaves the old store or the new one, and nothing else for long

KILLER = r"""
import os, signal, sys
import numpy as np
from fastcifar import data

point, dest = sys.argv[1], os.path.realpath(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_unlink, real_save = os.replace, os.unlink, np.save

def save(*a, **k):  # building: the third array (test images went before it) -> half a store
    save.calls += 1
    if save.calls == 3:
        die()
    return real_save(*a, **k)
save.calls = 0

def replace(src, dst):  # the old store just moved aside; the new one not yet in
    real_replace(src, dst)
    if str(src) == dest:
        die()

def unlink(path, *a, **k):  # the new store is in; the old one about to go, or three of its files gone
    if ".old-" in str(path):
        unlink.calls += 1
        if point == "after the swap" or unlink.calls > 3:
            die()
    return real_unlink(path, *a, **k)
unlink.calls = 0

if point == "building":
    np.save = save
elif point == "between the renames":
    os.replace = replace
else:
    os.unlink = unlink
data.prepare(dest, synthetic=True, n_train=200, n_test=100, seed=1, force=True, log=lambda *_: None)
"""

# point -> (what the kill leaves beside the store, the seed of the store recovery ends with)
KILL_POINTS = {
    "building": ([".store.tmp"], 0),
    "between the renames": ([".store.old", ".store.tmp"], 0),
    "after the swap": ([".store.old"], 1),
    "deleting the old store": ([".store.old"], 1),
}


@pytest.mark.parametrize("point,recover_with", [(p, "open_store") for p in KILL_POINTS]
                         + [("building", "prepare"), ("between the renames", "prepare")])
def test_kill_9_leaves_old_or_new_store(tmp_path, point, recover_with):
    store = fdata.prepare(tmp_path / "store", **SMALL)  # seed 0; the killed prepare writes seed 1
    r = subprocess.run([sys.executable, "-c", KILLER, point, str(store)], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left, seed = KILL_POINTS[point]
    assert [n.split("-")[0] for n in _leftovers(tmp_path)] == left  # the kill hit its window
    if point == "between the renames":
        assert not store.exists()  # the moment the old code lost the store
    if recover_with == "open_store":
        assert fdata.open_store(store).meta["source"]["seed"] == seed
    else:
        messages = []
        fdata.prepare(store, **{**SMALL, "log": messages.append})  # seed 0: the restored store is it
        assert any("already there" in m for m in messages), messages
    assert _leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_a_moved_aside_dir_that_is_no_store_is_kept_while_nothing_replaced_it(tmp_path):
    """With no store at the data dir, a .NAME.old-* that is not a store (its meta.json gone or never
    there) was not replaced by anything: recovery neither puts it back nor deletes it."""
    old = tmp_path / ".store.old-123-abcdef"
    old.mkdir()
    (old / "train_images.npy").write_bytes(b"what may be the only copy")
    with pytest.raises(BadInput, match="No prepared"):
        fdata.open_store(tmp_path / "store")
    assert (old / "train_images.npy").read_bytes() == b"what may be the only copy"


def test_a_meta_json_without_output_checksums_is_not_a_store(tmp_path):
    """Stores from before the creator field are told apart by format_version with the sha256s of their
    outputs: another tool's meta.json with a format_version and other checksums is not replaced."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "meta.json").write_text(json.dumps({"format_version": 1, "checksums": {"md5": "0" * 32}}))
    before = contents(theirs)
    with pytest.raises(BadInput, match="not a fastcifar store"):
        fdata.prepare(theirs, **SMALL, force=True)
    assert contents(theirs) == before


def test_a_store_directory_is_as_readable_as_any_directory(tmp_path):
    """The store is built in a mkdtemp directory (mode 0700) and renamed into place: it gets the
    umask's mode, so other users of a shared machine can read it as they could a mkdir'd one."""
    umask = os.umask(0o022)
    try:
        store = fdata.prepare(tmp_path / "store", **SMALL)
    finally:
        os.umask(umask)
    assert store.stat().st_mode & 0o777 == 0o755


PAUSED = r"""
import os, sys, time
import numpy as np
from fastcifar import data

dest, ready, go = sys.argv[1:4]
real_save = np.save

def save(*a, **k):  # pause mid-build until the test says go
    if not os.path.exists(ready):
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.05)
    return real_save(*a, **k)

np.save = save
data.prepare(dest, synthetic=True, n_train=200, n_test=100, seed=1, force=True, log=lambda *_: None)
"""


def test_a_live_builders_temp_dir_is_never_deleted(tmp_path):
    store = fdata.prepare(tmp_path / "store", **SMALL)
    ready, go = tmp_path / "ready", tmp_path / "go"
    p = subprocess.Popen([sys.executable, "-c", PAUSED, str(store), str(ready), str(go)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not ready.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), p.stderr.read() if p.poll() is not None else "builder never started"
        (live,) = _leftovers(tmp_path)
        assert live.startswith(".store.tmp-")
        fdata.open_store(store)                              # both clean up after killed prepares...
        fdata.prepare(store, **SMALL, seed=2, force=True)
        assert (tmp_path / live).is_dir()                    # ...but not a running one
    finally:
        go.touch()
        _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert fdata.open_store(store).meta["source"]["seed"] == 1 and _leftovers(tmp_path) == []


def test_concurrent_prepares_all_succeed_and_leave_one_complete_store(tmp_path):
    store = fdata.prepare(tmp_path / "store", **SMALL)
    code = ("import sys\nfrom fastcifar.data import prepare\n"
            "prepare(sys.argv[1], synthetic=True, n_train=3000, n_test=100, seed=int(sys.argv[2]), force=True, "
            "progress=False, log=lambda *_: None)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(store), str(seed)], stderr=subprocess.PIPE, text=True)
             for seed in (1, 2, 3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    assert fdata.open_store(store).meta["source"]["seed"] in (1, 2, 3)
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_killed_download_part_file_is_deleted_a_live_one_kept(tmp_path, monkeypatch, official_tarball):
    """download() records its .part file as prepare's (owned.py): a killed one's is deleted, a live
    one's (it holds the lock) kept, and a look-alike of the user's kept too."""
    from fastcifar import owned

    _official_md5s(monkeypatch, official_tarball)
    data = tmp_path / "data"
    data.mkdir()
    dead = data / "cifar-100-python.tar.gz.dead.part"
    dead.write_bytes(b"x" * 1000)
    live = data / "cifar-100-python.tar.gz.live.part"
    live.write_bytes(b"y" * 1000)
    owned.record([dead, live], "prepare", grows=True)  # as download() does
    mine = data / "cifar-100-python.tar.gz.mine.part"
    mine.write_bytes(b"my own half download")
    with open(live, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a download in progress holds its lock
        fdata.prepare(data / "cifar100", progress=False, **QUIET)
        assert not dead.exists() and live.exists() and mine.read_bytes() == b"my own half download"


def test_a_file_in_the_way_of_the_download_is_not_replaced(tmp_path, monkeypatch, official_tarball):
    _official_md5s(monkeypatch, official_tarball)
    data = tmp_path / "data"
    data.mkdir()
    mine = data / "cifar-100-python.tar.gz"
    mine.write_bytes(b"my own edited copy")
    with pytest.raises(BadInput, match="in the way"):
        fdata.prepare(data / "cifar100", progress=False, **QUIET)
    assert mine.read_bytes() == b"my own edited copy"


def _official_md5s(monkeypatch, tarball: Path):
    """The fixture tarball as the official download (file:// URL, its md5s the official ones)."""
    d = tarball.parent / "cifar-100-python"
    monkeypatch.setattr(fdata, "URL", tarball.as_uri())
    monkeypatch.setattr(fdata, "TARBALL_MD5", md5(tarball))
    monkeypatch.setattr(fdata, "MEMBER_MD5", {n: md5(d / n) for n in ("train", "test", "meta")})


# ---- 3. members far bigger than CIFAR's are refused before they are read


def _gzip_bomb(path: Path, member: str, size: int) -> Path:
    """A tar.gz of a few hundred KB whose `member` inflates to `size` bytes of zeros (concatenated
    gzip members, one per MiB: instant to write)."""
    info = tarfile.TarInfo(f"cifar-100-python/{member}")
    info.size = size
    mib = gzip.compress(bytes(1 << 20), 9)
    with open(path, "wb") as f:
        f.write(gzip.compress(info.tobuf(tarfile.GNU_FORMAT)))
        for _ in range(size >> 20):
            f.write(mib)
        f.write(gzip.compress(bytes(1024)))  # end of archive
    return path


def test_gzip_bomb_member_is_refused_before_reading_it(tmp_path):
    bomb = _gzip_bomb(tmp_path / "bomb.tar.gz", "train", 600 << 20)
    assert bomb.stat().st_size < 1 << 20
    code = ("from fastcifar.errors import BadInput\nfrom fastcifar.data import prepare\n"
            f"try:\n    prepare({str(tmp_path / 'store')!r}, source={str(bomb)!r}, verify=False, log=print)\n"
            "except BadInput as e:\n    print('BadInput:', e)\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "BadInput:" in r.stdout and "far more than CIFAR-100's 'train'" in r.stdout, r.stdout
    peak_mb = int(r.stdout.split()[-1]) / 1024  # kB
    assert peak_mb < 300, f"peak RSS {peak_mb:.0f} MB"
    assert not (tmp_path / "store").exists()


def test_oversized_meta_member_and_directory_file_are_refused(tmp_path):
    tarball, _ = write_official(tmp_path / "src", members={"meta": b"\x80" * (2 << 20)})
    with pytest.raises(BadInput, match="far more than CIFAR-100's 'meta'"):
        fdata.prepare(tmp_path / "store", source=tarball, verify=False, **QUIET)
    d, _ = write_official(tmp_path / "dir", tar=False)
    os.truncate(d / "train", 600 << 20)  # sparse: 600 MiB by its size, no disk used
    with pytest.raises(BadInput, match="far more than CIFAR-100's 'train'"):
        fdata.prepare(tmp_path / "store", source=d, verify=False, **QUIET)
    assert not (tmp_path / "store").exists()


def test_memory_error_is_bad_input_not_a_traceback(tmp_path, monkeypatch, official_tarball):
    def no_memory(*a):  # as the (N, 3072) -> (N, 32, 32, 3) copy of a huge split would
        raise MemoryError
    monkeypatch.setattr(fdata, "_split_arrays", no_memory)
    with pytest.raises(BadInput, match="Ran out of memory"):
        fdata.prepare(tmp_path / "store", source=official_tarball, verify=False, **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["official"]


# ---- 4. empty splits and malformed pickle fields


def _malformed():
    good = make_split(20, 5)
    empty = {**make_split(0, 5), b"data": np.zeros((0, 3072), np.uint8)}
    names = {b"fine_label_names": [b"f"] * 100, b"coarse_label_names": [b"c"] * 20}
    return {
        "empty train split": ({"train": empty}, "holds no images"),
        "empty test split": ({"test": empty}, "holds no images"),
        "class names are an int": ({"meta": {**names, b"fine_label_names": 100}}, "must be a list of 100 class names"),
        "class names are one string": ({"meta": {**names, b"coarse_label_names": b"x" * 20}}, "must be a list of 20"),
        "class names are ints": ({"meta": {**names, b"fine_label_names": list(range(100))}}, "non-strings"),
        "filenames is not a list": ({"train": {**good, b"filenames": 20}}, "'filenames' must be a list"),
        "labels are strings": ({"train": {**good, b"fine_labels": [str(i) for i in range(20)]}}, "flat list of integers"),
        "labels are ragged lists": ({"train": {**good, b"fine_labels": [[1], [2, 3]] * 10}}, "flat list of integers"),
        "labels are a dict": ({"test": {**good, b"coarse_labels": {1: 2}}}, "flat list of integers"),
    }


@pytest.mark.parametrize("case", list(_malformed()))
def test_malformed_pickle_fields_are_bad_input(tmp_path, case):
    members, message = _malformed()[case]
    tarball, _ = write_official(tmp_path / "src", members=members)
    with pytest.raises(BadInput, match=message):
        fdata.prepare(tmp_path / "store", source=tarball, verify=False, **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["src"]


# ---- 5. synthetic sizes: bounded, checked against the disk, generated in chunks


@pytest.mark.parametrize("n", ["10000000000", "-5"])
def test_cli_synthetic_train_out_of_bounds_is_exit_2_at_once(tmp_path, n):
    t = time.time()
    code, _, err = cli("prepare", "--synthetic", "--train", n, "--data-dir", str(tmp_path / "syn"), spawn=True)
    assert code == 2 and one_paragraph(err, "at most 2,000,000"), err
    assert time.time() - t < 60 and not (tmp_path / "syn").exists()


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "--seed", "-1"], "--seed -1"),
    (["--train", "300"], "--train shapes a --synthetic data set only"),
    (["--seed", "3", "--test", "50"], "--test and --seed shape a --synthetic"),
    (["--from", "{fifo}"], "is neither a file nor a directory"),
    (["--from", "{dangling}"], "a link that leads nowhere"),
])
def test_cli_prepare_options_that_cannot_apply_are_exit_2_at_once(tmp_path, args, message):
    os.mkfifo(tmp_path / "fifo")  # reading it would wait for a writer for ever
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.tar.gz")
    args = [a.format(fifo=tmp_path / "fifo", dangling=tmp_path / "dangling") for a in args]
    if "--from" not in args and "--synthetic" not in args:
        args += ["--from", str(tmp_path / "missing.tar.gz")]  # never a download, bug or not
    code, _, err = cli("prepare", *args, "--data-dir", str(tmp_path / "store"), spawn=True)
    assert code == 2 and one_paragraph(err, message), err
    assert sorted(os.listdir(tmp_path)) == ["dangling", "fifo"]


def test_synthetic_store_larger_than_the_free_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fdata.shutil, "disk_usage", lambda p: usage._replace(free=10 << 20))  # 10 MB free
    with pytest.raises(BadInput, match=r"needs 1\d\.\d MB but its file system has 10\.5 MB free"):
        fdata.prepare(tmp_path / "syn", synthetic=True, n_train=5000, n_test=100, **QUIET)
    assert os.listdir(tmp_path) == []


def test_disk_full_while_generating_is_bad_input_and_leaves_nothing(tmp_path, monkeypatch):
    def full(path, shape, chunks, done):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(fdata, "_save_chunks", full)
    with pytest.raises(BadInput, match="No space left"):
        fdata.prepare(tmp_path / "syn", **SMALL)
    assert os.listdir(tmp_path) == []


def test_synthetic_images_go_to_disk_a_chunk_at_a_time(tmp_path):
    """200000 images (614 MB) with cheap stand-in pictures: memory stays far below the array's size."""
    code = ("import numpy as np\nfrom fastcifar import data\n"
            "data._synthetic_images = lambda fine, rng, chunk: (np.full((min(chunk, len(fine) - lo), 32, 32, 3), lo % 251, "
            "np.uint8) for lo in range(0, len(fine), chunk))\n"
            f"data.prepare({str(tmp_path / 'syn')!r}, synthetic=True, n_train=200000, n_test=100, progress=False, "
            "log=lambda *_: None)\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    peak_mb = int(r.stdout.split()[-1]) / 1024
    assert peak_mb < 300, f"peak RSS {peak_mb:.0f} MB for a 614 MB array"
    store = fdata.open_store(tmp_path / "syn")
    assert store.images("train").shape == (200000, 32, 32, 3) and store.images("train")[4096, 0, 0, 0] == 4096 % 251


# ---- 6. a damaged store is found at open_store, with what to do


def _damage(store: Path, name: str, fn):
    arr = np.load(store / name)
    fn(arr)
    np.save(store / name, arr)


@pytest.mark.parametrize("case", ["fine label 100", "fine label -1", "coarse label 20"])
def test_store_labels_out_of_range_are_found_at_open(tmp_path, case):
    store = fdata.prepare(tmp_path / "store", **SMALL)
    name, value = {"fine label 100": ("train_labels.npy", 100), "fine label -1": ("test_labels.npy", -1),
                   "coarse label 20": ("train_coarse.npy", 20)}[case]
    _damage(store, name, lambda a: a.__setitem__(7, value))
    with pytest.raises(BadInput, match=r"outside 0\.\.(99|19)") as e:
        fdata.open_store(store)
    assert str(store) in str(e.value) and f"move {store} away" in str(e.value)  # an array rewritten: not prepare's


META_DAMAGE = {
    "not an object": lambda m: [m],
    "counts missing": lambda m: {k: v for k, v in m.items() if k != "counts"},
    "count is a string": lambda m: {**m, "counts": {"train": "200", "test": 100}},
    "empty split": lambda m: {**m, "counts": {"train": 0, "test": 100}},
    "mean of two numbers": lambda m: {**m, "mean": [0.5, 0.5]},
    "std holds a string": lambda m: {**m, "std": [0.2, "x", 0.2]},
    "class names a string": lambda m: {**m, "fine_label_names": "abc"},
    "format_version missing": lambda m: {k: v for k, v in m.items() if k != "format_version"},
}


@pytest.mark.parametrize("case", list(META_DAMAGE))
def test_malformed_store_meta_json_is_bad_input_at_open(tmp_path, case):
    store = fdata.prepare(tmp_path / "store", **SMALL)
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps(META_DAMAGE[case](meta)))
    with pytest.raises(BadInput) as e:
        fdata.open_store(store)
    assert str(store) in str(e.value)
    assert "move" in str(e.value)  # a meta.json rewritten by hand is not the one prepare wrote...
    with pytest.raises(BadInput, match="changed since"):
        fdata.prepare(store, **SMALL, force=True)  # ...so prepare does not replace it: the advice is right


def test_a_store_with_an_empty_split_is_bad_input_at_open(tmp_path):
    """A store whose meta.json and arrays agree on 0 train images is damaged (prepare never writes
    one): BadInput naming counts, not a numpy traceback from the label range check."""
    store = fdata.prepare(tmp_path / "store", **SMALL)
    np.save(store / "train_images.npy", np.zeros((0, 32, 32, 3), np.uint8))
    for name in ("train_labels.npy", "train_coarse.npy"):
        np.save(store / name, np.zeros(0, np.int64))
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "counts": {"train": 0, "test": meta["counts"]["test"]}}))
    with pytest.raises(BadInput, match="at least 1 image per split"):
        fdata.open_store(store)


@pytest.mark.parametrize("name", ["train_labels.npy", "test_coarse.npy"])
def test_store_labels_of_another_dtype_are_found_at_open(tmp_path, name):
    """Labels saved as int32 (another tool's store, a hand edit) would reach the loss as int32 and
    break the loader's int64 contract: open_store refuses them, saying what it expected."""
    store = fdata.prepare(tmp_path / "store", **SMALL)
    np.save(store / name, np.load(store / name).astype(np.int32))
    with pytest.raises(BadInput, match="int64 labels"):
        fdata.open_store(store)


def test_a_store_meta_without_its_source_is_bad_input_at_open(tmp_path):
    """prepare's already-there check reads meta["source"]: a meta.json without it is malformed at
    open_store, not a KeyError in the next prepare."""
    store = fdata.prepare(tmp_path / "store", **SMALL)
    meta = json.loads((store / "meta.json").read_text())
    del meta["source"]
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match="source must be an object"):
        fdata.open_store(store)


def test_unreadable_store_meta_advises_what_prepare_will_accept(tmp_path):
    store = fdata.prepare(tmp_path / "store", **SMALL)
    (store / "meta.json").write_text("{ cut short")
    with pytest.raises(BadInput, match=f"move {store} away"):
        fdata.open_store(store)
    with pytest.raises(BadInput, match=r"changed since \(meta.json\)"):  # as said: --force would not replace it
        fdata.prepare(store, **SMALL, force=True)
