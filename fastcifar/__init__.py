"""fastcifar: CIFAR-100 training at the speed of the GPU, not of the data loader."""

import contextlib
import signal
import threading
from pathlib import Path

__version__ = "0.1.0"

# pipelines/ sits beside fastcifar/ in the repository and inside it once installed (pyproject's package-dir).
# Run from a checkout that is not installed, fastcifar's submodules are also looked up beside it, so
# `fastcifar.pipelines` is one package either way: a search path, not an alias module, so nothing is
# imported before it is asked for, and a wheel (which has fastcifar/pipelines/) never takes this branch.
if not (Path(__file__).parent / "pipelines").is_dir():
    __path__.append(str(Path(__file__).resolve().parent.parent))


class BadInput(Exception):
    """Bad usage or bad input: the CLI prints the message as one paragraph and exits 2."""


def shown(value, limit: int = 60) -> str:
    """repr(value) for an error message, its middle cut when longer than `limit` characters: a
    5,000-digit --set value or a pasted file must not fill the terminal."""
    try:
        r = repr(value)
    except (RecursionError, MemoryError):  # a value read from a file, nested thousands of levels deep
        return f"a {type(value).__name__} nested too deep to show"
    return r if len(r) <= limit else f"{r[:limit - 16]}...{r[-10:]} ({len(r):,} characters)"


def why(e: BaseException, limit: int = 300) -> str:
    """An exception for an error message: 'TypeError: its first line' (cut at `limit` characters),
    or its bare name when it has no message. Libraries' multi-line messages and advice stay out."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit].rstrip()}" if lines else type(e).__name__


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
    """Remove the directories make_dirs made, innermost first, while they are empty: rmdir refuses a
    directory that something else has filled, so only our own traces go."""
    for d in reversed(made):
        with contextlib.suppress(OSError):
            d.rmdir()


def stop_signals() -> list[signal.Signals]:
    """The signals that ask fastcifar to stop: Ctrl-C, SIGTERM (a job's time limit, `kill`) and
    SIGHUP (the terminal or ssh session closed), unless SIGHUP is ignored on purpose (`nohup`)."""
    hup = getattr(signal, "SIGHUP", None)
    return [signal.SIGINT, signal.SIGTERM] + ([hup] if hup and signal.getsignal(hup) is not signal.SIG_IGN else [])


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (a job's time limit, `timeout`, `kill`) and SIGHUP raise KeyboardInterrupt as Ctrl-C
    does, so what stops on one stops on the other: every command (cli.main), and a reproduce table or
    a bench called from Python. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.default_int_handler) for s in stop_signals() if s != signal.SIGINT}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
