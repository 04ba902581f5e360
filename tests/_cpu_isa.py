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


ISAS = _isas()
# The packed float32 GEMM's builds (amx runs the avx512 one; its bfloat16 GEMM from 16 rows
# is on tiles: the bfloat16 tests take ISAS).
GEMM_ISAS = [i for i in ISAS if i != "amx"]


@pytest.fixture
def isa(request):
    """Use with ``@pytest.mark.parametrize("isa", ISAS, indirect=True)``."""
    _ops.cpu_isa(request.param)
    yield request.param
    _ops.cpu_isa("")
