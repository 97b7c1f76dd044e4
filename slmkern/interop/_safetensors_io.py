"""A strict, torch-only safetensors reader and writer for the interop loaders.

Why not the ``safetensors`` package: a checkpoint from another stack is untrusted
input. This reader checks every fact of the file before it creates a tensor, so
that a truncated or corrupted file raises :class:`CheckpointError` (a ValueError)
naming what is wrong, never anything else, and never reads outside the file.
Files written here are ordinary safetensors files (any safetensors reader loads them).

File layout (little-endian)::

    bytes 0..7     u64  H = length of the JSON header
    bytes 8..8+H   JSON {"<name>": {"dtype": "I32", "shape": [..], "data_offsets": [b, e]}, ...,
                         "__metadata__": {"str": "str"}}     (optional metadata)
    bytes 8+H..    the data buffer; tensor <name> is buffer[b:e], row-major, little-endian
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Mapping

import torch

__all__ = ["CheckpointError", "read_safetensors", "write_safetensors", "read_json", "read_checkpoint", "DTYPES"]

# header dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit


class CheckpointError(ValueError):
    """A checkpoint (file, header, tensor names, shapes or values) is not what the loader expects."""


def _read_all(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(f"{os.fspath(path)}: cannot read: {e}") from None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file -> ({name: CPU tensor (own memory)}, metadata). Strict; see module doc."""
    data = _read_all(path)
    where = os.fspath(path)
    if len(data) < 8:
        raise CheckpointError(f"{where}: truncated: {len(data)} bytes, a safetensors file has at least 8")
    H = int.from_bytes(data[:8], "little")
    if H < 2 or H > MAX_HEADER or 8 + H > len(data):
        raise CheckpointError(f"{where}: header length {H} is impossible for a file of {len(data)} bytes "
                              "(truncated or not a safetensors file)")
    try:
        header = json.loads(data[8:8 + H].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where}: header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    buf = memoryview(data)[8 + H:]
    spans = []
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} \
                or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where}: tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dt not in DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r}: unsupported dtype {dt!r} (expected one of {sorted(DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2 ** 40 for d in shape) or len(shape) > 8:
            raise CheckpointError(f"{where}: tensor {name!r}: bad shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs):
            raise CheckpointError(f"{where}: tensor {name!r}: bad data_offsets {offs!r}")
        b, e = offs
        dtype = DTYPES[dt]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (0 <= b <= e <= len(buf)) or e - b != nbytes:
            raise CheckpointError(f"{where}: tensor {name!r}: data_offsets {offs} do not hold {nbytes} bytes of "
                                  f"{dt}{shape} inside a {len(buf)}-byte buffer (truncated or corrupted file)")
        spans.append((b, e, name))
        raw = bytearray(buf[b:e])  # own copy: the tensor must not alias the file bytes
        t = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        t = t.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
        if nbytes and dtype == torch.bool and bool((t.view(torch.uint8) > 1).any()):
            raise CheckpointError(f"{where}: tensor {name!r}: BOOL bytes must be 0 or 1")
        if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover - little-endian hosts
            t = t.view(torch.uint8).reshape(*shape, -1).flip(-1).reshape(-1).view(dtype).reshape(shape)
        out[name] = t
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{where}: tensors {n0!r} and {n1!r} overlap in the data buffer")
    return out, dict(meta)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (any device; copied to CPU, contiguous) to a safetensors file."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, off = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or t.dtype not in _NAMES:
            raise TypeError(f"tensors[{name!r}]: expected a tensor of one of {sorted(map(str, _NAMES))}, "
                            f"got {getattr(t, 'dtype', type(t))}")
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((-len(h)) % 8)  # the data buffer starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object file (config.json, quantize_config.json) -> dict, or CheckpointError."""
    raw = _read_all(path)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{os.fspath(path)}: not valid UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{os.fspath(path)}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A safetensors file, or a Hugging Face checkpoint directory -> ({name: tensor}, config.json as a dict).

    A directory holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
    (``{"weight_map": {name: file}}``); ``config.json`` is optional here ({} when absent).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return read_safetensors(path)[0], {}
    cfg_path = os.path.join(path, "config.json")
    config = read_json(cfg_path) if os.path.exists(cfg_path) else {}
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return read_safetensors(single)[0], config
    if not os.path.exists(index):
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    wmap = read_json(index).get("weight_map")
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(wmap.values())):
        if os.path.basename(shard) != shard:
            raise CheckpointError(f"{index}: shard name {shard!r} must be a plain file name")
        part = read_safetensors(os.path.join(path, shard))[0]
        for name, t in part.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} appears in more than one shard")
            if wmap.get(name) != shard:
                raise CheckpointError(f"{path}/{shard}: tensor {name!r} is not listed for this shard in the index")
            tensors[name] = t
    missing = sorted(set(wmap) - set(tensors))
    if missing:
        raise CheckpointError(f"{index}: tensors listed but absent from their shards: {missing[:5]}")
    return tensors, config


def check_int4_groups(where: str, K: int, N: int, group_size, qz: torch.Tensor, sc: torch.Tensor) -> tuple[int, int]:
    """The group facts GPTQ and AWQ layers share: group_size, int32 qzeros [G, N/8], finite scales [G, N].

    Returns (g, G). Raises CheckpointError naming the tensor.
    """
    if type(group_size) is not int or (group_size != -1 and group_size <= 0):
        raise CheckpointError(f"{where}: group_size must be a positive int or -1, got {group_size!r}")
    g = K if group_size == -1 else group_size
    if K % g:
        raise CheckpointError(f"{where}: K={K} is not a multiple of group_size={g}")
    G = K // g
    if qz.dtype != torch.int32 or tuple(qz.shape) != (G, N // 8):
        raise CheckpointError(f"{where}.qzeros: expected int32 [{G}, {N // 8}], got {qz.dtype} {tuple(qz.shape)}")
    if not sc.is_floating_point() or tuple(sc.shape) != (G, N):
        raise CheckpointError(f"{where}.scales: expected float [{G}, {N}], got {sc.dtype} {tuple(sc.shape)}")
    if not bool(torch.isfinite(sc).all()):
        raise CheckpointError(f"{where}.scales: contains NaN or inf")
    return g, G
