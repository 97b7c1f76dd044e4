"""The ``slmkern`` torch.library namespace and the check helpers every op file shares.

``ops/__init__.py`` and each ``ops/<stem>.py`` import these from here (never from each other), so the
op files sit side by side under the package without an import cycle.
"""
from __future__ import annotations

import torch

LIB = torch.library.Library("slmkern", "DEF")  # noqa: TOR901 - the op namespace lives here


def _type(cond: bool, msg: str) -> None:
    torch._check_type(cond, lambda: msg)


def _value(cond, msg: str) -> None:
    torch._check_value(cond, lambda: msg)
