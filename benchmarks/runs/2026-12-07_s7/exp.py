import sys, time, json; sys.path.insert(0, "/tmp/s7")
import h, torch
spec = json.loads(sys.argv[1])
name = spec.pop("name")
m = h.model()
cal = h.calib(n=spec.pop("ncal", 16), seq=spec.pop("calseq", 256))
int8_layers = set(spec.pop("int8_layers", []))
flt = lambda mod, fqn: not fqn.endswith("lm_head") and fqn not in int8_layers
t0 = time.time()
if int8_layers:
    from slmkern.algorithms.mixed import fake_int8
    mods = dict(m.named_modules())
    with torch.no_grad():
        for f in int8_layers:
            mods[f].weight.copy_(fake_int8(mods[f].weight))
extra = {}
if spec.pop("awq", False):
    from slmkern.algorithms.awq import awq_scale_model
    rep = awq_scale_model(m, cal, group_size=spec["group_size"], symmetric=spec.get("symmetric", False),
                          filter_fn=flt, **spec.pop("awq_opts", {}))
    extra["awq_s"] = time.time() - t0
    print(rep)
    torch.save(m.state_dict(), f"/tmp/s7/sd_{name}_awqfloat.pt")
act8 = spec.pop("act8", False)
load = spec.pop("load", None)
sm = spec.pop("smooth", None)
if sm is not None:
    from slmkern.algorithms.awq import smooth_scale_model
    print(smooth_scale_model(m, cal, alpha=sm, filter_fn=flt))
method = spec.pop("method")
mixed = spec.pop("mixed", None)
if method == "gptq":
    from slmkern.algorithms.gptq import gptq_quantize_model
    out, rep = gptq_quantize_model(m, cal, filter_fn=flt, progress=False, **spec)
elif method == "rtn":
    from slmkern.algorithms.rtn import rtn_quantize
    for fqn, mod in m.named_modules():
        if type(mod) is torch.nn.Linear and flt(mod, fqn):
            q = rtn_quantize(mod.weight.detach(), spec["group_size"], spec.get("symmetric", False), clip=spec.get("clip", "mse"))
            with torch.no_grad():
                mod.weight.copy_(q.dequantize())
elif method == "int8":
    from slmkern.formats import int8 as f8
    for fqn, mod in m.named_modules():
        if type(mod) is torch.nn.Linear and flt(mod, fqn):
            w = mod.weight.detach()
            s = w.abs().amax(1, keepdim=True) / 127
            with torch.no_grad():
                mod.weight.copy_(torch.round(w / s).clamp(-127, 127) * s)
if load:
    m.load_state_dict(torch.load(f"/tmp/s7/sd_{load}.pt"))
calt = time.time() - t0
if act8:
    from slmkern.reference import quantize_rows_s8
    def hook(mod, args):
        x = args[0]
        q, sc = quantize_rows_s8(x.reshape(-1, x.shape[-1]))
        return ((q.float() * sc.unsqueeze(-1)).reshape(x.shape).to(x.dtype),)
    for fqn, mod in m.named_modules():
        if type(mod) is torch.nn.Linear and not fqn.endswith("lm_head"):
            mod.register_forward_pre_hook(hook)
if not load:
  torch.save({k: v for k, v in m.state_dict().items()}, f"/tmp/s7/sd_{name}.pt")
p = h.ppl(m)
h.log({"name": name, "ppl": p, "delta": p / 23.44314685185836 - 1, "calib_s": calt, **extra, "spec": sys.argv[1]})
