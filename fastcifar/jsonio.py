"""Reading JSON that comes from a file or the command line: every failure is one BadInput naming
where it came from, and a small hostile input cannot make fastcifar allocate much before it is
refused. Every JSON fastcifar reads goes through here (summary.json, metrics.jsonl, recipe.json,
a store's meta.json, export cards, bench JSON, --set lists); writing is checkpoint.write_json."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from fastcifar.errors import BadInput, why

# Larger than any JSON fastcifar writes (a 10,000-epoch metrics.jsonl is ~5 MB; a bench JSON, a
# summary or a store's meta.json a few KB), small enough that parsing one costs well under 1 GB.
MAX_BYTES = 64 << 20
# fastcifar's files nest 5 levels at most (summary.json's provenance); past this a file is not one
# of them, and deeper values would crash whatever recursed over them later (repr, json.dumps).
MAX_DEPTH = 32


class NotJSON(BadInput):
    """The text is not JSON at all (cut short, garbage), as opposed to JSON that fastcifar refuses."""


def loads(text: str | bytes, where: str):
    """json.loads(text), or BadInput '<where> ...' saying why it is not JSON fastcifar reads: not
    JSON, not UTF-8, a number past Python's digit limit, nested past MAX_DEPTH, or out of memory."""
    too_deep = BadInput(f"{where} nests deeper than the {MAX_DEPTH} levels fastcifar reads; it is not a file "
                        f"fastcifar wrote.")
    try:
        obj = json.loads(text)
    except RecursionError:  # the parser recurses once per level: thousands of [ or {
        raise too_deep from None
    except MemoryError:
        raise BadInput(f"{where} is too large to parse in the memory here.") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise NotJSON(f"{where} is not JSON ({why(e)}).") from None
    if _depth(obj) > MAX_DEPTH:
        raise too_deep
    return obj


def _depth(obj) -> int:
    """How deep lists and objects nest in obj (a scalar: 0), without recursing."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            stack.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


def read_text(path: str | os.PathLike, max_bytes: int = MAX_BYTES) -> str:
    """A regular file's UTF-8 text, or BadInput (not a regular file, e.g. a FIFO; too large; not UTF-8)."""
    path, fd = Path(path), None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{path} is not a regular file.")
        if st.st_size > max_bytes:
            raise BadInput(f"{path} is {st.st_size / 2 ** 20:,.0f} MB, larger than any such file fastcifar writes "
                           f"({max_bytes >> 20} MB at most); it is not one.")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)  # a file growing meanwhile still stops here
    except OSError as e:
        raise BadInput(f"Cannot read {path} ({e.strerror or e}).") from None
    finally:
        if fd is not None:
            os.close(fd)
    if len(data) > max_bytes:
        raise BadInput(f"{path} is larger than any such file fastcifar writes ({max_bytes >> 20} MB at most).")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not UTF-8 text (byte {e.start}).") from None


def load(path: str | os.PathLike, max_bytes: int = MAX_BYTES):
    """The JSON in a file (read_text, then loads), or one BadInput naming the file."""
    return loads(read_text(path, max_bytes), str(path))
