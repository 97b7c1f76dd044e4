"""Frozen, JSON-serialisable configs for the model-level API."""
from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class Int8Config:
    """Per-channel symmetric int8 weights.

    activations: "int8" (W8A8, dynamic per-token activations) or "float" (W8A16, weight-only).
    skip_names: module-name suffixes never converted (e.g. an output head).
    """

    activations: str = "int8"
    skip_names: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        if self.activations not in ("int8", "float"):
            raise ValueError(f"activations: expected 'int8' or 'float', got {self.activations!r}")
        object.__setattr__(self, "skip_names", tuple(self.skip_names))

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Int8Config":
        d = dict(d)
        kind = d.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"config type: expected {cls.__name__}, got {kind!r}")
        return cls(**d)
