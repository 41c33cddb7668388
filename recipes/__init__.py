"""The recipes that ship with fastcifar (installed as `fastcifar.recipes`): one file per experiment.

`fastcifar.config` loads them by file, never by import; `fastcifar recipes` lists them.
"""
