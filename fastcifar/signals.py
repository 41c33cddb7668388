"""Ctrl-C, SIGTERM (a job's time limit, `timeout`, `kill`) and SIGHUP (the terminal or ssh session
closed): what asks fastcifar to stop, as KeyboardInterrupt for a command, or as a request that a
run honours after its current step (StopSignals). Python takes signals in the main thread only:
elsewhere each of these does nothing."""

import contextlib
import signal
import threading


class Stopped(Exception):
    """A stop signal ended a command (`bench`, `doctor`) early; what it did is printed and kept (exit 130)."""


def stop_signals() -> list[signal.Signals]:
    """The signals that ask fastcifar to stop; SIGHUP not when it is ignored on purpose (`nohup`)."""
    hup = getattr(signal, "SIGHUP", None)
    return [signal.SIGINT, signal.SIGTERM] + ([hup] if hup and signal.getsignal(hup) is not signal.SIG_IGN else [])


@contextlib.contextmanager
def _handled(handler, but=()):
    """Every stop signal (but those in `but`) handled by handler in the block, the previous handlers after."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.signal(s, handler) for s in (stop_signals() if main else []) if s not in but}
    try:
        yield
    finally:
        for s, previous in saved.items():
            signal.signal(s, previous)


def sigterm_as_ctrl_c():
    """SIGTERM and SIGHUP raise KeyboardInterrupt as Ctrl-C does: what stops on one stops on the other."""
    return _handled(signal.default_int_handler, but=(signal.SIGINT,))


@contextlib.contextmanager
def signals_held():
    """Stop signals held back until the block ends, then acted on as they would have been: for steps
    that must not be cut in two (a file renamed into place and entered in its manifest)."""
    got = []
    try:
        with _handled(lambda n, _: got.append(n)):
            yield
    finally:
        if got:
            signal.raise_signal(got[0])  # to the handler now in place: KeyboardInterrupt, a stop flag, ...


class StopSignals(contextlib.ExitStack):
    """A stop signal asks to stop after the current step (`requested`); a second quits at once."""

    def __init__(self, say=print):
        super().__init__()  # which puts the previous handlers back on exit
        self.signal, self.say = None, say

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        self.say(f"\n{signal.Signals(signum).name}: saving last.pt after this step (again to quit at once).")

    def __enter__(self):
        self.enter_context(_handled(self._handle))
        return self
