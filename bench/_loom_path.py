"""Imported first by the bench scripts: which Loom they run. The checkout's own engine when
it has its compiled ops (an editable install, ``setup.py build_ext --inplace``), else an
installed Loom (``pip install .``, a wheel: a checkout or sdist beside it has no
``engine._C``), else the checkout's source (the slow torch attention backend)."""
import glob
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if glob.glob(os.path.join(ROOT, "engine", "_C*")) or importlib.util.find_spec("engine") is None:
    sys.path.insert(0, ROOT)
