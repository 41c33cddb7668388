"""`python -m fastcifar ...`, which is how torchrun launches it (`torchrun -m fastcifar train`)."""

from fastcifar.cli import main

if __name__ == "__main__":  # not when a child process (doctor's steps) imports the main module again
    main()
