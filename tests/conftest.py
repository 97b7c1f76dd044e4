"""Shared fixtures: forced CPU ISA paths, seeded RNG, Triton interpreter on CPU-only machines."""
from __future__ import annotations

import os

# Triton kernels run on CPU tensors under the interpreter when no GPU is present.
# It must be set before triton (or slmkern.kernels) is imported.
if os.environ.get("SLMKERN_TEST_NO_INTERPRET") is None:
    try:
        import torch as _torch
        if not _torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Hypothesis profiles: "ci" (default, inside `make test`: a few dozen cases per fuzz test,
# derandomized) and "nightly" (`make fuzz`: >= 10,000 cases in all). Select with HYPOTHESIS_PROFILE.
_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=_FUZZ_HEALTH)
settings.register_profile("nightly", max_examples=1500, deadline=None, print_blob=True,
                          suppress_health_check=_FUZZ_HEALTH)
FUZZ_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(FUZZ_PROFILE)

import slmkern  # noqa: E402,F401
from slmkern._backends import cpu as cpu_backend  # noqa: E402

ALL_ISAS = ("ref", "avx2", "avx512", "avx512vnni")


def _check_mapped_packages() -> None:
    """setup.py installs kernels/ and benchmarks/ as slmkern.kernels and slmkern.benchmarks. Testing a
    source tree, they must be its own folders: a tree on PYTHONPATH over another tree's editable install
    would otherwise test the other tree's kernels and benchmarks, silently."""
    import importlib.util
    from pathlib import Path

    root = Path(slmkern.__file__).resolve().parents[1]
    if not (root / "setup.py").is_file():   # an installed or built slmkern (site-packages, build/asan/lib)
        return
    for name, folder in (("slmkern.kernels", "kernels"), ("slmkern.benchmarks", "benchmarks")):
        spec = importlib.util.find_spec(name)
        got = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
        if got != root / folder:
            pytest.exit(f"{name} comes from {got}, not from this tree's {folder}/ ({root}): install this tree "
                        "(pip install -e .), which maps the folder to that name", returncode=4)



def pytest_sessionstart(session):
    _check_mapped_packages()


def available_isas() -> list[str]:
    return list(cpu_backend._C.available_isas()) if cpu_backend.has_cpp() else []


@pytest.fixture(params=ALL_ISAS)
def cpu_isa(request):
    """Run the test once per ISA path, forced with _C.set_isa; skipped where this CPU lacks it."""
    if not cpu_backend.has_cpp():
        pytest.skip("slmkern._C is not built")
    if request.param not in available_isas():
        pytest.skip(f"this CPU lacks {request.param}")
    cpu_backend._C.set_isa(request.param)
    try:
        yield request.param
    finally:
        cpu_backend._C.set_isa("auto")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0x5EED)
    yield


def has_cuda() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_terminal_summary(terminalreporter):
    """Print how many fuzz cases ran (tests/fuzz_specs.py counts them)."""
    import sys
    specs = sys.modules.get("fuzz_specs")
    if specs is not None and specs.CASES_RUN:
        total = sum(specs.CASES_RUN.values())
        per = ", ".join(f"{k} {v}" for k, v in sorted(specs.CASES_RUN.items()))
        terminalreporter.write_line(f"fuzz [{FUZZ_PROFILE}]: {total} cases ({per})")
