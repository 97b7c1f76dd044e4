"""Compression algorithms (quantizers, pruners, distillation)."""
