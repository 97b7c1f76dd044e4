"""A lean batch-1 forward for Llama-family Hugging Face decoders: HF's arithmetic without HF's Python.

``LeanDecoder(model, cache_len)`` runs the prompt and then one token at a time through the model's own
weights and modules, in a loop written for batch 1 (``slmkern.generate`` uses it by default):

- the same aten ops on the same values as HF eager (RMSNorm's pow/mean/rsqrt, rotary embedding from the
  model's own ``rotary_emb``, ``scaled_dot_product_attention`` with HF's arguments, SiLU * up, residual adds),
  so the logits are HF's bit for bit (``tests/test_decoder.py`` checks it against HF on every supported
  layout, quantized and not);
- fewer, larger kernel calls: q/k/v and gate/up, when they are slmkern linears of one format sharing their
  input, become one packed weight and one kernel call each (the fused copy lives here, not in the model:
  checkpoints keep per-layer tensors). The kernels compute every output column on its own, so the fused
  call gives the separate calls' bits (tested);
- a KV cache allocated once per cache length; attention reads its filled part, as HF's DynamicCache hands it;
- no module calls, hooks, masks, cache objects or output dataclasses per token. In fp32 a decode step per
  layer is 4 kernel calls, sdpa, SiLU * up and three C++ calls (csrc/decoder.cpp): rotary embedding + KV-cache
  write, and the residual add + RMSNorm twice. The norm replays aten's float summation order; the decoder checks
  it against the aten ops when it is built and keeps the aten ops where they differ (``norm_lanes``);
- torch's aten ops run on the calling thread alone during the decode loop and slmkern's kernels on its own
  pool, whose helpers spin between calls (``decode_many``): one pool per core, no OpenMP wake-ups.

What it covers: ``model_type`` llama / mistral / qwen2 in fp32, bf16 or fp16 on the CPU, every layer full
attention over the cache (a sliding window at least as long as the cache is full attention), SiLU MLP, sdpa
attention. ``unsupported_reason(model, cache_len)`` says why anything else is not covered; the caller then
takes another path. Built on transformers 5's layouts; a model whose modules do not look as expected is
refused, not guessed at.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from slmkern.nn.fuse import stacked_linear as _fused_module   # one packed weight for linears sharing an input

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


# ----------------------------------------------------------------------------- what is covered
def unsupported_reason(model, cache_len: int) -> str | None:
    """Why LeanDecoder cannot run `model` with a cache of `cache_len` exactly as HF does (None: it can)."""
    cfg = model.config.get_text_config(decoder=True)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        return f"model_type {mt!r} is not one the lean decoder covers {SUPPORTED_MODEL_TYPES}"
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {model.config._attn_implementation!r} (the lean decoder runs 'sdpa')"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} (the lean decoder runs 'silu')"
    kinds = set(getattr(cfg, "layer_types", None) or ("full_attention",))
    window = getattr(cfg, "sliding_window", None)
    if kinds != {"full_attention"} and not (window is not None and window >= cache_len):
        return f"layer_types {sorted(kinds)} with sliding_window {window} < cache length {cache_len}"
    if mt == "mistral" and window is not None and window < cache_len:
        return f"sliding_window {window} < cache length {cache_len}"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(model, "lm_head") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} does not have HF's model.layers / lm_head / rotary_emb layout"
    if len(layers) != cfg.num_hidden_layers:
        return f"{len(layers)} layers but num_hidden_layers={cfg.num_hidden_layers}"
    if type(inner.embed_tokens) is not nn.Embedding and type(inner.embed_tokens).__name__ != "Int8Embedding":
        return f"embed_tokens is a {type(inner.embed_tokens).__name__}, not nn.Embedding or slmkern's Int8Embedding"
    norms = [inner.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    for n in norms:
        if not type(n).__name__.endswith("RMSNorm") or not hasattr(n, "variance_epsilon"):
            return f"norm {type(n).__name__} is not HF's RMSNorm"
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attn, name, None), nn.Module):
                return f"self_attn.{name} is missing"
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not isinstance(getattr(mlp, name, None), nn.Module):
                return f"mlp.{name} is missing"
        if getattr(attn, "sliding_window", None) is not None and attn.sliding_window < cache_len:
            return f"a layer's sliding_window {attn.sliding_window} < cache length {cache_len}"
    devices = {t.device.type for t in model.parameters()} | {t.device.type for t in model.buffers()}
    if devices != {"cpu"}:
        return f"model is on {sorted(devices)}; the lean decoder is CPU only"
    dt = _embed_dtype(inner.embed_tokens)
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        return f"embedding dtype {dt}"
    return None


# ----------------------------------------------------------------------------- fused linears
class _Linears:
    """Linears sharing one input, called as one: ``(x, threads) -> tuple of outputs``. One kernel call when they
    are slmkern linears of one format (fused into one packed weight when there are several); otherwise each
    module is called as it is. ``planned``: every output comes from a slmkern kernel call."""

    __slots__ = ("mods", "fused", "plan", "sizes", "single")

    def __init__(self, mods: list[nn.Module], fuse: bool = True) -> None:
        self.mods = mods
        self.sizes = [m.out_features if hasattr(m, "out_features") else m.weight.shape[0] for m in mods]
        self.single = len(mods) == 1
        self.fused = _fused_module(mods) if fuse and not self.single else None
        src = self.fused if self.fused is not None else mods[0] if self.single else None
        plan = src._direct_plan() if src is not None and hasattr(src, "_direct_plan") \
            and src._buffers.get("w_packed") is not None else None
        self.plan = plan if plan is not None and plan.fn is not None else None

    @property
    def planned(self) -> bool:
        return self.plan is not None

    def raw(self, x: torch.Tensor, threads: int = 0) -> torch.Tensor | None:
        """The fused kernel's whole output [..., sum of sizes], or None (not one kernel call, or x not taken)."""
        return self.plan(x, threads) if self.plan is not None else None

    def __call__(self, x: torch.Tensor, threads: int = 0):
        if self.plan is not None:
            y = self.plan(x, threads)
            if y is not None:
                return y if self.single else y.split(self.sizes, -1)
        if self.single:
            return self.mods[0](x)
        return tuple(m(x) for m in self.mods)


def _refs(mods) -> tuple:
    """Identity and version of every tensor the modules hold: a fused copy is valid while these stay."""
    return tuple((id(m), tuple((id(t), t._version) for t in list(m.parameters()) + list(m.buffers())))
                 for m in mods)


def hf_rms_norm(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm (LlamaRMSNorm.forward), op for op: the aten ops the decoder runs and the C++ one must equal."""
    dtype = h.dtype
    h = h.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(dtype)


def _aten_add_rms_norm(a, b, w, eps):
    """HF's residual add + RMSNorm: (h, norm(h))."""
    h = a + b if b is not None else a
    return h, hf_rms_norm(h, w, eps)


def norm_lanes(C, n: int, w: torch.Tensor, eps: float) -> int | None:
    """The vector width (8 or 16 floats) with which csrc/decoder.cpp's add_rms_norm_f32 gives the aten ops'
    bits for rows of n, or None when neither does (this torch sums differently): checked on random rows of
    several magnitudes, with and without the residual add."""
    if C is None or not hasattr(C, "add_rms_norm_f32"):
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    gen = torch.Generator().manual_seed(n)
    rows = [torch.randn(n, generator=gen) * s for s in (1e-3, 0.1, 1.0, 30.0, 1e3) for _ in range(4)]
    w = w.detach().float().contiguous()
    for lanes in ((16, 8) if "512" in cap else (8, 16)):
        ok = True
        for i, a in enumerate(rows):
            b = rows[(i + 7) % len(rows)] if i % 2 else None
            h_ref, x_ref = _aten_add_rms_norm(a.view(1, 1, n), None if b is None else b.view(1, 1, n), w, eps)
            h, x = torch.empty(n), torch.empty(n)
            C.add_rms_norm_f32(a.data_ptr(), 0 if b is None else b.data_ptr(), n, w.data_ptr(), eps, h.data_ptr(),
                               x.data_ptr(), lanes)
            if not (torch.equal(h, h_ref.view(n)) and torch.equal(x, x_ref.view(n))):
                ok = False
                break
        if ok:
            return lanes
    return None


def _embed_dtype(embed: nn.Module) -> torch.dtype:
    """The dtype of the embedding's rows: nn.Embedding's weight, or slmkern.nn.Int8Embedding's output dtype."""
    return embed.weight.dtype if type(embed) is nn.Embedding else embed.dtype


def _model_refs(model) -> tuple:
    inner = model.model
    mods = [inner.embed_tokens, model.lm_head, inner.norm, inner.rotary_emb]
    for layer in inner.layers:
        at, mlp = layer.self_attn, layer.mlp
        mods += [layer.input_layernorm, layer.post_attention_layernorm, at.q_proj, at.k_proj, at.v_proj, at.o_proj,
                 mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return (len(inner.layers), _refs(mods))


# ----------------------------------------------------------------------------- the decoder
def _rms_norm(norm: nn.Module) -> functools.partial:
    """norm(h) as HF computes it; its keywords (w, eps) are what the C++ norm reads on decode steps."""
    return functools.partial(hf_rms_norm, w=norm.weight, eps=float(norm.variance_epsilon))


class LeanDecoder:
    """Batch-1 prompt + decode for one model with a KV cache of ``cache_len`` positions (see module docstring).

    ``prefill(ids [1, T]) -> next token [1, 1]`` starts a sequence; ``decode(token [1, 1]) -> next token``
    appends one. ``logits(ids)`` (prefill's logits of the last position) is there for tests.
    """

    def __init__(self, model: nn.Module, cache_len: int, fuse: bool = True) -> None:
        reason = unsupported_reason(model, cache_len)
        if reason is not None:
            raise ValueError(f"model: {reason}")
        cfg = model.config.get_text_config(decoder=True)
        inner = model.model
        self.embed, self.rotary, self.lm_head = inner.embed_tokens, inner.rotary_emb, model.lm_head
        self.final_norm = _rms_norm(inner.norm)
        a0 = inner.layers[0].self_attn
        self.H, self.Hkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, a0.head_dim
        self.scaling = a0.scaling
        self.gqa = {"enable_gqa": True} if self.H != self.Hkv else {}
        self.layers = []
        for layer in inner.layers:
            at, mlp = layer.self_attn, layer.mlp
            if at.head_dim != self.D or at.scaling != self.scaling:
                raise ValueError("model: layers differ in head_dim or scaling")
            self.layers.append((_rms_norm(layer.input_layernorm), _Linears([at.q_proj, at.k_proj, at.v_proj], fuse),
                                _Linears([at.o_proj]), _rms_norm(layer.post_attention_layernorm),
                                _Linears([mlp.gate_proj, mlp.up_proj], fuse), _Linears([mlp.down_proj])))
        self.head = _Linears([self.lm_head])
        # decode steps in fp32 with one q/k/v kernel call: rope + cache write in one C++ call (csrc/decoder.cpp)
        from slmkern._backends import cpu as cpu_backend
        self._C = cpu_backend._C if cpu_backend.has_cpp() else None
        self.fast_rope = self._C is not None and _embed_dtype(inner.embed_tokens) == torch.float32 \
            and all(L[1].planned for L in self.layers)
        # decode steps in fp32: residual add + RMSNorm in one C++ call, where it gives aten's bits on this torch
        norms = [self.final_norm] + [n for L in self.layers for n in (L[0], L[3])]
        self._next_norms = [L[0].keywords for L in self.layers[1:]] + [self.final_norm.keywords]  # after layer i
        self.lanes = None
        if self.fast_rope and all(n.keywords["w"].dtype == torch.float32 and n.keywords["w"].is_contiguous()
                                  and n.keywords["w"].dim() == 1 for n in norms):
            self.lanes = norm_lanes(self._C, cfg.hidden_size, inner.norm.weight, float(inner.norm.variance_epsilon))
        # Every linear of the layers a slmkern kernel call: the kernels get the threads (their own pool) and aten's
        # small ops run on the caller alone, so two pools never take turns waking each other (decode_many). A
        # float head (nn.Linear) gets torch's threads back for its one call.
        self.body_planned = all(L[i].planned for L in self.layers for i in (1, 2, 4, 5))
        self.all_planned = self.head.planned and self.body_planned
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.cache_len = 0
        self.ensure_cache(cache_len)
        self.n = 0           # tokens in the cache
        self._refs = _model_refs(model)

    def ensure_cache(self, cache_len: int) -> None:
        """A KV cache of at least cache_len positions (reallocated, empty, when it is shorter)."""
        if cache_len <= self.cache_len:
            return
        shape = (1, self.Hkv, cache_len, self.D)
        dt = _embed_dtype(self.embed)
        with torch.inference_mode():
            self.k = [torch.zeros(shape, dtype=dt) for _ in self.layers]
            self.v = [torch.zeros(shape, dtype=dt) for _ in self.layers]
        self.cache_len, self.n = cache_len, 0

    def stale(self, model: nn.Module) -> bool:
        """Has any module or weight of `model` been replaced or edited since this decoder was built from it?"""
        return _model_refs(model) != self._refs

    # one forward over ids [1, M] at positions [n, n + M); returns the last position's logits [1, V]
    def _forward(self, ids: torch.Tensor, threads: int = 0) -> torch.Tensor:
        start, M = self.n, ids.shape[1]
        end = start + M
        if end > self.cache_len:
            raise ValueError(f"ids: {end} tokens do not fit the KV cache of {self.cache_len}")
        H, Hkv, D = self.H, self.Hkv, self.D
        h = F.embedding(ids, self.embed.weight, self.embed.padding_idx) if type(self.embed) is nn.Embedding \
            else self.embed(ids)   # slmkern.nn.Int8Embedding: rows of the tied int8 head's table
        pos = torch.arange(start, end).unsqueeze(0)
        cos, sin = self.rotary(h, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = D // 2
        causal = M > 1
        fast = self.fast_rope and start > 0
        if fast:
            cos, sin = cos.contiguous(), sin.contiguous()
            if M == 1 and self.lanes is not None:
                return self._decode_fused(h, cos, sin, start, threads)
            L = self.cache_len
        for i, (norm1, qkv, o_proj, norm2, gate_up, down) in enumerate(self.layers):
            r = h
            x = norm1(h)
            kc, vc = self.k[i], self.v[i]
            y = qkv.raw(x, threads) if fast else None
            if y is not None:
                q = torch.empty((1, H, M, D))
                self._C.rope_qkv_f32(y.data_ptr(), y.shape[-1], M, H, Hkv, D, cos.data_ptr(), sin.data_ptr(),
                                     q.data_ptr(), kc.data_ptr(), vc.data_ptr(), L * D, start)
                k, v = kc[:, :, :end], vc[:, :, :end]
            else:
                q, k, v = qkv(x, threads)
                q = q.view(1, M, H, D).transpose(1, 2)
                k = k.view(1, M, Hkv, D).transpose(1, 2)
                v = v.view(1, M, Hkv, D).transpose(1, 2)
                q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
                k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
                kc[:, :, start:end].copy_(k)
                vc[:, :, start:end].copy_(v)
                if start:   # HF: the cache's filled part
                    k, v = kc[:, :, :end], vc[:, :, :end]
                # else HF: a prompt from an empty cache attends to its own fresh states
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=self.scaling, is_causal=causal,
                                               **self.gqa)
            a = a.transpose(1, 2).contiguous().reshape(1, M, -1).contiguous()
            h = r + o_proj(a, threads)
            r = h
            g, u = gate_up(norm2(h), threads)
            h = r + down(F.silu(g) * u, threads)
        self.n = end
        h = self.final_norm(h)
        return self._head(h[:, -1:, :], threads)[:, -1]

    def _decode_fused(self, h: torch.Tensor, cos, sin, start: int, threads: int) -> torch.Tensor:
        """One fp32 decode step with the C++ rope/cache write and residual add + RMSNorm (same bits as above)."""
        C, H, Hkv, D, L, lanes = self._C, self.H, self.Hkv, self.D, self.cache_len, self.lanes
        end = start + 1
        n = h.shape[-1]
        x = torch.empty_like(h)
        hp, xp = h.data_ptr(), x.data_ptr()      # h: the residual stream, updated in place
        nxt = self._next_norms
        first = self.layers[0][0].keywords
        C.add_rms_norm_f32(hp, 0, n, first["w"].data_ptr(), first["eps"], hp, xp, lanes)
        for i, (_, qkv, o_proj, norm2, gate_up, down) in enumerate(self.layers):
            kc, vc = self.k[i], self.v[i]
            y = qkv.raw(x, threads)
            q = torch.empty((1, H, 1, D))
            C.rope_qkv_f32(y.data_ptr(), y.shape[-1], 1, H, Hkv, D, cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
                           kc.data_ptr(), vc.data_ptr(), L * D, start)
            a = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], dropout_p=0.0, scale=self.scaling,
                                               **self.gqa)
            o = o_proj(a.view(1, 1, H * D), threads)
            p2 = norm2.keywords
            C.add_rms_norm_f32(hp, o.data_ptr(), n, p2["w"].data_ptr(), p2["eps"], hp, xp, lanes)
            g, u = gate_up(x, threads)
            d = down(F.silu(g) * u, threads)
            pn = nxt[i]
            C.add_rms_norm_f32(hp, d.data_ptr(), n, pn["w"].data_ptr(), pn["eps"], hp, xp, lanes)
        self.n = end
        return self._head(x, threads)[:, -1]

    def _head(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        """The output head. Inside decode_many's one-thread stretch a head that is not a slmkern kernel (a float
        nn.Linear: one large GEMV) runs with torch's threads, slmkern's helpers off the cores meanwhile."""
        if self.head.planned or not threads or torch.get_num_threads() >= threads:
            return self.head(x, threads)
        warm = self._C is not None
        torch.set_num_threads(threads)
        if warm:
            self._C.set_pool_keep_warm(False)
        try:
            return self.head(x, threads)
        finally:
            torch.set_num_threads(1)
            if warm:
                self._C.set_pool_keep_warm(True)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the last prompt position, from an empty cache."""
        with torch.inference_mode():
            self.n = 0
            return self._forward(ids)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a sequence: the prompt [1, T] from an empty cache; returns the greedy next token [1, 1]."""
        with torch.inference_mode():
            self.n = 0
            return self._forward(ids).argmax(-1, keepdim=True)

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Append `token` [1, 1]; returns the greedy next token [1, 1]."""
        with torch.inference_mode():
            return self._forward(token).argmax(-1, keepdim=True)

    def decode_many(self, token: torch.Tensor, steps: int, stop: set[int] = frozenset()) -> list[int]:
        """Greedy tokens after `token` for up to `steps` steps (ending after a token in `stop`).

        With every linear of the layers a slmkern kernel, the kernels run on torch.get_num_threads() threads of
        slmkern's pool and aten's ops (a few us each at batch 1) on this thread alone for the loop's duration: torch's
        OpenMP pool and slmkern's never wake each other up, and OMP_WAIT_POLICY stops mattering. For the loop's
        duration slmkern's helper threads spin between kernel calls instead of sleeping (the cores are this
        loop's), so no call waits for a helper to wake up."""
        threads = torch.get_num_threads()
        out: list[int] = []
        single = self.body_planned and threads > 1
        with torch.inference_mode():
            if single:
                torch.set_num_threads(1)
                if self._C is not None:
                    self._C.set_pool_keep_warm(True)
            try:
                for _ in range(steps):
                    token = self._forward(token, threads).argmax(-1, keepdim=True)
                    out.append(int(token))
                    if out[-1] in stop:
                        break
            finally:
                if single:
                    torch.set_num_threads(threads)
                    if self._C is not None:
                        self._C.set_pool_keep_warm(False)
        return out
