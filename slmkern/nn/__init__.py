"""Drop-in replacements for nn.Linear backed by slmkern ops (and the tied int8 embedding)."""
from slmkern.nn.int4_linear import Int4Linear
from slmkern.nn.int8_embedding import Int8Embedding
from slmkern.nn.int8_linear import Int8Linear
from slmkern.nn.fuse import fuse_, fuse_gelu_, fuse_siblings_
from slmkern.nn.sparse_linear import SparseLinear

__all__ = ["Int4Linear", "Int8Embedding", "Int8Linear", "SparseLinear", "fuse_", "fuse_gelu_", "fuse_siblings_"]
