"""GGUF (llama.cpp) checkpoints -> a Hugging Face model whose Linears hold the file's own int4/int8 codes.

transformers reads a GGUF's config and tokenizer and dequantizes every tensor to fp32; :func:`load_gguf`
keeps that skeleton (and its non-Linear tensors: norms, the embedding) and swaps each Linear whose
GGUF tensor has an exact slmkern form for an ``Int4Linear`` / ``Int8Linear`` built from the original
codes and scales: nothing is requantized, and every swapped layer is checked bit for bit against
transformers' (i.e. the ``gguf`` package's) fp32 dequantization of the same tensor.

Block layouts (ggml stores a ``[N, K]`` weight row by row, each row as K/32 blocks along K; ggml's
``ne0`` is K, so ``GGUFReader`` reports the shape as ``[K, N]``)::

    Q4_0  18 bytes: d fp16, qs uint8[16]; element j of the block is qs[j] & 0xF and element j+16 is
          qs[j] >> 4 (the two halves of the block, not neighbours);            w = d * (q - 8)
    Q4_1  20 bytes: d fp16, m fp16, qs uint8[16] (same nibble order);         w = d * q + m
    Q8_0  34 bytes: d fp16, qs int8[32];                                      w = d * q

Mappings (slmkern.formats.int4 packs consecutive k pairs, low nibble first, so the nibbles are
re-paired; the codes themselves are unchanged):

* Q4_0 -> int4 symmetric, g = 32: code = q, scale = d (fp32). ``(code - 8) * d`` is exact (an
  11-bit scale times a 4-bit integer), so the weight is GGUF's bit for bit.
* Q4_1 -> int4 offset form, g = 32: code = q, scale = d, offset = m; ``W = code * s + offset`` is
  GGUF's ``d * q + m`` with the same two fp32 roundings (the product is exact). A uint8 zero point
  cannot hold ``-m/d``, and a float zero point ``(code - zf) * s`` misses by an ulp in ~1 group in 10;
  the CPU kernels already add one per-group term (``sz``), which the prepack sets to ``-m``.
* Q8_0 -> ``Int8Linear`` only when every block of a row has the same d (and no code is -128): then
  the per-row scale is exact. slmkern's int8 format has per-row scales only, so a general Q8_0 tensor
  has no exact form: it is dequantized and requantized per row, with a log line naming the tensor.
  The tied embedding/head of a Q8_0 table stays transformers' exact fp32 dequantization, tied (one
  table; a quantized tied table is the embedding work of issue 17, part 4).
* F32 / F16 / BF16 Linears stay ``nn.Linear`` (exact). Other types (K-quants, Q5_x, IQ*) have no exact
  form: dequantized and requantized (int4 g32 asymmetric RTN for <= 4.5 bits/weight types, int8 per
  row otherwise), each with a warning naming the tensor.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from slmkern.formats import int4 as int4_format

logger = logging.getLogger("slmkern.gguf")

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
FLOAT_TYPES = ("F32", "F16", "BF16")
# types without an exact slmkern form that carry at most ~4.5 bits/weight: requantized to int4 g32
LOW_BIT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                 "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0")


class Int4OffsetWeight(NamedTuple):
    """An int4 weight in the offset form of slmkern.formats.int4: W = code * scales + offsets (g = 32)."""

    packed: torch.Tensor    # uint8 [N, K/2]
    scales: torch.Tensor    # float32 [N, K/32]
    offsets: torch.Tensor   # float32 [N, K/32]

    def dequantize(self) -> torch.Tensor:
        return int4_format.dequantize_offset(self.packed, self.scales, self.offsets, BLOCK)


class GGUFLayer(NamedTuple):
    """What load_gguf did with one Linear: ``action`` is exact | requantized | float | kept."""

    fqn: str
    tensor: str
    type: str
    action: str
    detail: str


# ----------------------------------------------------------------------------- blocks -> slmkern tensors
def _blocks(data, shape: tuple[int, int], qtype: str, name: str) -> np.ndarray:
    """Raw bytes of a [N, K] tensor -> uint8 [N, K/32, block bytes], every size checked."""
    N, K = shape
    if N <= 0 or K <= 0:
        raise ValueError(f"{name}: expected a non-empty [N, K] weight, got shape {shape}")
    if K % BLOCK != 0:
        raise ValueError(f"{name}: {qtype} stores blocks of {BLOCK} along K, but K={K} is not a multiple of {BLOCK}")
    bb = BLOCK_BYTES[qtype]
    arr = np.ascontiguousarray(np.asarray(data)).view(np.uint8).reshape(-1)
    if arr.size != N * (K // BLOCK) * bb:
        raise ValueError(f"{name}: {qtype} [N={N}, K={K}] needs {N * (K // BLOCK) * bb} bytes "
                         f"({K // BLOCK} blocks of {bb} per row), got {arr.size}")
    return arr.reshape(N, K // BLOCK, bb)


def _fp16(blocks: np.ndarray, start: int, name: str, what: str) -> torch.Tensor:
    v = torch.from_numpy(np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0].astype(np.float32))
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name}: block {what} contains NaN or inf")
    return v


def _packed_from_nibbles(qs: np.ndarray) -> torch.Tensor:
    """GGUF nibbles uint8 [N, G, 16] (element j low, j+16 high) -> slmkern packed uint8 [N, G*16]."""
    q = torch.from_numpy(np.ascontiguousarray(qs))
    codes = torch.cat((q & 0x0F, q >> 4), dim=-1)                # [N, G, 32] in k order
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(q.shape[0], -1).contiguous()


def q4_0_to_int4(data, shape: tuple[int, int], name: str = "tensor") -> int4_format.Int4Weight:
    """Q4_0 bytes of a [N, K] weight -> Int4Weight(packed, scales = d, zeros None): symmetric g32, exact."""
    b = _blocks(data, shape, "Q4_0", name)
    return int4_format.Int4Weight(_packed_from_nibbles(b[..., 2:]), _fp16(b, 0, name, "scale d"), None)


def q4_1_to_int4(data, shape: tuple[int, int], name: str = "tensor") -> Int4OffsetWeight:
    """Q4_1 bytes of a [N, K] weight -> Int4OffsetWeight(packed, scales = d, offsets = m): g32, exact."""
    b = _blocks(data, shape, "Q4_1", name)
    return Int4OffsetWeight(_packed_from_nibbles(b[..., 4:]), _fp16(b, 0, name, "scale d"),
                            _fp16(b, 2, name, "minimum m"))


def q8_0_blocks(data, shape: tuple[int, int], name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes of a [N, K] weight -> (codes int8 [N, K], d float32 [N, K/32]); w = d * q per block."""
    b = _blocks(data, shape, "Q8_0", name)
    q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(shape[0], shape[1]).copy())
    return q, _fp16(b, 0, name, "scale d")


def q8_0_per_row(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 [N, K], scale fp32 [N]) when a Q8_0 weight is exactly an slmkern per-row int8 weight
    (every block of a row has the same d, no code is -128), else None."""
    if bool((q == -128).any()) or not bool((d == d[:, :1]).all()):
        return None
    return q.contiguous(), d[:, 0].contiguous()


# ----------------------------------------------------------------------------- model import
def _shape(t) -> tuple[int, int]:
    dims = [int(x) for x in t.shape]
    if len(dims) != 2:
        raise ValueError(f"{t.name}: a Linear weight must be 2-D, the file has shape {dims} (ggml order)")
    return dims[1], dims[0]   # ggml lists ne0 = K first


def _row_permutation(processor, name: str, N: int) -> np.ndarray | None:
    """The row order transformers' tensor processor gives this tensor (llama's q/k un-permute), or None
    when the processor does more than reorder rows."""
    idx = np.arange(N, dtype=np.int64).reshape(N, 1)
    out = np.asarray(processor.process(idx, name).weights)
    if out.shape != (N, 1) or sorted(out[:, 0].tolist()) != list(range(N)):
        return None
    return out[:, 0].copy()


def _int4_module(linear: nn.Linear, q, activations: str):
    from slmkern.nn import Int4Linear

    N, K = linear.out_features, linear.in_features
    offsets = isinstance(q, Int4OffsetWeight)
    mod = Int4Linear(K, N, linear.bias is not None, BLOCK if K != BLOCK else -1, symmetric=not offsets,
                     activations=activations, offsets=offsets)
    getattr(mod, "unpack_", lambda: None)()   # real canonical buffers to write into (slmkern.nn._base)
    mod.weight.copy_(q.packed)
    mod.weight_scale.copy_(q.scales)
    if offsets:
        mod.weight_offset.copy_(q.offsets)
    if linear.bias is not None:
        mod.bias.copy_(linear.bias.detach())
    mod.prepack()
    return mod


def _int8_module(linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor, activations: str):
    from slmkern.nn import Int8Linear

    return Int8Linear.from_int8(linear, q, scale, activations)


def _requantize(linear: nn.Linear, qtype: str, activations: str):
    """No exact form: quantize transformers' fp32 dequantization (int4 g32 RTN or int8 per row)."""
    from slmkern.nn import Int4Linear, Int8Linear

    if qtype in LOW_BIT_TYPES and linear.in_features % BLOCK == 0:
        return (Int4Linear.from_linear(linear, BLOCK, False, activations, method="rtn", clip="mse"),
                "int4 g32 asymmetric (RTN, MSE clip)")
    return Int8Linear.from_linear(linear, "int8" if activations == "int8" else "float"), "int8 per-channel"


class _Flat:
    """The parts of a model transformers' GGUF name map reads, without submodules (it rebuilds gguf's whole
    name table once per submodule when it recurses: seconds for a 30-layer model)."""

    def __init__(self, model: nn.Module):
        self.config, self._keys = model.config, list(model.state_dict().keys())

    def state_dict(self):
        return dict.fromkeys(self._keys)

    def named_children(self):
        return []


def import_linears(model: nn.Module, path: str | os.PathLike, activations: str = "float") -> list[GGUFLayer]:
    """Swap ``model``'s nn.Linear layers (a transformers model loaded from the same GGUF file) for slmkern
    modules holding the file's codes; returns one GGUFLayer per Linear found in the file."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    if activations not in ("float", "int8"):
        raise ValueError(f"activations: expected 'float' or 'int8', got {activations!r}")
    reader = gguf.GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else ""
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    hf_names = get_gguf_hf_weights_map(_Flat(model), processor)   # one pass over the top-level names
    if any(t.name not in hf_names for t in reader.tensors):
        hf_names = get_gguf_hf_weights_map(model, processor)        # transformers' walk over every submodule
    modules = dict(model.named_modules())
    report = []
    for t in reader.tensors:
        hf = hf_names.get(t.name)
        if hf is None or not hf.endswith(".weight"):
            continue
        fqn = hf[: -len(".weight")]
        linear = modules.get(fqn)
        qtype = t.tensor_type.name
        if type(linear) is not nn.Linear:
            if linear is not None and qtype not in FLOAT_TYPES:
                tied = (getattr(model, "get_output_embeddings", lambda: None)() is not None
                        and model.get_output_embeddings().weight is linear.weight)
                msg = (f"gguf: {t.name} ({qtype}) -> {fqn} ({type(linear).__name__}) kept as its exact fp32 "
                       "dequantization" + (", tied to the lm_head (one table)" if tied else ""))
                logger.info(msg)
                report.append(GGUFLayer(fqn, t.name, qtype, "kept", msg))
            continue
        N, K = _shape(t)
        if (N, K) != (linear.out_features, linear.in_features):
            raise ValueError(f"{t.name}: shape [N={N}, K={K}] does not match {fqn} "
                             f"[{linear.out_features}, {linear.in_features}]")
        if qtype in FLOAT_TYPES:
            report.append(GGUFLayer(fqn, t.name, qtype, "float", "kept as nn.Linear (float in the file)"))
            continue
        perm = _row_permutation(processor, t.name, N)
        new, exact = None, None
        if perm is not None and qtype in ("Q4_0", "Q4_1"):
            q = (q4_0_to_int4 if qtype == "Q4_0" else q4_1_to_int4)(t.data, (N, K), t.name)
            q = type(q)(*(x[perm] if x is not None else None for x in q))
            if qtype == "Q4_1" and bool(((q.scales == 0) & (q.offsets != 0)).any()):
                logger.warning(f"gguf: {t.name} has Q4_1 blocks with d = 0 and m != 0: exact on the CPU kernels "
                               "(and in dequantized_weight), but the op-level float zero points (CUDA, no _C) "
                               "read those blocks as 0")
            exact = q.dequantize() if qtype == "Q4_1" else int4_format.dequantize(q.packed, q.scales, None, BLOCK)
            new, detail = _int4_module(linear, q, activations), (
                "int4 g32 symmetric" if qtype == "Q4_0" else "int4 g32 offset form (W = q*d + m)")
        elif perm is not None and qtype == "Q8_0":
            q, d = q8_0_blocks(t.data, (N, K), t.name)
            rows = q8_0_per_row(q[perm], d[perm])
            if rows is not None:
                exact = rows[0].float() * rows[1].unsqueeze(1)
                new, detail = _int8_module(linear, *rows, activations="int8" if activations == "int8" else "float"), \
                    "int8 per-channel (every block of a row has the same scale)"
        if new is not None:
            # the module's weight, as slmkern.formats defines it, against transformers' (the gguf package's)
            if not torch.equal(exact, linear.weight.detach().float()):
                raise ValueError(f"{t.name} -> {fqn}: the imported {qtype} codes do not reproduce transformers' "
                                 "dequantization bit for bit (unexpected tensor layout); not importing it")
            action = "exact"
        else:
            why = ("per-32 scales differ within a row; slmkern int8 has per-row scales" if qtype == "Q8_0"
                   else "no exact slmkern form" if perm is not None else
                   "transformers transforms this tensor beyond a row reorder")
            new, target = _requantize(linear, qtype, activations)
            detail = f"dequantized and requantized to {target}: {why}"
            logger.warning(f"gguf: {t.name} ({qtype}) -> {fqn}: {detail}")
            action = "requantized"
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        report.append(GGUFLayer(fqn, t.name, qtype, action, detail))
    n_exact = sum(r.action == "exact" for r in report)
    logger.info(f"gguf: {Path(path).name}: {n_exact} Linear layers imported exactly, "
                f"{sum(r.action == 'requantized' for r in report)} requantized, "
                f"{sum(r.action == 'float' for r in report)} left float")
    return report


def load_gguf(path: str | os.PathLike, activations: str = "float", return_report: bool = False):
    """Load a GGUF causal LM: the transformers model (config, norms, embedding: exact fp32) with every
    Q4_0/Q4_1 Linear as an ``Int4Linear`` (g32) holding the file's own codes and scales, Q8_0 Linears
    exactly as ``Int8Linear`` where the per-row form is exact, and anything else requantized with a log
    line (see the module docstring). activations: "float" (W4A16 / W8A16) or "int8" (W4A8 / W8A8).

    Returns the model in eval mode (and the list of GGUFLayer records with return_report=True).
    The tokenizer: ``slmkern.models.load_tokenizer(path)``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: {str(p)!r} is not a file")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"path: {str(p)!r} is not a GGUF file (no GGUF magic)")
    if activations not in ("float", "int8"):
        raise ValueError(f"activations: expected 'float' or 'int8', got {activations!r}")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    with torch.no_grad():
        report = import_linears(model, p, activations)
    return (model, report) if return_report else model
