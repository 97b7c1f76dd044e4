"""Tiny models built in code for the recipe / checkpoint / CLI tests (no downloads, ~100k params)."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """x (B, 64) -> (B, 10); in_features 64/128/96 so int4 g64 takes fc1, fc2 but not fc3."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 96)
        self.fc3 = nn.Linear(96, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TiedLM(nn.Module):
    """Embedding tied to the output Linear (like SmolLM2's lm_head)."""

    def __init__(self, vocab: int = 50, dim: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.emb(ids))))


def tiny_bert(num_labels: int = 2, vocab: int = 120, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).eval()


def bert_batches(n: int = 3, vocab: int = 120, seed: int = 1, labels: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {"input_ids": torch.randint(0, vocab, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)}
        if labels:
            b["labels"] = torch.randint(0, 2, (4,), generator=g)
        out.append(b)
    return out
