"""Distillation recovery: fine-tune a pruned/quantized float student against its dense teacher.

Loss = T^2 * KL(teacher || student) on temperature-softened logits
     + hidden_weight * mean over layers of the normalised hidden-state MSE (optional)
     + label_weight * cross-entropy on ``labels`` when the batches carry them (optional).

The student's ``nn.Linear`` layers stay float while training; constraints ride on their
weights through ``torch.nn.utils.parametrize``:

* ``masks[fqn]`` (bool, weight-shaped): pruned weights are multiplied by the mask in the
  forward pass, so they get no gradient and are re-zeroed in the stored weight at the end;
* ``fake_quant[fqn]`` (w -> dequantized w, e.g. int8 per-channel or int4 groups with fixed
  scales): the forward sees the quantized weight, the gradient passes straight through
  (``w + (q(w) - w).detach()``).

Packing into Int8Linear / Int4Linear / SparseLinear happens after this, from the trained
float weights (``slmkern.compress`` does it). Deterministic for a given ``seed``.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from slmkern.algorithms import _calib


class _Constrain(nn.Module):
    """weight -> mask * weight, then fake-quantized with a straight-through estimator."""

    def __init__(self, mask: torch.Tensor | None, fq: Callable[[torch.Tensor], torch.Tensor] | None):
        super().__init__()
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool), persistent=False)
        self.fq = fq

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            w = w * self.mask
        if self.fq is not None:
            w = w + (self.fq(w.detach()) - w).detach()
        return w


@dataclasses.dataclass
class DistillReport:
    steps: int = 0
    first_loss: float = float("nan")   # mean of the first 10 steps
    last_loss: float = float("nan")    # mean of the last 10 steps
    seconds: float = 0.0
    constrained: int = 0               # Linear layers with a mask and/or fake quantization

    def __str__(self) -> str:
        return (f"distill: {self.steps} steps, loss {self.first_loss:.4f} -> {self.last_loss:.4f}, "
                f"{self.constrained} constrained layer(s), {self.seconds:.1f} s")


def _split_labels(batch: Any) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        b = dict(batch)
        return b, b.pop("labels", None)
    return batch, None


def _forward(model: nn.Module, batch: Any, hidden: bool):
    if isinstance(batch, dict):
        return model(**batch, output_hidden_states=True) if hidden else model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"distill: the model output {type(out).__name__} has no .logits")


def _kl(s: torch.Tensor, t: torch.Tensor, T: float, mask: torch.Tensor | None) -> torch.Tensor:
    s, t = s.float(), t.float()
    if s.dim() == 3 and mask is not None:          # (B, L, V) LM logits: only real tokens
        keep = mask.bool()
        s, t = s[keep], t[keep]
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                    reduction="batchmean") * (T * T)


def distill(student: nn.Module, teacher: nn.Module, data: Any, *, steps: int = 100, lr: float = 5e-5,
            temperature: float = 2.0, hidden_weight: float = 0.0, label_weight: float = 0.0,
            weight_decay: float = 0.0, masks: dict[str, torch.Tensor] | None = None,
            fake_quant: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
            train_embeddings: bool = False, seed: int = 0, progress: bool = True) -> DistillReport:
    """Train ``student`` in place for ``steps`` optimizer steps over ``data`` (cycled); returns a DistillReport.

    data: an iterable of model inputs (dicts like tokenizer output, optionally with ``labels``).
    masks / fake_quant: per Linear fqn, see the module docstring. Embeddings are frozen unless
    train_embeddings. Dropout stays off (the student runs in eval mode) so runs are repeatable.
    """
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    batches = _calib.as_batches(data)
    masks, fake_quant = dict(masks or {}), dict(fake_quant or {})
    linears = {fqn: m for fqn, m in student.named_modules() if type(m) is nn.Linear}
    unknown = sorted((set(masks) | set(fake_quant)) - set(linears))
    if unknown:
        raise ValueError(f"masks/fake_quant name modules that are not nn.Linear in the student: {unknown[:5]}")
    device = _calib.model_device(student)
    torch.manual_seed(seed)
    report = DistillReport()
    constrained = sorted(set(masks) | set(fake_quant))
    for fqn in constrained:
        parametrize.register_parametrization(linears[fqn], "weight",
                                             _Constrain(masks.get(fqn), fake_quant.get(fqn)))
    report.constrained = len(constrained)
    frozen = set()
    if not train_embeddings:
        for m in student.modules():
            if isinstance(m, nn.Embedding):
                frozen.update(id(p) for p in m.parameters())
    params = [p for p in student.parameters() if p.is_floating_point() and id(p) not in frozen]
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) not in frozen and p.is_floating_point())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up over 10% of the steps, then linear decay
        opt, lambda i: (i + 1) / warm if i < warm else max(0.0, (steps - i) / max(1, steps - warm)))
    teacher.eval()
    was_training = student.training
    student.eval()
    losses = []
    t0 = time.perf_counter()
    it = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = it = tqdm(it, desc="distill", unit="step")
    try:
        for _, batch in zip(it, itertools.cycle(batches)):
            inputs, labels = _split_labels(_calib.to_device(batch, device))
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            hidden = hidden_weight > 0 and isinstance(inputs, dict)
            with torch.no_grad():
                t_out = _forward(teacher, inputs, hidden)
            s_out = _forward(student, inputs, hidden)
            s_logits, t_logits = _logits(s_out), _logits(t_out)
            loss = _kl(s_logits, t_logits, temperature, mask)
            if hidden:
                hs = [((a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean().clamp(min=1e-8))
                      for a, b in zip(s_out.hidden_states, t_out.hidden_states)]
                loss = loss + hidden_weight * torch.stack(hs).mean()
            if label_weight > 0 and labels is not None:
                loss = loss + label_weight * F.cross_entropy(s_logits.float().reshape(-1, s_logits.shape[-1]),
                                                             labels.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
        for fqn in constrained:
            parametrize.remove_parametrizations(linears[fqn], "weight", leave_parametrized=False)
            if fqn in masks:
                with torch.no_grad():
                    linears[fqn].weight.mul_(masks[fqn].to(linears[fqn].weight.device))
        student.train(was_training)
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
    report.steps = len(losses)
    report.first_loss = sum(losses[:10]) / max(1, len(losses[:10]))
    report.last_loss = sum(losses[-10:]) / max(1, len(losses[-10:]))
    report.seconds = time.perf_counter() - t0
    return report
