"""AWQ scaling (slmkern.algorithms.awq) on tiny random models built from configs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slmkern.algorithms import awq, rtn

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so folding into them is exercised
        for mod in m.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.uniform_(0.5, 1.5)
    return m


def _calib(seed: int = 1, n: int = 4, seq: int = 16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (n, seq), generator=g)
    return [{"input_ids": ids[i:i + 2]} for i in range(0, n, 2)]


def test_awq_keeps_the_float_function():
    m = _tiny_llama()
    batch = _calib(seed=5)[0]
    with torch.no_grad():
        ref = m(**batch).logits
    rep = awq.awq_scale_model(m, _calib(), group_size=32)
    scaled = [s for s in rep.stages if s.producer]
    assert scaled, str(rep)
    # q/k/v fold into input_layernorm, gate/up into post_attention_layernorm, down into up_proj
    producers = {s.producer.rsplit(".", 1)[-1] for s in scaled}
    assert producers <= {"input_layernorm", "post_attention_layernorm", "up_proj"}
    assert any(s.alpha > 0 for s in scaled)
    with torch.no_grad():
        out = m(**batch).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # o_proj's input comes out of attention: never scaled
    assert all(not s.producer for s in rep.stages if s.layers[0].endswith("o_proj"))


def test_awq_does_not_fold_into_a_one_plus_weight_norm():
    class OnePlusNorm(nn.Module):  # Gemma-style: x_normed * (1 + w); dividing w by s is wrong
        def __init__(self, k):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(k))

        def forward(self, x):
            return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + self.weight)

    norm = OnePlusNorm(16)
    w0 = norm.weight.detach().clone()
    s = torch.linspace(0.5, 2.0, 16)
    assert not awq._fold_into_norm(norm, s)
    torch.testing.assert_close(norm.weight.detach(), w0, rtol=0, atol=0)
    plain = nn.LayerNorm(16)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    assert awq._fold_into_norm(plain, s)


def _outlier_data(K=128, N=96, rows=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g)
    hot = torch.randperm(K, generator=g)[:6]
    x[:, hot] *= 30.0  # a few outlier input channels, as in LLM activations
    w = torch.randn(N, K, generator=g) * 0.05
    return x, w


@pytest.mark.parametrize("symmetric", [False, True])
def test_awq_scales_reduce_output_error_vs_rtn_on_outlier_channels(symmetric):
    x, w = _outlier_data()
    H = x.T @ x
    s, alpha, err, base = awq.search_scales([w], H, group_size=32, symmetric=symmetric, clip="minmax")
    assert alpha > 0
    q_plain = rtn.rtn_quantize(w, 32, symmetric, clip="minmax").dequantize()
    q_awq = rtn.rtn_quantize(w * s, 32, symmetric, clip="minmax").dequantize() / s
    e_plain = (x @ (w - q_plain).T).square().sum()
    e_awq = (x @ (w - q_awq).T).square().sum()
    assert e_awq < 0.8 * e_plain
    torch.testing.assert_close(torch.tensor(base), e_plain, rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.tensor(err), e_awq, rtol=1e-3, atol=0)


def test_awq_search_never_worse_than_unscaled():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g)  # no outliers: scaling may not help, must not hurt
    w = torch.randn(32, 64, generator=g)
    s, alpha, err, base = awq.search_scales([w], x.T @ x, group_size=32)
    assert err <= base
    if alpha == 0.0:
        torch.testing.assert_close(s, torch.ones(64))


def test_awq_recipe_key_runs_before_the_quantizer_and_needs_calibration():
    from slmkern.config import Int4Config
    from slmkern.recipes import compress, needs_calibration, parse_recipe

    recipe = {"steps": [{"quantize": {"algorithm": "rtn", "group_size": 32, "awq": True}}]}
    assert needs_calibration(parse_recipe(recipe))
    assert not needs_calibration(parse_recipe({"steps": [{"quantize": {"algorithm": "rtn", "group_size": 32}}]}))
    with pytest.raises(ValueError, match="calibration"):
        compress(_tiny_llama(), recipe)
    m = _tiny_llama()
    before = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if n.endswith("layernorm")}
    rep = compress(m, recipe, calibration=_calib(), progress=False)
    assert any(n.startswith("awq: scaled") for n in rep.notes), rep.notes
    after = {n: mod.weight.detach() for n, mod in m.named_modules() if n.endswith("layernorm")}
    assert any(not torch.equal(before[n], after[n]) for n in before)   # scales were folded into norms
    with pytest.raises(ValueError, match="hmse"):
        Int4Config(method="rtn", clip="hmse")
    with pytest.raises(ValueError, match="awq_grid"):
        Int4Config(awq=True, awq_grid=0)


def test_smoothing_keeps_the_float_function_and_flattens_activation_outliers():
    m = _tiny_llama()
    with torch.no_grad():   # outlier channels in what the attention norm emits
        m.model.layers[0].input_layernorm.weight[:3] = 40.0
    batch = _calib(seed=5)[0]
    seen = {}
    q = m.model.layers[0].self_attn.q_proj
    h = q.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach().clone()))
    with torch.no_grad():
        ref = m(**batch).logits
    x0 = seen["x"]
    rep = awq.smooth_scale_model(m, _calib(), alpha=0.5)
    assert "model.layers.0.input_layernorm" in rep.scaled
    with torch.no_grad():
        out = m(**batch).logits
    h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    x1 = seen["x"]
    spread = lambda x: float((x.abs().amax(dim=(0, 1)).max() / x.abs().amax(dim=(0, 1)).median()))  # noqa: E731
    assert spread(x1) < 0.5 * spread(x0)
    with pytest.raises(ValueError, match="alpha"):
        awq.smooth_scale_model(m, _calib(), alpha=1.5)


def test_smooth_recipe_key():
    from slmkern.config import Int8Config
    from slmkern.recipes import compress, needs_calibration, parse_recipe

    recipe = {"steps": [{"quantize": {"algorithm": "int8", "activations": "int8", "smooth": 0.5}}]}
    assert needs_calibration(parse_recipe(recipe))
    rep = compress(_tiny_llama(), recipe, calibration=_calib(), progress=False)
    assert any(n.startswith("smooth: scaled") for n in rep.notes), rep.notes
    with pytest.raises(ValueError, match="smooth"):
        Int8Config(smooth=2.0)


@pytest.mark.parametrize("cfg_kind", ["awq", "smooth"])
def test_quantize_applies_awq_and_smooth_before_swapping(cfg_kind):
    import slmkern
    from slmkern.config import Int4Config, Int8Config

    cfg = (Int4Config(method="rtn", group_size=32, awq=True) if cfg_kind == "awq"
           else Int8Config(activations="int8", smooth=0.5))
    with pytest.raises(ValueError, match="calibration"):
        slmkern.quantize_(_tiny_llama(), cfg, progress=False)
    m = _tiny_llama()
    before = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if n.endswith("layernorm")}
    rep = slmkern.quantize_(m, cfg, calibration=_calib(), progress=False)
    assert any(n.startswith(cfg_kind) for n in rep.notes), rep.notes
    after = {n: mod.weight.detach() for n, mod in m.named_modules() if n.endswith("layernorm")}
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert rep.swapped
