"""Compiler stacks: opcheck of every op on fuzzed inputs, every module kind under
torch.compile(fullgraph=True) and torch.export (save, load here and in a fresh process, run),
and torch.export of a swapped MiniLM-L6 against eager.

A process that loads an exported program must `import slmkern` first: that registers the
torch.ops.slmkern schemas and kernels the program calls.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from _child_env import child_env
import torch
from hypothesis import assume, given, settings
from torch import nn

import slmkern
from conftest import FUZZ_PROFILE
from fuzz_specs import CASES_RUN, OP_SPECS, Case, Spec
from slmkern.nn import Int4Linear, Int8Linear, SparseLinear


def pruned(lin: nn.Linear, pattern: str) -> nn.Linear:
    """Zero lin.weight in place: "2:4" keeps the 2 largest |w| of every group of 4 input columns,
    "unstructured" keeps the largest 20% of |w| (80% sparse)."""
    with torch.no_grad():
        w = lin.weight
        if pattern == "2:4":
            g = w.reshape(w.shape[0], -1, 4)
            keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
            w.copy_((g * keep).reshape(w.shape))
        else:
            thresh = w.abs().flatten().kthvalue(int(0.8 * w.numel())).values
            w.mul_(w.abs() > thresh)
    return lin


KINDS = {
    "Int8Linear-int8": lambda lin: Int8Linear.from_linear(lin, activations="int8"),
    "Int8Linear-float": lambda lin: Int8Linear.from_linear(lin, activations="float"),
    "Int4Linear-float": lambda lin: Int4Linear.from_linear(lin, group_size=32, activations="float", clip="minmax"),
    "Int4Linear-int8": lambda lin: Int4Linear.from_linear(lin, group_size=32, activations="int8", clip="minmax"),
    "SparseLinear-2:4-int8": lambda lin: SparseLinear.from_linear(pruned(lin, "2:4"), format="2:4", values="int8"),
    "SparseLinear-2:4-int4": lambda lin: SparseLinear.from_linear(pruned(lin, "2:4"), format="2:4", values="int4",
                                                                  group_size=32),
    "SparseLinear-unstructured-float": lambda lin: SparseLinear.from_linear(pruned(lin, "unstructured"),
                                                                            format="unstructured", values="float"),
}
OP_OF_KIND = {"Int8Linear-int8": "w8a8_linear", "Int8Linear-float": "w8a16_linear",
              "Int4Linear-float": "w4a16_linear", "Int4Linear-int8": "w4a8_linear",
              "SparseLinear-2:4-int8": "sparse24_linear", "SparseLinear-2:4-int4": "sparse24_w4a16_linear",
              "SparseLinear-unstructured-float": "sparse_linear"}
SPARSE_KINDS = [k for k in KINDS if k.startswith("SparseLinear")]
DIMS = (64, 96, 128, 64, 32)


class Net(nn.Module):
    """Linear layers (then swapped) with GELU between and a LayerNorm at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(DIMS[:-1], DIMS[1:]))
        self.norm = nn.LayerNorm(DIMS[-1])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.nn.functional.gelu(x)
        return self.norm(x)


def swapped_net(kinds: list[str], seed: int = 0) -> nn.Module:
    """Net with layer i swapped to kinds[i % len(kinds)]."""
    torch.manual_seed(seed)
    net = Net().eval()
    for i, lin in enumerate(net.layers):
        net.layers[i] = KINDS[kinds[i % len(kinds)]](lin)
    return net


MODELS = ({kind: [kind] for kind in KINDS} | {"mixed": [k for k in KINDS if k not in SPARSE_KINDS]}
          | {"sparse-mixed": SPARSE_KINDS + ["Int8Linear-int8"]})
FRESH_PROCESS_MODELS = ("mixed", "sparse-mixed")   # one fresh-process load each (a few seconds of imports)


def graph_ops(ep) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("spec", OP_SPECS, ids=lambda s: s.name)
def test_opcheck_on_fuzzed_inputs(spec: Spec):
    """torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) on drawn inputs:
    M = 0, batch dims, strided/expanded x, every dtype, bias kinds, with and without w_packed."""
    @settings(max_examples=60 if FUZZ_PROFILE == "nightly" else 6)
    @given(case=spec.cases())
    def check(case: Case):
        # opcheck compares eager vs traced outputs with assert_close (NaN != NaN): NaN/inf inputs
        # are the fuzz tests' business (tests/test_fuzz.py checks their positions bit for bit)
        assume(case.meta.get("special") not in ("nan", "inf"))
        CASES_RUN[f"opcheck {spec.name}"] = CASES_RUN.get(f"opcheck {spec.name}", 0) + 1
        op = getattr(torch.ops.slmkern, spec.name.split("[", 1)[0])   # "sparse24_linear[int8]" -> sparse24_linear
        torch.library.opcheck(op.default, case.args)

    check()


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("model_name", list(MODELS))
def test_compile_fullgraph(model_name):
    torch._dynamo.reset()
    model = swapped_net(MODELS[model_name])
    backend = "inductor" if model_name in ("mixed", "sparse-mixed") else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        for shape in [(5, DIMS[0]), (2, 7, DIMS[0])]:
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- torch.export
FRESH_LOAD = r"""
import sys, torch
import slmkern  # registers torch.ops.slmkern.* before the program is loaded
ep = torch.export.load(sys.argv[1])
data = torch.load(sys.argv[2])
for x, want in zip(data["x"], data["y"]):
    y = ep.module()(x)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
print("ok", len(data["x"]))
"""


@pytest.mark.parametrize("model_name", list(MODELS))
def test_export_save_load_run(model_name, tmp_path):
    model = swapped_net(MODELS[model_name])
    x = torch.randn(4, DIMS[0])
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    wanted = {f"slmkern.{OP_OF_KIND[k]}.default" for k in MODELS[model_name]}
    assert wanted <= graph_ops(ep), graph_ops(ep)

    xs = [x, torch.randn(1, DIMS[0]), torch.randn(33, DIMS[0])]
    with torch.no_grad():
        ys = [model(v) for v in xs]
    for v, want in zip(xs, ys):
        torch.testing.assert_close(ep.module()(v), want, rtol=0, atol=0)

    path = tmp_path / "model.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path))
    for v, want in zip(xs, ys):
        torch.testing.assert_close(loaded.module()(v), want, rtol=0, atol=0)

    if model_name not in FRESH_PROCESS_MODELS:   # the mixed models' fresh processes cover every kind
        return
    torch.save({"x": xs, "y": ys}, tmp_path / "io.pt")
    env = child_env()
    r = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(path), str(tmp_path / "io.pt")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and f"ok {len(xs)}" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"


# ----------------------------------------------------------------------------- MiniLM-L6
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    try:
        from slmkern import models
        return models.load_model("minilm")
    except Exception as exc:  # the offline model package is not installed
        pytest.skip(f"MiniLM not available: {exc}")


@pytest.mark.parametrize("config", ["int8", "int4"])
def test_export_swapped_minilm_matches_eager(minilm, config):
    import copy

    model, tok = minilm
    model = copy.deepcopy(model)
    cfg = slmkern.Int8Config() if config == "int8" else slmkern.Int4Config(group_size=128, clip="minmax")
    # the pooler too: poolers stay dense unless selected explicitly (_prune.head_reason)
    report = slmkern.quantize_(model, cfg, lambda m, fqn: True, progress=False)
    kinds = {type(m) for m in model.modules()}
    assert (Int8Linear if config == "int8" else Int4Linear) in kinds, report
    assert nn.Linear not in kinds, "every Linear of MiniLM should be swapped"
    enc = tok(["a gripping, funny and quietly moving film", "dull."], padding=True, return_tensors="pt")
    args = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        eager = model(**args).last_hidden_state
        ep = torch.export.export(model, (), kwargs=args, strict=False)
        out = ep.module()(**args).last_hidden_state
    op = "slmkern.w8a8_linear.default" if config == "int8" else "slmkern.w4a16_linear.default"
    assert op in graph_ops(ep)
    assert out.shape == eager.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
