"""Ctrl-C, SIGTERM (a job's time limit, `timeout`, `kill`) and SIGHUP (the terminal or ssh session
closed): what asks fastcifar to stop, as KeyboardInterrupt for a command, or as a request that a
run honours after its current step (StopSignals)."""

import contextlib
import signal
import threading


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


@contextlib.contextmanager
def signals_held():
    """Ctrl-C, SIGTERM and SIGHUP held back until the block ends, then acted on as they would have
    been: for steps that must not be cut in two (a file renamed into place and entered in its
    manifest). Outside the main thread it does nothing (Python runs signal handlers there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    saved = {s: signal.signal(s, lambda n, _: got.append(n)) for s in stop_signals()}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if got:
            signal.raise_signal(got[0])  # to the handler now in place: KeyboardInterrupt, a stop flag, ...


class StopSignals:
    """Ctrl-C / SIGTERM / SIGHUP as a request to stop after the current step (`requested`); a second
    one quits at once (KeyboardInterrupt). A context manager: the previous handlers come back on
    exit. Outside the main thread (where Python cannot take signals) it does nothing."""

    def __init__(self, say=print):
        self.signal, self.say, self._saved = None, say, {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        self.say(f"\n{signal.Signals(signum).name}: saving last.pt after this step (again to quit at once).")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._handle) for s in stop_signals()}
        return self

    def __exit__(self, *exc):
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        return False
