"""Distillation: masks stay fixed, fake quantization is straight-through, loss falls, runs repeat exactly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slmkern.algorithms.distill import distill
from slmkern.nn import Int8Linear
from slmkern.recipes import compress
from tests._tiny import MLP, bert_batches, tiny_bert


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 64, generator=g) for _ in range(n)]


def _kl(student, teacher, data):
    with torch.no_grad():
        return sum(torch.nn.functional.kl_div(student(x).log_softmax(-1), teacher(x).log_softmax(-1),
                                              log_target=True, reduction="batchmean") for x in data).item()


def _perturbed():
    teacher = MLP()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def test_loss_falls_and_masks_stay_zero():
    teacher, student = _perturbed()
    mask = torch.rand(128, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        student.fc1.weight.mul_(mask)
    data = _data()
    before = _kl(student, teacher, data)
    rep = distill(student, teacher, data, steps=40, lr=3e-3, masks={"fc1": mask}, progress=False)
    after = _kl(student, teacher, data)
    assert after < 0.5 * before, (before, after)
    assert bool((student.fc1.weight[~mask] == 0).all())
    assert bool((student.fc1.weight[mask] != 0).all())
    assert rep.steps == 40 and rep.last_loss < rep.first_loss and rep.constrained == 1
    assert not torch.nn.utils.parametrize.is_parametrized(student.fc1)       # constraints removed


def test_deterministic_with_a_seed():
    outs = []
    for _ in range(2):
        teacher, student = _perturbed()
        distill(student, teacher, _data(), steps=5, lr=1e-3, seed=7, progress=False)
        outs.append(student.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_fake_quant_is_straight_through():
    teacher, student = _perturbed()
    step = 0.05
    fq = {"fc2": lambda w: torch.round(w / step) * step}          # a coarse grid
    w0 = student.fc2.weight.detach().clone()
    seen = []
    h = student.fc2.register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    distill(student, teacher, _data(), steps=3, lr=1e-3, fake_quant=fq, progress=False)
    h.remove()
    assert all(torch.allclose(w, torch.round(w / step) * step) for w in seen)   # forward saw grid values
    assert not torch.equal(student.fc2.weight, w0)                # the float weight still learned


def test_compress_distills_on_the_fixed_int8_grid_then_packs():
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    data = bert_batches(3, labels=True)
    rep = compress(student, {"ignore": ["classifier"], "steps": [
        {"quantize": {"algorithm": "int8"}}, {"distill": {"steps": 4, "lr": 1e-3, "hidden_weight": 0.1,
                                                          "label_weight": 0.5}}]},
        calibration=data, teacher=teacher, progress=False)
    lin = student.bert.encoder.layer[0].intermediate.dense
    assert isinstance(lin, Int8Linear)
    assert any("distill: 4 steps" in n for n in rep.notes)
    ref_lin = teacher.bert.encoder.layer[0].intermediate.dense
    # the scale was fixed at the quantize step from the dense weight
    amax = ref_lin.weight.detach().abs().amax(1)
    assert torch.allclose(lin.weight_scale, amax / 127)


def test_bad_arguments():
    teacher, student = _perturbed()
    with pytest.raises(ValueError, match="steps"):
        distill(student, teacher, _data(), steps=0)
    with pytest.raises(ValueError, match="not nn.Linear"):
        distill(student, teacher, _data(), steps=1, masks={"nope": torch.ones(1)})
