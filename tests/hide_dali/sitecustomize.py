"""Python imports this at start-up in every process the tests start while FASTCIFAR_HIDE_DALI=1
(tests/conftest.py puts this folder first on PYTHONPATH): `import nvidia.dali` then fails there
too, as on a machine without DALI."""

import os
import sys

if os.environ.get("FASTCIFAR_HIDE_DALI") == "1":
    sys.modules["nvidia.dali"] = None  # the import system raises ImportError for a None entry
