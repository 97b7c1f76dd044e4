"""Swapped models under torch.compile(fullgraph=True) and torch.export."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from slmkern import Int8Config, quantize_


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(40, 72)
        self.down = nn.Linear(72, 24)
        self.norm = nn.LayerNorm(24)

    def forward(self, x):
        return self.norm(self.down(torch.nn.functional.gelu(self.up(x))))


def quantized_mlp(activations: str) -> nn.Module:
    model = MLP().eval()
    quantize_(model, Int8Config(activations=activations))
    return model


@pytest.mark.parametrize("activations", ["int8", "float"])
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_fullgraph_matches_eager(activations, backend):
    torch._dynamo.reset()
    model = quantized_mlp(activations)
    x = torch.randn(5, 40)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    # a second batch size must not break the graph either
    x2 = torch.randn(3, 7, 40)
    torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activations", ["int8", "float"])
def test_export_save_load_run(activations):
    model = quantized_mlp(activations)
    x = torch.randn(4, 40)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    op = "slmkern.w8a8_linear.default" if activations == "int8" else "slmkern.w8a16_linear.default"
    assert op in targets, targets
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    torch.testing.assert_close(loaded.module()(x), model(x), rtol=0, atol=0)


def test_compile_tiny_bert_fullgraph():
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16)
    model = transformers.BertModel(cfg).eval()
    quantize_(model, Int8Config())
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        eager = model(input_ids=ids).last_hidden_state
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
