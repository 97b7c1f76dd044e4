"""save / load: a compressed model as safetensors (canonical formats only) + ``slmkern_config.json``.

A checkpoint directory holds

* ``model.safetensors``: the model's ``state_dict`` -- dense parameters and every slmkern
  module's canonical buffers (never a kernel's packed layout); tied tensors stored once;
* ``slmkern_config.json``: format version, the sha256 and size of the tensor file, every
  tensor's name/shape/dtype, tied-tensor aliases, per packed module its ``slmkern_config()``
  (class, shapes, group size, activations...), per embedding that reads an int8 head's table
  (``slmkern.nn.Int8Embedding``, no tensor of its own) its config naming the head
  (``tied_embeddings``), the Hugging Face class name when there is one,
  and free-form ``meta`` (recipe, report);
* ``config.json`` (+ tokenizer files) when the model is a Hugging Face model.

Nothing is unpickled: safetensors parses its own header, and every tensor is checked against
the JSON before a module is built. A truncated or modified file fails with a ValueError that
says so. Writing goes into a temporary directory next to ``out`` which is renamed into place,
so a failed save never leaves a half-written directory.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkern.nn._base import PackedLinearBase

FORMAT_VERSION = 1
CONFIG_NAME = "slmkern_config.json"
TENSORS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (missing, truncated, tampered, mismatched)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def packed_module_classes() -> dict[str, type]:
    """Every PackedLinearBase subclass exported by slmkern.nn (SparseLinear included once merged)."""
    import slmkern.nn as snn

    return {name: obj for name, obj in vars(snn).items()
            if isinstance(obj, type) and issubclass(obj, PackedLinearBase) and obj is not PackedLinearBase}


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied embeddings) once; return (tensors, {alias: stored name})."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out, aliases


def save(model: nn.Module, out: str | os.PathLike, *, overwrite: bool = False, tokenizer: Any = None,
         meta: dict | None = None) -> Path:
    """Write ``model`` to the directory ``out`` (refused if it exists, unless overwrite=True)."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out: {str(out)!r} already exists; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out: {str(out)!r} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    modules = {fqn: m.slmkern_config() for fqn, m in model.named_modules() if isinstance(m, PackedLinearBase)}
    tied = _tied_embeddings(model)
    tensors, aliases = _dedupe(model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": "pt", "slmkern": str(FORMAT_VERSION)})
        cfg = {
            "slmkern_format_version": FORMAT_VERSION,
            "tensor_file": {"name": TENSORS_NAME, "bytes": (tmp / TENSORS_NAME).stat().st_size,
                            "sha256": _sha256(tmp / TENSORS_NAME)},
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in tensors.items()},
            "aliases": aliases,
            "modules": modules,
            "tied_embeddings": tied,
            "hf_class": type(model).__name__ if hasattr(getattr(model, "config", None), "to_dict") else None,
            "meta": meta or {},
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1, default=str))
        if cfg["hf_class"]:
            model.config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / "old")
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _tied_embeddings(model: nn.Module) -> dict[str, dict]:
    """{fqn: config} of every embedding that reads a head's table (slmkern.nn.Int8Embedding): the file holds
    the table once, under the head's name; load() rebuilds the tie from this."""
    from slmkern.nn import Int8Embedding

    names = {id(m): fqn for fqn, m in model.named_modules()}
    out = {}
    for fqn, m in model.named_modules():
        if isinstance(m, Int8Embedding):
            head = names.get(id(m.head))
            if head is None:
                raise ValueError(f"model: {fqn} reads the table of a head that is not a submodule of the model")
            out[fqn] = m.slmkern_config(head)
    return out


def _rebuild_tied(model: nn.Module, tied: dict) -> None:
    from slmkern.nn import Int8Embedding

    if not isinstance(tied, dict):
        raise CheckpointError(f"{CONFIG_NAME}: tied_embeddings must be an object, got {type(tied).__name__}")
    for fqn, tcfg in tied.items():
        try:
            model.get_submodule(fqn)
            head = model.get_submodule(str(tcfg.get("head")))
        except AttributeError:
            raise CheckpointError(f"tied embedding {fqn!r}: the model has no such submodule or head "
                                  f"{tcfg.get('head')!r}") from None
        try:
            new = Int8Embedding.from_config(tcfg, head)
        except ValueError as exc:
            raise CheckpointError(f"tied embedding {fqn!r}: {exc}") from None
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    f = path / CONFIG_NAME
    if not f.is_file():
        raise CheckpointError(f"{str(path)!r} is not a slmkern checkpoint (no {CONFIG_NAME})")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{f}: not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(cfg, dict) or cfg.get("slmkern_format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{f}: unsupported or missing slmkern_format_version "
                              f"(expected {FORMAT_VERSION}, got {cfg.get('slmkern_format_version') if isinstance(cfg, dict) else cfg!r})")
    for key in ("tensor_file", "tensors", "aliases", "modules"):
        if key not in cfg:
            raise CheckpointError(f"{f}: missing key {key!r}; the file is corrupt")
    return cfg


def _read_tensors(path: Path, cfg: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = path / cfg["tensor_file"]["name"]
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    size = f.stat().st_size
    if size != cfg["tensor_file"]["bytes"]:
        raise CheckpointError(f"{f}: {size} bytes, {CONFIG_NAME} says {cfg['tensor_file']['bytes']} "
                              "(the file is truncated or was replaced)")
    if _sha256(f) != cfg["tensor_file"]["sha256"]:
        raise CheckpointError(f"{f}: sha256 does not match {CONFIG_NAME} (the file was modified or is corrupt)")
    try:
        tensors = load_file(str(f), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{f}: cannot be parsed as safetensors ({exc})") from None
    want = cfg["tensors"]
    if set(tensors) != set(want):
        raise CheckpointError(f"{f}: tensor names differ from {CONFIG_NAME} "
                              f"(missing {sorted(set(want) - set(tensors))[:5]}, "
                              f"unexpected {sorted(set(tensors) - set(want))[:5]})")
    for name, spec in want.items():
        t = tensors[name]
        if list(t.shape) != list(spec["shape"]) or str(t.dtype).removeprefix("torch.") != spec["dtype"]:
            raise CheckpointError(f"{f}: tensor {name!r} is {list(t.shape)} {t.dtype}, "
                                  f"{CONFIG_NAME} says {spec['shape']} {spec['dtype']}")
    for alias, target in cfg["aliases"].items():
        if target not in tensors:
            raise CheckpointError(f"{CONFIG_NAME}: alias {alias!r} points at unknown tensor {target!r}")
        tensors[alias] = tensors[target]
    return tensors


def _build_hf(path: Path, cfg: dict) -> nn.Module:
    import transformers

    name = cfg.get("hf_class")
    if not name:
        raise CheckpointError(f"{path}: not a Hugging Face model; pass the model skeleton as model_or_config")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise CheckpointError(f"{path}: transformers has no class {name!r}")
    hf_cfg = transformers.AutoConfig.from_pretrained(str(path))
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights(), _meta_linears():
        return cls(hf_cfg)


@contextlib.contextmanager
def _meta_linears():
    """Every nn.Linear built inside gets its parameters on the meta device (no memory).

    A checkpoint's quantized/sparse layers replace those Linears anyway: building the dense
    skeleton first would touch the full fp32 model's memory (538 MB for SmolLM2-135M; glibc
    keeps most of it after the replacement) for a model that needs a fraction of it. Linears
    that stay dense are materialised by :func:`_materialize_meta` and filled from the checkpoint;
    nn.Linear has no non-persistent buffers, so nothing else needs recomputing.
    """
    orig = nn.Linear.__init__

    def init(self, in_features, out_features, bias=True, device=None, dtype=None):
        orig(self, in_features, out_features, bias, device="meta", dtype=dtype)

    nn.Linear.__init__ = init
    try:
        yield
    finally:
        nn.Linear.__init__ = orig


def _materialize_meta(model: nn.Module) -> None:
    """Linears still on meta after the packed modules went in: allocate them (the state dict fills them)."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and any(p.is_meta for p in mod.parameters(recurse=False)):
            mod.to_empty(device="cpu", recurse=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left without data after loading: {left[:5]}")


def _trim_heap() -> None:
    """Hand the heap pages the load freed back to the OS (glibc only; elsewhere a no-op).

    A load frees as much as it keeps: the file's tensors, the canonical codes once packed.
    glibc raises its mmap threshold after the first large free, so most of those blocks
    sit on the heap between live ones, and it keeps the freed pages resident (SmolLM2
    int4: ~200 MiB above the live tensors) until ``malloc_trim`` returns them.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def load(path: str | os.PathLike, model_or_config: nn.Module | None = None, *,
         device: str | torch.device = "cpu", fuse: bool = True) -> nn.Module:
    """Rebuild a saved model: the fast modules from their canonical tensors, repacked for ``device``.

    model_or_config: the dense model skeleton (an nn.Module of the same architecture, modified
    in place and returned), or None to build it from the saved Hugging Face config.
    fuse: apply the inference fusions of slmkern.nn.fuse (a GELU after an Int8Linear runs in the
    linear's kernel; query/key/value run as one kernel call; an encoder's attention runs slmkern::attention)
    where the CPU kernels fuse them natively; nothing about them is saved.
    """
    path = Path(path)
    cfg = read_config(path)
    tensors = _read_tensors(path, cfg)
    if model_or_config is None:
        model = _build_hf(path, cfg)
    elif isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        raise TypeError(f"model_or_config: expected an nn.Module or None, got {type(model_or_config).__name__}")
    classes = packed_module_classes()
    packed_keys = set()
    for fqn, mcfg in cfg["modules"].items():
        cls = classes.get(mcfg.get("class"))
        if cls is None:
            raise CheckpointError(f"module {fqn!r}: class {mcfg.get('class')!r} is not available in this build "
                                  f"(known: {sorted(classes)})")
        try:
            model.get_submodule(fqn)
        except AttributeError:
            raise CheckpointError(f"module {fqn!r}: the model has no such submodule") from None
        prefix = fqn + "."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        packed_keys.update(prefix + k for k in sub)
        try:
            new = cls.from_canonical(sub, mcfg, device=device)
        except ValueError as exc:
            raise CheckpointError(f"module {fqn!r}: {exc}") from None
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    _rebuild_tied(model, cfg.get("tied_embeddings", {}))
    rest = {k: v for k, v in tensors.items() if k not in packed_keys}
    _materialize_meta(model)
    model.to(device)
    try:
        result = model.load_state_dict(rest, strict=False)
    except RuntimeError as exc:   # size mismatches
        raise CheckpointError(f"{path}: checkpoint does not match the model: {str(exc).strip()[:500]}") from None
    del tensors, rest
    _trim_heap()
    missing = [k for k in result.missing_keys if k not in packed_keys]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")
    if fuse:
        from slmkern.nn.fuse import fuse_
        fuse_(model)
    return model.eval()
