"""Shared harness: same eval protocol for every row (16 x 512-token windows, first half of the
gensim Wikipedia text, tokenizer(text) without per-window BOS, as `slmkern eval` did for the
28.54 baseline); calibration 16 x 256 tokens from the second half, batches of 4 (cli._calibration)."""
import math, os, sys, time, json
import torch
torch.set_num_threads(1)
from transformers import AutoConfig, LlamaForCausalLM

_ids = torch.load("/tmp/s7/ids.pt")
EVAL = _ids["eval"]
CAL = _ids["calib"]


def model():
    from slmkern.models import model_path
    path, gguf = model_path("smollm2")
    cfg = _cfg()
    m = LlamaForCausalLM(cfg)
    sd = torch.load("/tmp/s7/fp32_sd.pt")
    m.load_state_dict(sd, strict=False)
    m.tie_weights()
    return m.eval()


def _cfg():
    import pickle
    p = "/tmp/s7/cfg.pkl"
    if os.path.exists(p):
        return pickle.load(open(p, "rb"))
    from slmkern.models import load_model
    m, _ = load_model("smollm2")
    pickle.dump(m.config, open(p, "wb"))
    return m.config


def calib(n=16, seq=256, batch=4, offset=0):
    rows = CAL[offset:offset + n * seq].reshape(n, seq)
    return [{"input_ids": rows[i:i + batch], "attention_mask": torch.ones_like(rows[i:i + batch])}
            for i in range(0, n, batch)]


@torch.inference_mode()
def ppl(m, ids=None, window=512):
    ids = EVAL if ids is None else ids
    n_win = ids.numel() // window
    nll, count = 0.0, 0
    for i in range(n_win):
        chunk = ids[i * window:(i + 1) * window].unsqueeze(0)
        logits = m(input_ids=chunk).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        tgt = chunk[0, 1:]
        nll -= logp.gather(1, tgt.unsqueeze(1)).sum().item()
        count += tgt.numel()
    return math.exp(nll / count)


def log(row):
    row["time"] = time.strftime("%H:%M:%S")
    with open("/tmp/s7/results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT", json.dumps(row), flush=True)
