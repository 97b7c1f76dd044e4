"""Checkpoint formats other stacks read and write (documented bit layouts next to the code).

- ``compressed_tensors``: vLLM / llm-compressor ``pack-quantized`` (int4, int8) and ``sparse-24-bitmask``;
  export and import per layer, and whole Hugging Face checkpoint directories (``save_compressed`` /
  ``load_compressed``).
- ``gptq``: AutoGPTQ / GPTQModel 4-bit checkpoints (v1 "zero minus one" and v2) -> slmkern int4.
- ``awq``: AutoAWQ GEMM 4-bit checkpoints -> slmkern int4.
- ``gguf``: llama.cpp GGUF files -> a transformers model with the file's Q4_0/Q4_1 (and exactly
  representable Q8_0) codes in Int4Linear/Int8Linear, no requantization (``load_gguf``).

Every loader validates before it converts: a bad file, name, shape or index raises
``CheckpointError`` (a ValueError) naming what is wrong.
"""
from slmkern.interop._safetensors_io import CheckpointError, read_safetensors, write_safetensors

__all__ = ["CheckpointError", "read_safetensors", "write_safetensors"]
