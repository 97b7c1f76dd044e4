"""Frozen, JSON-serialisable configs for the model-level API."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from slmkern.formats.common import QUANT_GROUP_SIZES
from slmkern.formats.int8 import LINEAR_ACTIVATIONS as INT8_ACTIVATIONS


def _check_quant_group_size(group_size) -> None:
    """The group sizes slmkern's quantizers produce: QUANT_GROUP_SIZES or -1 (per-channel). The
    kernels take more (slmkern.formats.common.group_size_ok); configs keep to the tested choices."""
    if isinstance(group_size, bool) or group_size not in QUANT_GROUP_SIZES + (-1,):
        raise ValueError(f"group_size: expected {', '.join(map(str, QUANT_GROUP_SIZES))} or -1 (per-channel), "
                         f"got {group_size!r}")


class _ConfigMixin:
    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        kind = d.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"config type: expected {cls.__name__}, got {kind!r}")
        return cls(**d)


def config_from_dict(d: dict[str, Any]):
    """Rebuild any slmkern config from its to_dict() form (dispatch on "type")."""
    kinds = {c.__name__: c for c in (Int8Config, Int4Config, SparseConfig)}
    kind = d.get("type")
    if kind not in kinds:
        raise ValueError(f"config type: expected one of {sorted(kinds)}, got {kind!r}")
    return kinds[kind].from_dict(d)


@dataclasses.dataclass(frozen=True)
class Int8Config(_ConfigMixin):
    """Per-channel symmetric int8 weights.

    activations: "int8" (W8A8, dynamic per-token symmetric activations), "int7" (W8A8 with per-token
    asymmetric 7-bit activations: FBGEMM's reduce_range; the faster GEMM on AVX2 without VNNI) or
    "float" (W8A16, weight-only).
    skip_names: module-name suffixes never converted (e.g. an output head).
    smooth: SmoothQuant migration strength alpha in [0, 1] (None: off): per-input-channel scales
    max|x|^alpha / max|W|^(1-alpha) from the calibration data, folded into the previous norm /
    gated up_proj before quantizing (:func:`slmkern.algorithms.awq.smooth_scale_model`); for W8A8.
    """

    activations: str = "int8"
    skip_names: tuple[str, ...] = ("lm_head",)
    smooth: float | None = None

    def __post_init__(self) -> None:
        if self.activations not in INT8_ACTIVATIONS:
            raise ValueError(f"activations: expected one of {INT8_ACTIVATIONS}, got {self.activations!r}")
        if self.smooth is not None and (isinstance(self.smooth, bool) or not 0.0 <= float(self.smooth) <= 1.0):
            raise ValueError(f"smooth: expected None or a migration strength alpha in [0, 1], got {self.smooth!r}")
        object.__setattr__(self, "skip_names", tuple(self.skip_names))


@dataclasses.dataclass(frozen=True)
class Int4Config(_ConfigMixin):
    """Group-wise int4 weights.

    group_size: 32, 64, 128 or -1 (per-channel). symmetric: no zero points.
    activations: "float" (W4A16) or "int8" (W4A8, dynamic per-token activations).
    method: "rtn" (clip "minmax" | "mse"), "hqq" (data-free refinement) or "gptq"
    (needs calibration data; act_order, percdamp, block_size are its options; its clip may also
    be "hmse": the clipping search weighted by each input column's calibration energy diag(H)).
    awq: search activation-aware per-input-channel scales on the calibration data and fold them
    into the previous op (RMSNorm weight, gated MLP up_proj) before quantizing
    (:mod:`slmkern.algorithms.awq`; needs calibration data, any method); awq_grid: alphas tried.
    skip_names: module-name suffixes never converted (an output head dominates a small model's size
    and its error; it stays dense unless listed elsewhere).
    """

    group_size: int = 128
    symmetric: bool = False
    activations: str = "float"
    method: str = "rtn"
    clip: str = "mse"
    act_order: bool = True
    percdamp: float = 0.01
    block_size: int = 128
    skip_names: tuple[str, ...] = ("lm_head",)
    awq: bool = False
    awq_grid: int = 20

    def __post_init__(self) -> None:
        _check_quant_group_size(self.group_size)
        if self.clip == "hmse" and self.method != "gptq":
            raise ValueError("clip: 'hmse' needs calibration statistics; use it with method='gptq'")
        if not isinstance(self.awq_grid, int) or self.awq_grid < 1:
            raise ValueError(f"awq_grid: expected an int >= 1, got {self.awq_grid!r}")
        if self.activations not in ("float", "int8"):
            raise ValueError(f"activations: expected 'float' or 'int8', got {self.activations!r}")
        if self.method not in ("rtn", "hqq", "gptq"):
            raise ValueError(f"method: expected 'rtn', 'hqq' or 'gptq', got {self.method!r}")
        if self.clip not in ("minmax", "mse", "hmse"):
            raise ValueError(f"clip: expected 'minmax', 'mse' or 'hmse', got {self.clip!r}")
        if not (0 <= self.percdamp <= 1):
            raise ValueError(f"percdamp: expected a fraction in [0, 1], got {self.percdamp!r}")
        object.__setattr__(self, "skip_names", tuple(self.skip_names))


@dataclasses.dataclass(frozen=True)
class SparseConfig(_ConfigMixin):
    """Pruned weights kept sparse (slmkern.nn.SparseLinear); prune first (slmkern.algorithms).

    format: "auto" (2:4 when the weight has the pattern, unstructured above the measured sparsity
    threshold, else dense), "2:4", "unstructured" or "dense".
    values: "float", "int8" (dynamic int8 activations) or "int4" (2:4 only; group_size, symmetric).
    value_dtype: "float32" | "bfloat16" | "float16" for float values (None: the weight's dtype).
    skip_names: module-name suffixes never converted.
    """

    format: str = "auto"
    values: str = "float"
    group_size: int = 128
    symmetric: bool = False
    value_dtype: str | None = None
    skip_names: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        if self.format not in ("auto", "2:4", "unstructured", "dense"):
            raise ValueError(f"format: expected 'auto', '2:4', 'unstructured' or 'dense', got {self.format!r}")
        if self.values not in ("float", "int8", "int4"):
            raise ValueError(f"values: expected 'float', 'int8' or 'int4', got {self.values!r}")
        if self.values == "int4" and self.format in ("unstructured", "dense"):
            raise ValueError(f"values='int4' needs format '2:4' or 'auto', got {self.format!r}")
        _check_quant_group_size(self.group_size)
        if self.value_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"value_dtype: expected None, 'float32', 'bfloat16' or 'float16', got {self.value_dtype!r}")
        object.__setattr__(self, "skip_names", tuple(self.skip_names))
