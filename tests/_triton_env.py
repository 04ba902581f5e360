"""Imported first by the Triton test modules: without a CUDA device the kernels run on
CPU tensors under the Triton interpreter, which must be switched on before triton is
first imported. (conftest.py, which pytest loads first, makes engine/ and triton_kernels/
importable.)"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed")
