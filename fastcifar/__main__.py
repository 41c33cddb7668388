"""`python -m fastcifar ...`, which is how torchrun launches it (`torchrun -m fastcifar train`)."""

from fastcifar.cli import main

main()
