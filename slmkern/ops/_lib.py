"""The ``slmkern`` torch.library namespace and the check helpers every op file shares.

``ops/__init__.py`` and each ``ops/<stem>.py`` import these from here (never from each other), so the
op files sit side by side under the package without an import cycle.
"""
from __future__ import annotations

import torch

LIB = torch.library.Library("slmkern", "DEF")  # noqa: TOR901 - the op namespace lives here


def _type(cond: bool, msg: str) -> None:
    torch._check_type(cond, lambda: msg)


def _value(cond, msg: str) -> None:
    torch._check_value(cond, lambda: msg)


def as_rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """(..., K) -> (M, K) with unit inner stride and row stride >= K (copies only if needed)."""
    if x.dim() == 2 and x.stride(1) == 1 and x.stride(0) >= K:   # the common case, on every kernel call
        return x
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < K):
        x2 = x2.contiguous()
    return x2


def shape_only(w: torch.Tensor, w_packed: torch.Tensor | None) -> bool:
    """Is w a zero-stride stand-in that carries the weight's shape and dtype only?

    Accepted wherever w_packed (the CPU kernels' layout) is given: the CPU kernels read the
    weight from w_packed alone, so a module that holds only its packed copy passes
    ``torch.zeros((), dtype).expand(N, K)`` (or (N, K/2)) as w. Fakes read w's shape only.
    """
    return w_packed is not None and w.dim() == 2 and w.stride() == (0, 0) and w.device.type == "cpu"


# autograd helpers shared by the linear ops
def _note_x_bias(ctx, x, bias) -> None:
    ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_grads(ctx, grad, dense_weight, n_inputs: int, bias_index: int) -> tuple:
    """Gradients of y = x @ W.T + b for an op with n_inputs arguments: x (argument 0) gets
    grad @ W with W = dense_weight() (fp32, built only when needed), bias (argument bias_index)
    gets grad summed over rows; every other argument None."""
    out = [None] * n_inputs
    if ctx.needs_input_grad[0]:
        out[0] = (grad.float() @ dense_weight()).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[bias_index]:
        out[bias_index] = grad.reshape(-1, grad.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return tuple(out)
