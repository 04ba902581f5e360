"""Imported first by the Triton test modules: without a CUDA device the kernels run on
CPU tensors under the Triton interpreter, which must be switched on before triton is
first imported; the repo root (engine/, triton_kernels/) is made importable."""
import glob
import importlib.util
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if (glob.glob(os.path.join(ROOT, "engine", "_C*")) or importlib.util.find_spec("engine") is None) and ROOT not in sys.path:  # (as conftest.py)
    sys.path.insert(0, ROOT)
pytest.importorskip("triton", reason="triton is not installed")
