"""fastcifar: CIFAR-100 training at the speed of the GPU, not of the data loader."""

import signal

__version__ = "0.1.0"


class BadInput(Exception):
    """Bad usage or bad input: the CLI prints the message as one paragraph and exits 2."""


def stop_signals() -> list[signal.Signals]:
    """The signals that ask fastcifar to stop: Ctrl-C, SIGTERM (a job's time limit, `kill`) and
    SIGHUP (the terminal or ssh session closed), unless SIGHUP is ignored on purpose (`nohup`)."""
    hup = getattr(signal, "SIGHUP", None)
    return [signal.SIGINT, signal.SIGTERM] + ([hup] if hup and signal.getsignal(hup) is not signal.SIG_IGN else [])
