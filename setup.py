"""Builds Loom's extension engine._C from csrc/: C++ (OpenMP). Metadata lives in
pyproject.toml.

LOOM_BUILD_CUDA=1 adds the CUDA sources (csrc/cuda: a CUDA loom::append_kv) when torch
has CUDA and nvcc is found. Off by default: on a GPU the engine runs its Triton kernels
and never calls that op, and a CUDA build fails outright when nvcc's CUDA version or the
host compiler differs from what torch was built with (a common setup), taking the CPU
ops and the plan builder with it.

LOOM_NATIVE=1 compiles for this machine's CPU (-march=native): faster baseline code,
but the result may not run on another machine. The default build is portable; the
attention kernel still uses AVX2 / AVX-512 where the CPU has them (run-time dispatch).
"""
import glob
import os
import shutil
import sys

from setuptools import find_namespace_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    # setuptools wants paths relative to setup.py
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _nvcc_found(cuda_home) -> bool:
    if shutil.which("nvcc"):
        return True
    return bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


def _extension():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # No -std: torch adds the standard its headers need (C++20 for torch 2.13; the code is C++17).
    # -fno-wrapv undoes Python's -fwrapv (in its CFLAGS): with wrapping int arithmetic the
    # compiler cannot widen loop indices, and the attention kernel runs 2-4x slower.
    # -fno-trapping-math: nothing here reads floating-point exception flags, and without it
    # GCC will not vectorise float -> int conversions (the exp in csrc/fused_cpu.cpp).
    # -g0: no debug information (Python's CFLAGS add -g: a 24 MB library instead of ~10).
    cxx = ["-O3", "-g0", "-fno-wrapv", "-fno-trapping-math", "-fopenmp", "-ffp-contract=fast"]
    if os.environ.get("LOOM_NATIVE") == "1":
        cxx.append("-march=native")
    kw = dict(
        name="engine._C",
        sources=_sources("csrc/*.cpp"),
        include_dirs=[os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        libraries=["gomp"],
    )
    want_cuda = os.environ.get("LOOM_BUILD_CUDA") == "1"
    if want_cuda and torch.version.cuda is not None and _nvcc_found(CUDA_HOME):
        kw["sources"] += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        kw["define_macros"] = [("LOOM_WITH_CUDA", "1")]
        kw["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]}
        ext = CUDAExtension(**kw)
    else:
        why = ("LOOM_BUILD_CUDA=1 not set" if not want_cuda else
               "torch has no CUDA" if torch.version.cuda is None else "nvcc not found")
        print(f"loom: building engine._C for the CPU only ({why})")
        kw["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension(**kw)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _sdist():
    """The source archive builds the wheel: setuptools' defaults list only the extension's
    .cpp sources, not the build backend (csrc/build_backend), the headers or csrc/cuda.
    (A command class rather than a MANIFEST.in: the repository's top level is fixed.)"""
    from setuptools.command.sdist import sdist

    class SdistWithSources(sdist):
        def make_distribution(self):
            self.filelist.graft("csrc")
            self.filelist.include("engine/DESIGN.md")
            self.filelist.graft("engine/assets")
            self.filelist.graft("bench")
            self.filelist.graft("tests")  # (all of it: the test files need conftest.py and helpers)
            for junk in ("*.so", "*.o", "*.pyc"):
                self.filelist.global_exclude(junk)
            self.filelist.exclude_pattern(r".*/__pycache__/.*", is_regex=True)
            self.filelist.sort()
            self.filelist.remove_duplicates()
            super().make_distribution()
    return SdistWithSources


def _source_only() -> bool:
    """A source archive or metadata only: no extension to build, so no torch needed."""
    args = set(sys.argv[1:])
    builds = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop", "bdist_egg"}
    return bool(args & {"sdist", "egg_info", "dist_info"}) and not args & builds


try:
    ext_modules, cmdclass = _extension()
except ModuleNotFoundError as e:
    if e.name != "torch" or not _source_only():
        raise
    ext_modules, cmdclass = [], {}
cmdclass["sdist"] = _sdist()

setup(
    # (namespace packages too: engine/assets/demo_model is package data without an __init__.py)
    packages=find_namespace_packages(where=HERE, include=["engine", "engine.*", "triton_kernels", "triton_kernels.*"],
                                      exclude=["*.__pycache__"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
