"""compressed-tensors interop, verified with the compressed-tensors package's own code.

slmkern -> compressed-tensors: our exported tensors are decompressed by compressed-tensors'
PackedQuantizationCompressor (and, at model level, by its ModelCompressor and by transformers'
loader) and must equal slmkern's dequantized weights exactly.
compressed-tensors -> slmkern: tensors compressed by compressed-tensors are imported and must
dequantize exactly to what compressed-tensors decompresses them to.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

ct_pkg = pytest.importorskip(
    "compressed_tensors",
    reason="compressed-tensors is not installed (pip install compressed-tensors==0.20.1); "
           "the interop tests verify against its own decompressors")

from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor as PQ  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.utils.helpers import pack_bitmasks, unpack_bitmasks  # noqa: E402

import slmkern  # noqa: E402
from slmkern.config import Int4Config, Int8Config  # noqa: E402
from slmkern.formats import int4, int8  # noqa: E402
from slmkern.interop import compressed_tensors as ct  # noqa: E402
from slmkern.interop._safetensors_io import CheckpointError, read_safetensors  # noqa: E402
from slmkern.nn import Int4Linear, Int8Linear  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _scheme(args: dict) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))


def _ct_decompress(tensors: dict, args: dict) -> torch.Tensor:
    return PQ.decompress(dict(tensors), _scheme(args))["weight"]


# ----------------------------------------------------------------------------- int4 / int8, one layer
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("N,K", [(13, 128), (8, 256), (33, 384)])
def test_int4_export_decompressed_by_compressed_tensors(symmetric, group_size, N, K):
    torch.manual_seed(N * K + group_size)
    q = int4.quantize(torch.randn(N, K), group_size, symmetric)
    tensors, args = ct.int4_to_pack_quantized(q)
    assert args["strategy"] == ("channel" if group_size in (-1, K) else "group")
    assert tensors["weight_packed"].dtype == torch.int32 and tuple(tensors["weight_packed"].shape) == (N, K // 8)
    assert ("weight_zero_point" in tensors) == (not symmetric)
    out = _ct_decompress(tensors, args)
    assert out.dtype == torch.float32
    assert torch.equal(out, q.dequantize())


@pytest.mark.parametrize("K", [36, 44])  # per-channel with K % 8 == 4: the last word is half padding
def test_int4_export_k_not_multiple_of_8(K):
    q = int4.quantize(torch.randn(9, K), -1, False)
    tensors, args = ct.int4_to_pack_quantized(q)
    assert tuple(tensors["weight_packed"].shape) == (9, (K + 7) // 8)
    assert torch.equal(_ct_decompress(tensors, args), q.dequantize())
    back = ct.pack_quantized_to_int4(tensors, args)
    assert torch.equal(back.packed, q.packed) and torch.equal(back.zeros, q.zeros)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [16, 32, 128, -1])   # 16: any even g dividing K is slmkern int4
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_import_of_compressed_tensors_output(symmetric, group_size, scale_dtype):
    torch.manual_seed(group_size + symmetric)
    N, K = 24, 256
    w = torch.randn(N, K)
    ref = int4.quantize(w, group_size, symmetric)           # scale / zero_point to hand to compressed-tensors
    args = ct.weight_args(4, symmetric, None if group_size == -1 else group_size)
    sd = {"weight": w, "weight_scale": ref.scales.to(scale_dtype)}
    if not symmetric:
        sd["weight_zero_point"] = (ref.zeros.to(torch.int16) - 8).to(torch.int8)   # signed zero points
    comp = PQ.compress(sd, _scheme(args))
    q = ct.pack_quantized_to_int4(comp, args, shape=(N, K))
    expect = _ct_decompress(comp, args)                     # computed in the scales' dtype
    # (code - zero) * scale is exact in fp32 for fp16/bf16 scales; compressed-tensors rounds it to their dtype
    assert expect.dtype == scale_dtype
    assert torch.equal(q.dequantize().to(scale_dtype), expect)
    assert torch.equal(q.scales, sd["weight_scale"].float())
    if scale_dtype == torch.float32:  # same scales: compressed-tensors' rounding is ours
        assert torch.equal(q.packed, ref.packed)


@pytest.mark.parametrize("K", [37, 64, 130])
def test_int8_export_and_import(K):
    torch.manual_seed(K)
    w, s = int8.quantize_per_channel(torch.randn(11, K))
    tensors, args = ct.int8_to_pack_quantized(w, s)
    assert tuple(tensors["weight_packed"].shape) == (11, (K + 3) // 4)
    assert torch.equal(_ct_decompress(tensors, args), int8.dequantize(w, s))
    w2, s2 = ct.pack_quantized_to_int8(tensors, args)
    assert torch.equal(w2, w) and torch.equal(s2, s)
    # compressed-tensors' own compression of the same quantization imports to the same int8 weight
    comp = PQ.compress({"weight": int8.dequantize(w, s), "weight_scale": s.reshape(-1, 1)}, _scheme(args))
    assert torch.equal(comp["weight_packed"], tensors["weight_packed"])


@pytest.mark.parametrize("bits,symmetric,group_size", [(8, False, 32), (8, True, 64), (4, False, 1), (8, False, None)])
def test_other_variants_decode_but_are_refused(bits, symmetric, group_size):
    """What slmkern cannot hold exactly (int8 group/asymmetric, an odd int4 group) is refused on import,
    while the generic decoder still equals compressed-tensors' decompression."""
    torch.manual_seed(bits + group_size if group_size else 0)
    N, K = 16, 128
    w = torch.randn(N, K)
    G = 1 if group_size is None else K // group_size
    args = ct.weight_args(bits, symmetric, group_size)
    qmax = 2 ** (bits - 1)
    scale = (w.reshape(N, G, -1).abs().amax(-1) / qmax).clamp(min=1e-6)
    sd = {"weight": w, "weight_scale": scale}
    if not symmetric:
        sd["weight_zero_point"] = torch.randint(-qmax // 2, qmax // 2, (N, G), dtype=torch.int8)
    comp = PQ.compress(sd, _scheme(args))
    assert torch.equal(ct.dequantize_pack_quantized(comp, args), _ct_decompress(comp, args))
    with pytest.raises(CheckpointError):
        if bits == 8:
            ct.pack_quantized_to_int8(comp, args)
        else:
            ct.pack_quantized_to_int4(comp, args)


def test_int4_group_size_error_states_the_rule():
    # the message is slmkern.formats.common's rule (any even g dividing K), not a list of the configs' sizes
    from slmkern.formats.common import INT4_GROUP_MULTIPLE, group_size_rule
    N, K, g = 8, 96, 3
    w = torch.randn(N, K)
    args = ct.weight_args(4, True, g)
    comp = PQ.compress({"weight": w, "weight_scale": w.reshape(N, K // g, g).abs().amax(-1) / 8}, _scheme(args))
    with pytest.raises(CheckpointError) as err:
        ct.pack_quantized_to_int4(comp, args, where="layers.0.q_proj")
    assert str(err.value) == (f"layers.0.q_proj: slmkern int4 needs group_size {group_size_rule(INT4_GROUP_MULTIPLE)}, "
                              f"got K={K} group_size={g}")
    assert "an even number dividing K" in str(err.value)


def test_int4_offset_form_export_is_refused_naming_the_layer(tmp_path):
    # GGUF Q4_1 imports hold W = code * scale + offset (a float offset); pack-quantized zero points are integers
    torch.manual_seed(0)
    off = Int4Linear(64, 8, group_size=32, offsets=True)
    off.unpack_()
    off.weight.copy_(torch.randint(0, 256, (8, 32), dtype=torch.uint8))
    off.weight_scale.copy_(torch.rand(8, 2) * 0.1)
    off.weight_offset.copy_(torch.randn(8, 2) * 0.1)
    off.prepack()
    model = nn.Sequential(Int8Linear.from_linear(nn.Linear(64, 64)), nn.Sequential(off))
    for export in (ct.quantization_config, lambda m: ct.save_compressed(m, tmp_path / "ct")):
        with pytest.raises(ValueError, match=r"module '1\.0': an Int4Linear in the offset form .* integer zero points"):
            export(model)
    assert not (tmp_path / "ct" / "model.safetensors").exists()


def test_unpack_matches_compressed_tensors_helper():
    torch.manual_seed(0)
    for bits, K in ((4, 40), (8, 21)):
        packed = torch.randint(-2 ** 31, 2 ** 31 - 1, (5, (K * bits + 31) // 32), dtype=torch.int32)
        ours = ct.unpack_pack_quantized(packed, 5, K, bits)
        assert torch.equal(ours, unpack_from_int32(packed, bits, torch.Size([5, K])))


def test_int8_minus_128_refused():
    args = ct.weight_args(8, True, None)
    comp = PQ.compress({"weight": torch.full((2, 8), -1.0), "weight_scale": torch.full((2, 1), 1 / 128)},
                       _scheme(args))
    with pytest.raises(CheckpointError, match="-128"):
        ct.pack_quantized_to_int8(comp, args)


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.pop("weight_scale"), "missing tensor 'weight_scale'"),
    (lambda t: t.__setitem__("weight_shape", torch.tensor([24, 512])), "weight_packed: expected int32"),
    (lambda t: t.__setitem__("weight_packed", t["weight_packed"].view(torch.float32)), "weight_packed"),
    (lambda t: t.__setitem__("weight_scale", t["weight_scale"][:, :1]), "weight_scale: expected"),
    (lambda t: t.__setitem__("weight_scale", t["weight_scale"] * float("inf")), "NaN or inf"),
    (lambda t: t.__setitem__("weight_zero_point", t["weight_zero_point"][:1]), "weight_zero_point"),
    (lambda t: t.__setitem__("weight_shape", torch.tensor([24.0, 256.0])), "weight_shape"),
])
def test_bad_pack_quantized_layers_raise_clearly(mutate, match):
    q = int4.quantize(torch.randn(24, 256), 64, False)
    tensors, args = ct.int4_to_pack_quantized(q)
    tensors = dict(tensors)
    mutate(tensors)
    with pytest.raises(CheckpointError, match=match):
        ct.pack_quantized_to_int4(tensors, args, where="model.layers.0.mlp")


def test_shape_mismatch_with_model_raises():
    tensors, args = ct.int4_to_pack_quantized(int4.quantize(torch.randn(24, 256), 64, False))
    with pytest.raises(CheckpointError, match="does not match the model's Linear"):
        ct.pack_quantized_to_int4(tensors, args, shape=(24, 128))
    with pytest.raises(CheckpointError, match="num_bits"):
        ct.pack_quantized_to_int4(tensors, {**args, "num_bits": 3})


# ----------------------------------------------------------------------------- sparse-24-bitmask
def _pruned_24(N, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g).to(dtype)
    keep = torch.rand(N, K // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(N, K)
    w = w * mask
    w[0, :4] = 0                                                   # a group with no nonzero
    w[1, 4:8] = torch.tensor([0, 0, 3, 0], dtype=dtype)            # a group with one nonzero
    return w


def _ct_sparse24_decompress(t):
    """The legacy compressed-tensors decompressor when installed (<= 0.14), else its unpack_bitmasks +
    the documented scatter (the Sparse24 compressor left compressed-tensors after 0.14)."""
    try:
        from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import (
            sparse24_bitmask_decompress)
        return sparse24_bitmask_decompress(t["compressed"], t["bitmask"], t["shape"].flatten().tolist())
    except ImportError:
        shape = t["shape"].flatten().tolist()
        mask = unpack_bitmasks(t["bitmask"], shape)
        dense = torch.zeros(shape, dtype=t["compressed"].dtype)
        dense[mask] = t["compressed"].flatten()
        return dense


@pytest.mark.parametrize("N,K", [(6, 16), (5, 12), (3, 132)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse24_export_import(N, K, dtype):
    w = _pruned_24(N, K, dtype, seed=N + K)
    t = ct.sparse24_from_dense(w)
    assert tuple(t["compressed"].shape) == (N, K // 2) and t["compressed"].dtype == dtype
    assert t["bitmask"].dtype == torch.uint8 and tuple(t["bitmask"].shape) == (N, (K + 7) // 8)
    kept = unpack_bitmasks(t["bitmask"], [N, K])
    assert torch.equal(t["bitmask"], pack_bitmasks(kept))                 # same bit order as compressed-tensors
    assert torch.equal(kept.reshape(N, K // 4, 4).sum(-1), torch.full((N, K // 4), 2))
    assert torch.equal(_ct_sparse24_decompress(t), w)
    assert torch.equal(ct.sparse24_to_dense(t), w)
    # the slmkern (values, meta) adapter: same values, meta <-> bitmask, exact both ways
    values, meta = ct.sparse24_to_values_meta(t)
    assert torch.equal(values, t["compressed"])
    t2 = ct.sparse24_from_values_meta(values, meta)
    assert torch.equal(t2["bitmask"], t["bitmask"]) and torch.equal(_ct_sparse24_decompress(t2), w)


def test_sparse24_meta_layout():
    """One row, K=8: group 0 keeps columns 1,3 and group 1 keeps 0,2 -> meta byte 0b1000_1101."""
    w = torch.tensor([[0, 1.0, 0, 2.0, 3.0, 0, 4.0, 0]])
    values, meta = ct.sparse24_to_values_meta(ct.sparse24_from_dense(w))
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert meta.tolist() == [[(1 | 3 << 2) | ((0 | 2 << 2) << 4)]]


def test_sparse24_bad_input():
    with pytest.raises(ValueError, match="not 2:4"):
        ct.sparse24_from_dense(torch.ones(2, 8))
    with pytest.raises(ValueError, match="K % 4"):
        ct.sparse24_from_dense(torch.zeros(2, 6))
    t = ct.sparse24_from_dense(_pruned_24(4, 16))
    bad = dict(t, bitmask=t["bitmask"] | 0x01)                      # a group with 3 kept columns
    bad["bitmask"][1, 0] = 0xFF
    with pytest.raises(CheckpointError, match="exactly 2"):
        ct.sparse24_to_dense(bad)
    with pytest.raises(CheckpointError, match="compressed"):
        ct.sparse24_to_dense(dict(t, compressed=t["compressed"][:, :3]))
    with pytest.raises(CheckpointError, match="shape"):
        ct.sparse24_to_dense(dict(t, shape=torch.tensor([4, 18])))
    with pytest.raises(ValueError, match="c0 < c1"):
        ct.sparse24_from_values_meta(torch.zeros(1, 4), torch.tensor([[0x00]], dtype=torch.uint8))


# ----------------------------------------------------------------------------- a Hugging Face model
transformers = pytest.importorskip("transformers", reason="transformers is needed for the model-level tests")


def _tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval(), cfg


def _quantized_bert(symmetric: bool, w8_activations: str = "float"):
    model, cfg = _tiny_bert()
    slmkern.quantize_(model, Int4Config(group_size=32, symmetric=symmetric),
                      overrides={"*.output.dense": Int8Config(activations=w8_activations), "pooler.dense": None},
                      progress=False)
    return model, cfg


@pytest.mark.parametrize("symmetric", [True, False])
def test_model_saved_by_slmkern_decompresses_in_compressed_tensors(tmp_path, symmetric):
    """ModelCompressor (the decompressor transformers drives) reproduces every slmkern weight exactly."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model, cfg = _quantized_bert(symmetric, w8_activations="int8")
    ct.save_compressed(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["pooler.dense"]
    comp = ModelCompressor.from_compression_config(CompressedTensorsConfig(**qc))
    fresh = transformers.BertModel(cfg).eval()
    apply_quantization_config(fresh, comp.quantization_config)
    comp.compress_model(fresh)
    fresh.load_state_dict(read_safetensors(tmp_path / "model.safetensors")[0], strict=True)
    comp.decompress_model(fresh)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert len(quantized) == 12
    for fqn, mod in quantized.items():
        assert torch.equal(fresh.get_submodule(fqn).weight.float(), mod.dequantized_weight()), fqn
    assert torch.equal(fresh.pooler.dense.weight, model.pooler.dense.weight)


def test_model_saved_by_slmkern_loads_in_transformers(tmp_path):
    """transformers' own from_pretrained (compressed-tensors quantizer, CPU, offline) loads the directory;
    after its decompression every weight equals slmkern's and the outputs agree.
    (Symmetric only: compressed-tensors 0.20.1 + transformers 5 build asymmetric zero-point placeholders
    with the unpacked shape and refuse their own packed checkpoints; the asymmetric case is checked
    through ModelCompressor above.)"""
    model, _ = _quantized_bert(True)
    ct.save_compressed(model, tmp_path)
    # fp32 said explicitly: transformers 4.x's compressed-tensors quantizer decompresses into fp16 by default
    fp32 = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    loaded = transformers.AutoModel.from_pretrained(str(tmp_path), **fp32).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_hf = loaded(input_ids=ids).last_hidden_state                  # first forward decompresses
        y = model(input_ids=ids).last_hidden_state
    for fqn, mod in model.named_modules():
        if isinstance(mod, (Int4Linear, Int8Linear)):
            assert torch.equal(loaded.get_submodule(fqn).weight.float(), mod.dequantized_weight()), fqn
    torch.testing.assert_close(y_hf, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric,w8_act", [(True, "int8"), (False, "int8"), (True, "int7")])
def test_slmkern_round_trip_through_directory(tmp_path, symmetric, w8_act):
    model, _ = _quantized_bert(symmetric, w8_activations=w8_act)
    ct.save_compressed(model, tmp_path)
    if w8_act == "int7":
        qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
        acts = [g["input_activations"] for g in qc["config_groups"].values() if g["input_activations"]]
        assert acts and all(a["num_bits"] == 7 and a["symmetric"] is False and a["dynamic"] for a in acts)
    fresh, _ = _tiny_bert()
    fresh.embeddings.word_embeddings.weight.data.normal_()               # make sure it really is overwritten
    swapped = ct.load_compressed(fresh, tmp_path)
    assert len(swapped) == 12
    assert isinstance(fresh.encoder.layer[0].output.dense, Int8Linear)
    assert fresh.encoder.layer[0].output.dense.activations == w8_act
    assert isinstance(fresh.encoder.layer[0].attention.self.query, Int4Linear)
    sd, sd2 = model.state_dict(), fresh.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, fresh(input_ids=ids).last_hidden_state)


def test_load_checkpoint_written_by_compressed_tensors(tmp_path):
    """An llm-compressor-style checkpoint (targets ["Linear"], ignore [...]) compressed by compressed-tensors
    itself imports into slmkern modules whose weights equal compressed-tensors' decompression."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    model, cfg = _tiny_bert()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    qconf = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**ct.weight_args(4, False, 32)))},
        ignore=["pooler.dense"], format="pack-quantized")
    apply_quantization_config(model, qconf)
    for name, mod in model.named_modules():
        if hasattr(mod, "quantization_scheme") and isinstance(mod, nn.Linear):
            q = int4.quantize(mod.weight.detach(), 32, False)
            mod.weight_scale.data = q.scales.clone()
            mod.weight_zero_point.data = (q.zeros.to(torch.int16) - 8).to(mod.weight_zero_point.dtype)
    comp = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    comp.compress_model(model)
    model.config.save_pretrained(tmp_path)
    from slmkern.interop._safetensors_io import write_safetensors
    write_safetensors(tmp_path / "model.safetensors", model.state_dict(), {"format": "pt"})
    comp.update_config(str(tmp_path))
    comp.decompress_model(model)

    target = transformers.BertModel(cfg).eval()
    swapped = ct.load_compressed(target, tmp_path)
    assert len(swapped) == 12 and "pooler.dense" not in swapped
    for fqn in swapped:
        assert torch.equal(target.get_submodule(fqn).dequantized_weight(), model.get_submodule(fqn).weight.float())
    assert torch.equal(target.pooler.dense.weight, dense["pooler.dense.weight"])


def test_load_compressed_errors(tmp_path):
    model, _ = _quantized_bert(False)
    ct.save_compressed(model, tmp_path)
    wide = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        max_position_embeddings=32))
    with pytest.raises(CheckpointError, match="does not match the model's Linear"):
        ct.load_compressed(wide, tmp_path)
    with pytest.raises(ValueError, match="no Int4Linear"):
        ct.save_compressed(nn.Sequential(nn.Linear(4, 4)), tmp_path / "x")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method"):
        ct.load_compressed(_tiny_bert()[0], tmp_path)
