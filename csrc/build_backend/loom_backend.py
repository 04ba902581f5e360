"""PEP 517 build backend: setuptools, compiled against the torch the user already has.

engine._C links against libtorch, so it must be built with the very torch it will be
imported with (same version, same C++ ABI). Listing ``torch`` in ``[build-system]
requires`` would make pip's isolated build environment fetch its own copy: by default
the newest release, a multi-GB CUDA build on Linux, possibly another version than the
one installed. Instead this backend finds the ``torch`` package of the interpreter
running pip (outside the isolated environment) and appends its ``site-packages`` to
``sys.path`` (after the isolated build tools, so pip's setuptools still wins). With
``--no-build-isolation`` torch is importable already and nothing changes.
"""
from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 (the hooks not overridden below)

_PROBE = ("import importlib.util, os; s = importlib.util.find_spec('torch'); "
          "print(os.path.dirname(os.path.dirname(s.origin)) if s and s.origin else '')")


def _installed_torch_site() -> str | None:
    """The directory holding the target interpreter's ``torch`` package, or None."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                             timeout=120, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[-1] if out else None


def _expose_torch() -> None:
    try:
        import torch  # noqa: F401  (no isolation, or torch in the build env: use it)
        return
    except ImportError:
        pass
    site = _installed_torch_site()
    if site is None:
        raise RuntimeError(
            "Loom's C++ extension is built against the installed PyTorch, and the build's "
            f"interpreter {sys.executable} has none. Install the CPU build of torch first "
            "(`pip install torch==2.13.0`), then `pip install .` (or `-e .`): pip's isolated build "
            "finds the torch of the interpreter running pip. Tools that build in a fresh "
            "environment of their own (`python -m build`, uv) cannot: build without isolation, "
            "e.g. `pip install setuptools wheel ninja && python -m build --wheel --no-isolation`.")
    if site not in sys.path:
        sys.path.append(site)


# The wheel hooks need torch (setup.py compiles engine._C); the source archive's do not.

def get_requires_for_build_wheel(config_settings=None):
    _expose_torch()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _expose_torch()
    return _setuptools.get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _expose_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _expose_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _expose_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _expose_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
