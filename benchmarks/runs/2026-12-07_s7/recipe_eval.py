"""Real path: slmkern.compress(recipe) with the real kernels, then the same perplexity protocol."""
import sys, time, json; sys.path.insert(0, "/tmp/s7")
import h, torch
from slmkern.recipes import compress, parse_recipe
import yaml
name, path = sys.argv[1], sys.argv[2]
m = h.model()
recipe = yaml.safe_load(open(path)) if path.endswith(".yaml") else json.loads(path)
t0 = time.time()
rep = compress(m, recipe, calibration=h.calib(), progress=False)
calt = time.time() - t0
print(rep)
p = h.ppl(m)
h.log({"name": name, "ppl": p, "delta": p / 23.44314685185836 - 1, "calib_s": calt, "recipe": path, "real_kernels": True})
