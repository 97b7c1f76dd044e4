"""Mixed precision: measure per-unit int8 gain on held-out calibration-half windows, choose within budget."""
import sys, time, json; sys.path.insert(0, "/tmp/s7")
import h, torch
from slmkern.algorithms import mixed
name, floatname, bpw_target = sys.argv[1], sys.argv[2], float(sys.argv[3])
m = h.model()
fl = torch.load(f"/tmp/s7/sd_{floatname}.pt") if floatname != "fp32" else torch.load("/tmp/s7/fp32_sd.pt")
m.load_state_dict(torch.load(f"/tmp/s7/sd_{name}.pt"))
L = m.config.num_hidden_layers
units = {}
for b in range(L):
    p = f"model.layers.{b}."
    units[f"L{b}.attn"] = [p + f"self_attn.{x}_proj" for x in "qkvo"]
    units[f"L{b}.mlp"] = [p + f"mlp.{x}_proj" for x in ("gate", "up", "down")]
fw = {f: fl[f + ".weight"] for fs in units.values() for f in fs}
wins = [h.CAL[8192 + i * 512: 8192 + (i + 1) * 512] for i in range(1)]   # not the eval text, not the calib rows
t0 = time.time()
gains, base = mixed.int8_sensitivity(m, fw, units, wins)
mods = dict(m.named_modules())
shapes = {f: tuple(mods[f].weight.shape) for f in fw}
res = {"name": name, "base_nll": base, "gains": gains, "seconds": time.time() - t0}
for count, kw in (("stored", {}), ("packed", {"scale_bytes": 2, "zero_bits": 4})):
    extra = {u: sum(mixed.int8_bytes(*shapes[f], scale_bytes=kw.get("scale_bytes", 4))
                    - mixed.int4_bytes(*shapes[f], 64, **kw) for f in fs) for u, fs in units.items()}
    nW = sum(a * b for a, b in shapes.values())
    base_bpw = mixed.bits_per_weight(shapes, [], 64, **kw)
    budget = max(0.0, (bpw_target - base_bpw) * nW / 8)
    chosen = mixed.choose_int8_units(gains, extra, budget)
    layers = [f for u in chosen for f in units[u]]
    res[count] = {"base_bpw": base_bpw, "budget_bytes": budget, "chosen": chosen, "layers": layers,
                  "bpw": mixed.bits_per_weight(shapes, layers, 64, **kw)}
json.dump(res, open(f"/tmp/s7/sens_{name}.json", "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "gains"}, indent=1))
print(sorted(gains.items(), key=lambda kv: -kv[1])[:12])
