import os, time, torch
torch.set_num_threads(1)
from slmkern.models import load_model
from slmkern.data import wikipedia_text
t=time.time()
model, tok = load_model("smollm2")
print("load", time.time()-t)
torch.save(model.state_dict(), "/tmp/s7/fp32_sd.pt")
text = wikipedia_text()
ev = tok(text[:len(text)//2], return_tensors="pt").input_ids[0][:8192]
cal = tok(text[len(text)//2:], return_tensors="pt").input_ids[0]
torch.save({"eval": ev, "calib": cal}, "/tmp/s7/ids.pt")
print(ev.shape, cal.shape, model.config)
