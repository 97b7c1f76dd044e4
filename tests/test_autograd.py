"""Gradients flow to x (and bias) through the dequantized weight; no autograd warning."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from slmkern import Int4Config, Int8Config, quantize_
from slmkern.nn import Int4Linear, Int8Linear


def make(kind: str) -> nn.Module:
    lin = nn.Linear(64, 24)
    if kind.startswith("int8"):
        return Int8Linear.from_linear(lin, activations="int8" if kind == "int8-a8" else "float")
    return Int4Linear.from_linear(lin, group_size=32, activations="int8" if kind == "int4-a8" else "float")


@pytest.mark.parametrize("kind", ["int8-a8", "int8-a16", "int4-a8", "int4-a16"])
def test_grad_x_is_grad_through_dequantized_weight(kind):
    mod = make(kind)
    mod.bias.requires_grad_(True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    g = torch.randn(3, 5, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when an op has no autograd kernel
        mod(x).backward(g)
    w = mod.dequantized_weight()
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.bias.grad, g.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_weight_only_grad_matches_autograd_of_dense_equivalent():
    mod = make("int8-a16")
    dense = nn.Linear(64, 24)
    with torch.no_grad():
        dense.weight.copy_(mod.dequantized_weight())
        dense.bias.copy_(mod.bias)
    x1 = torch.randn(7, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    mod(x1).square().sum().backward()
    dense(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [Int8Config(activations="float"), Int4Config(group_size=32)])
def test_training_upstream_matches_dense_equivalent(cfg):
    """A layer trained in front of weight-only quantized layers follows the same trajectory
    as in a dense model holding the dequantized weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    quantize_(model, cfg, filter_fn=lambda m, fqn: fqn != "0")
    dense = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    with torch.no_grad():
        dense[0].load_state_dict(model[0].state_dict())
        for i in (2, 4):
            dense[i].weight.copy_(model[i].dequantized_weight())
            dense[i].bias.copy_(model[i].bias)
    x, y = torch.randn(64, 32), torch.randn(64, 8)
    traj = []
    for m in (model, dense):
        opt = torch.optim.SGD(m[0].parameters(), lr=0.5)
        losses = []
        for _ in range(10):
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        traj.append(losses)
    assert traj[0][-1] < traj[0][0]
    torch.testing.assert_close(torch.tensor(traj[0]), torch.tensor(traj[1]), rtol=1e-4, atol=1e-5)
