"""Triton GPU kernels for slmkern (installed as slmkern.kernels; setup.py maps kernels/ there).

One file per op family: the kernels, their autotune configs keyed on a bucketed M, and a
launcher taking validated (M, K) rows. slmkern/_backends/triton.py registers the launchers as
the CUDA kernels of torch.ops.slmkern.*.
"""
from .w4a8 import w4a8_linear
from .w4a16 import w4a16_linear
from .w8a8 import w8a8_linear
from .w8a16 import w8a16_linear

__all__ = ["w4a8_linear", "w4a16_linear", "w8a8_linear", "w8a16_linear"]
