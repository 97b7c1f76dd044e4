"""What every slmkern linear module shares: fp32 scale buffers that survive
``model.half()``, and a CPU-only packed layout rebuilt after loads and device moves."""
from __future__ import annotations

import torch
from torch import nn


class PackedLinearBase(nn.Module):
    """Subclasses set FP32_BUFFERS and implement ``_pack_cpu() -> Tensor | None``."""

    FP32_BUFFERS: tuple[str, ...] = ()

    def _init_packing(self) -> None:
        self.register_buffer("w_packed", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, keys: module.prepack())

    def _pack_cpu(self) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _ref_tensor(self) -> torch.Tensor:
        """A canonical buffer that tells which device the module lives on."""
        return self.weight

    @torch.no_grad()
    def prepack(self) -> None:
        """(Re)build the CPU kernels' layout from the canonical buffers; a no-op off the CPU."""
        self.w_packed = self._pack_cpu() if self._ref_tensor().device.type == "cpu" else None

    def _apply(self, fn, recurse=True):
        keep = {name: getattr(self, name) for name in self.FP32_BUFFERS if getattr(self, name) is not None}
        out = super()._apply(fn, recurse)
        # model.half()/.to(bf16) must not round the scales: restore them in fp32 from the originals.
        for name, orig in keep.items():
            now = getattr(self, name)
            if now.dtype != orig.dtype:
                setattr(self, name, orig.to(device=now.device))
        # The packed layout belongs to the CPU kernels only.
        if self._ref_tensor().device.type != "cpu":
            self.w_packed = None
        elif self.w_packed is None or self.w_packed.device.type != "cpu":
            self.prepack()
        return out
