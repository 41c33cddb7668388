"""fastcifar: CIFAR-100 training at the speed of the GPU, not of the data loader."""

__version__ = "0.1.0"


class BadInput(Exception):
    """Bad usage or bad input: the CLI prints the message as one paragraph and exits 2."""
