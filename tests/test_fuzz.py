"""Property-based fuzzing of every public op and module against slmkern.reference.

The specs (input strategy, reference, comparison) live in tests/fuzz_specs.py.
Every case also draws the CPU ISA path (forced with _C.set_isa, restored to
"auto" afterwards). The "ci" hypothesis profile (default) runs a few dozen cases
per spec; `make fuzz` (HYPOTHESIS_PROFILE=nightly) runs >= 10,000 in all.
The session's total case count is printed at the end of the run.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fuzz_specs
from conftest import available_isas
from fuzz_specs import MODULE_SPECS, NOT_FUZZED, OP_SPECS, Case, Spec
from slmkern._backends import cpu as cpu_backend

ALL_SPECS = OP_SPECS + MODULE_SPECS


def isa_paths() -> list[str]:
    return available_isas() + ["auto"] if cpu_backend.has_cpp() else ["auto"]


def run_on(spec: Spec, case: Case, isa: str) -> torch.Tensor:
    if isa == "auto" or not cpu_backend.has_cpp():
        return spec.run(case)
    cpu_backend._C.set_isa(isa)
    try:
        return spec.run(case)
    finally:
        cpu_backend._C.set_isa("auto")


def count(spec: Spec) -> None:
    fuzz_specs.CASES_RUN[spec.name] = fuzz_specs.CASES_RUN.get(spec.name, 0) + 1


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_fuzz_matches_reference(spec: Spec):
    @given(case=spec.cases(), isa=st.sampled_from(isa_paths()))
    def check(case: Case, isa: str):
        count(spec)
        y = run_on(spec, case, isa)
        spec.check(y, spec.expected(case), case)
        if isa != "auto":  # the forced path was handed back
            assert cpu_backend._C.active_isa() == cpu_backend._C.detected_isa()

    check()


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_fuzz_check_catches_a_wrong_output(spec: Spec):
    """The comparison of each spec can fail: a single changed output (1 ulp where the spec is
    bit-exact, a quarter of its magnitude otherwise) is reported."""
    @settings(max_examples=5)
    @given(case=spec.cases())
    def check(case: Case):
        count(spec)
        y = spec.run(case)
        ref = spec.expected(case)
        finite = torch.isfinite(y).flatten().nonzero()
        assume(finite.numel() > 0)
        i = int(finite[len(finite) // 2])
        bad = y.clone().flatten()
        if spec.exact:
            bad[i] = torch.nextafter(bad[i:i + 1], torch.tensor([float("inf")], dtype=y.dtype))[0]
        else:
            bad[i] = bad[i] + (bad[i].abs() + 1) * 0.25
        with pytest.raises(AssertionError):
            spec.check(bad.reshape(y.shape), ref, case)

    check()


def test_every_op_has_a_spec():
    """A new op in the slmkern namespace needs an entry in fuzz_specs.OP_SPECS (or NOT_FUZZED)."""
    ops = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("slmkern::")}
    covered = {s.name.split("[", 1)[0] for s in OP_SPECS} | set(NOT_FUZZED)
    assert ops, "no slmkern ops registered"
    assert ops <= covered, f"ops without a fuzz spec: {sorted(ops - covered)} (add them to tests/fuzz_specs.py)"
