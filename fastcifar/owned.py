"""The one ownership rule: fastcifar deletes, replaces or recovers a path only if it can prove it
wrote it; every command that does goes through here. The proof: each folder fastcifar writes into
holds a manifest (MANIFEST) naming what it wrote there, by which command, with each one's identity
on disk: (st_dev, st_ino, size, mtime_ns) for a file written whole; (st_dev, st_ino) for a file it
appends to (metrics.jsonl, TensorBoard events) and for a folder it made (entry "."). A file the
user wrote, edited, copied in or put in its place fails that check, as does every file of a copied
folder; a folder moved whole keeps its inodes. The manifest proves itself the same way (it names
its own inode). Names, extensions and contents prove nothing."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from pathlib import Path

from fastcifar.errors import BadInput

MANIFEST = ".fastcifar-owned.json"


def _ident(st: os.stat_result, grows: bool) -> list[int]:
    return [st.st_dev, st.st_ino] + ([] if grows else [st.st_size, st.st_mtime_ns])


def _where(path: Path) -> tuple[Path, str, os.stat_result]:
    """(folder whose manifest names path, its name there, its lstat); a folder is "." in its own."""
    st = os.lstat(path)
    return (path, ".", st) if stat.S_ISDIR(st.st_mode) else (path.parent, path.name, st)


def _read(folder: Path) -> dict | None:
    """The folder's manifest entries {name: {"by", "id"}}: {} where there is none; None where that
    file is not one fastcifar wrote there (a look-alike, a copy, a link, damaged)."""
    try:
        fd = os.open(folder / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            doc = json.loads(f.read(64 << 20)) if stat.S_ISREG(st.st_mode) else None
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and doc.get("self") == [st.st_dev, st.st_ino] and isinstance(doc.get("entries"), dict)
    return doc["entries"] if ok else None


def is_ours(path, by: str | None = None) -> bool:
    """Whether fastcifar wrote path (as command `by`, if given) and it is still as written."""
    try:
        folder, name, st = _where(Path(path))
    except OSError:
        return False
    if name == MANIFEST:
        return _read(folder) is not None
    e = (_read(folder) or {}).get(name)
    return (isinstance(e, dict) and (by is None or e.get("by") == by) and isinstance(e.get("id"), list)
            and e["id"] == _ident(st, len(e["id"]) == 2))


def check(paths, by: str, hint: str) -> None:
    """BadInput unless each path is missing or `fastcifar by` wrote it, in a folder fastcifar records."""
    paths = [Path(p) for p in paths]
    theirs = [p for p in paths if os.path.lexists(p) and not is_ours(p, by)]
    theirs += sorted({p.parent / MANIFEST for p in paths if _read(p.parent) is None} - set(theirs))
    if theirs:
        refuse(theirs, hint, by)


def refuse(paths: list[Path], hint: str, by: str | None = None):
    """BadInput: fastcifar will not touch paths; hint says what to do ({it}: "it" or "them")."""
    one = len(paths) == 1
    same = not one and len({p.parent for p in paths}) == 1  # "a, b in DIR"
    names = ", ".join(p.name if same else str(p) for p in paths[:6])
    names += (f" and {len(paths) - 6} more" if len(paths) > 6 else "") + (f" in {paths[0].parent}" if same else "")
    raise BadInput(f"{f'`fastcifar {by}`' if by else 'fastcifar'} did not write {names}, or "
                   f"{'it was' if one else 'they were'} changed since (edited, copied, or put in place by something "
                   f"else); fastcifar deletes or replaces only what it can prove it wrote. "
                   + hint.replace("{it}", "it" if one else "them"))


def _write(folder: Path, entries: dict, create: bool = False) -> None:
    """The manifest, atomically; create: only where none is (another process may have just made one)."""
    m = folder / MANIFEST
    fd, tmp = tempfile.mkstemp(prefix=f"{MANIFEST}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            st = os.fstat(f.fileno())
            f.write(json.dumps({"self": [st.st_dev, st.st_ino], "entries": entries}).encode())
            f.flush()
            os.fsync(f.fileno())
        if create:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, m)  # the same inode under the manifest's name, or nothing
        else:
            os.replace(tmp, m)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _editing(folder: Path):
    """The folder's manifest entries to change, under a lock on the manifest (processes recording in
    one folder take turns); written back on the way out, deleted once it lists nothing."""
    m = folder / MANIFEST
    while True:
        try:
            fd = os.open(m, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            _write(folder, {}, create=True)
            continue
        except OSError:
            fd = None
            break  # a link or something else at the manifest's name: _read refuses it below
        with contextlib.suppress(OSError):  # a file system without locks: unguarded
            fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.lstat(m).st_ino:
                break  # still the manifest, not one a writer replaced while we waited
        os.close(fd)
    try:
        entries = _read(folder)
        if entries is None:
            refuse([m], f"Move it away: fastcifar keeps its record of what it wrote in {folder} under that name.")
        yield entries
        for name in [n for n in entries if n != "." and not os.path.lexists(folder / n)]:
            del entries[name]  # gone (deleted, or renamed by fastcifar): an inode reused later is not ours
        if entries:
            _write(folder, entries)
        else:
            os.unlink(m)
    finally:
        if fd is not None:
            os.close(fd)


def record(paths, by: str, grows: bool = False) -> None:
    """Enter paths just written (or made) by `fastcifar by` in their manifests; grows: appended to."""
    found = [_where(p) if os.path.lexists(p) else (p.parent, p.name, None) for p in map(Path, paths)]
    for folder in dict.fromkeys(f for f, _, _ in found):
        with _editing(folder) as entries:  # which strikes off every entry whose file is gone
            entries.update({name: {"by": by, "id": _ident(st, grows or name == ".")} for f, name, st in found
                            if f == folder and st is not None})


def remove(path, by: str) -> bool:
    """Delete the file path if `fastcifar by` wrote it; False, touching nothing, if not."""
    path = Path(path)
    if not is_ours(path, by):
        return False
    with _editing(path.parent) as entries:
        if not is_ours(path, by):  # again, under the lock
            return False
        os.unlink(path)
        entries.pop(path.name, None)
    return True


def remove_tree(folder, by: str) -> bool:
    """Delete a folder `fastcifar by` made and its files; False where anything else is left in it."""
    folder = Path(folder)
    if not is_ours(folder, by):
        return False
    entries = _read(folder) or {}
    for name in sorted(entries):  # the manifest goes last: a kill midway leaves the folder provably ours
        p = folder / name
        if name != "." and not p.is_dir() and is_ours(p):
            os.unlink(p)
    if any(n != MANIFEST for n in os.listdir(folder)):
        return False
    os.unlink(folder / MANIFEST)
    os.rmdir(folder)
    return True


def make_dirs(path) -> list[Path]:
    """`mkdir -p path`, returning the directories it made, outermost first, for remove_empty to undo
    when the command stops before writing into them. On an OSError it removes what it made, then raises."""
    missing, p = [], Path(path)
    while not p.exists() and not p.is_symlink():
        missing.append(p)
        p = p.parent
    made = []
    try:
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another process made it meanwhile: then it is not ours
                d.mkdir()
                made.append(d)
    except OSError:
        remove_empty(made)
        raise
    return made


def remove_empty(made: list[Path]) -> None:
    """Remove the directories make_dirs made, innermost first, while empty (rmdir refuses a filled one)."""
    for d in reversed(made):
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def hold(folder, busy: str):
    """Make folder (and parents) and lock it while the block runs (BadInput(busy) where another process
    holds it; the kernel drops a lock when its holder dies), then remove the folders made while empty."""
    folder, made, fd = Path(folder), [], None
    try:
        try:
            made = make_dirs(folder)  # one made meanwhile by another process is not ours: the lock decides
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise BadInput(f"Cannot create or open the directory {folder} ({e.strerror or e}); choose another --out.")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            made = []  # the holder's folder, not ours to remove
            raise BadInput(busy)
        except OSError:
            pass  # a file system without locks (some network ones): unguarded
        yield
    finally:
        remove_empty(made)  # while still locked: no other process can be inside
        if fd is not None:
            os.close(fd)
