"""The CPU kernel builds (amx / avx512 / avx2 / base) this machine can run, and a fixture that
switches engine._C to one of them for a test: the segment attention and the packed GEMM
are built per instruction set and follow engine._C.cpu_isa."""
import pytest

_ops = pytest.importorskip("engine._ops", reason="engine._C is not built (pip install -e .)")


def _isas() -> list[str]:
    found = []
    for name in ("amx", "avx512", "avx2", "base"):
        got = _ops.cpu_isa(name)
        if got not in found:
            found.append(got)
    _ops.cpu_isa("")
    return found


RUNNABLE = _isas()


def _params(names) -> list:
    """Every build by name; those this CPU cannot run are skipped with the reason (not left
    out: a run on a CPU without AMX tiles shows that the tile kernels were not tested)."""
    return [pytest.param(n, marks=pytest.mark.skipif(n not in RUNNABLE, reason=f"this CPU cannot run the {n} build"))
            for n in names]


ISAS = _params(("amx", "avx512", "avx2", "base"))
# The packed float32 GEMM's builds (amx runs the avx512 one; its bfloat16 GEMM from 16 rows
# is on tiles: the bfloat16 tests take ISAS).
GEMM_ISAS = _params(("avx512", "avx2", "base"))


@pytest.fixture
def isa(request):
    """Use with ``@pytest.mark.parametrize("isa", ISAS, indirect=True)``."""
    _ops.cpu_isa(request.param)
    yield request.param
    _ops.cpu_isa("")
