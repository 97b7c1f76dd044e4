"""Drop-in replacements for nn.Linear backed by slmkern ops."""
from slmkern.nn.int8_linear import Int8Linear

__all__ = ["Int8Linear"]
