"""Sequential mode's scratch files: the base's side of every batch, written during the
base's sweep and read back while each finetune runs alone."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch



@dataclasses.dataclass
class BaseView:
    """The base model's side of one batch, as the paired metrics need it."""

    x: torch.Tensor  # float32 [B, T, d_in]
    feats: torch.Tensor  # float32 [B, T, d_sae]
    included: torch.Tensor  # bool [B, T]
    finite: torch.Tensor  # bool [B, T]


class BaseSpill:
    """The base's activations and (sparse) features, written per batch to a scratch directory.

    Size on disk: about tokens x (4 d_in + 12 L0) bytes (row, column and value per firing); memory stays one batch.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.chunks: list[tuple[int, int, str]] = []
        self._cached: tuple[int, int, dict[str, torch.Tensor]] | None = None

    @staticmethod
    def pack(view: BaseView) -> dict[str, torch.Tensor]:
        """The view as CPU tensors, features sparse; computed before anything of the batch is kept."""
        B, T, d_sae = view.feats.shape
        flat = view.feats.reshape(B * T, d_sae)
        rows, cols = flat.nonzero(as_tuple=True)
        return {
            "x": view.x.contiguous().cpu(),
            "rows": rows.to(torch.int32).cpu(),
            "cols": cols.to(torch.int32).cpu(),
            "vals": flat[rows, cols].float().cpu(),
            "included": view.included.cpu().to(torch.uint8),
            "finite": view.finite.cpu().to(torch.uint8),
            "shape": torch.tensor([B, T, d_sae]),
        }

    def write(self, start: int, packed: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        os.makedirs(self.directory, exist_ok=True)
        path = f"{self.directory}/base-{start:09d}.safetensors"
        save_file(packed, path)
        self.chunks.append((start, int(packed["shape"][0]), path))

    def _load(self, start: int, n: int, path: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if self._cached is None or self._cached[0] != start:
            self._cached = (start, n, load_file(path))
        return self._cached[2]

    def read(self, start: int, n: int, device: Any) -> BaseView:
        parts = []
        for c_start, c_n, path in self.chunks:
            lo, hi = max(start, c_start), min(start + n, c_start + c_n)
            if lo >= hi:
                continue
            data = self._load(c_start, c_n, path)
            B, T, d_sae = data["shape"].tolist()
            feats = torch.zeros(B * T, d_sae, dtype=torch.float32)
            feats[data["rows"].long(), data["cols"].long()] = data["vals"]
            sl = slice(lo - c_start, hi - c_start)
            parts.append((data["x"][sl], feats.reshape(B, T, d_sae)[sl], data["included"][sl].bool(), data["finite"][sl].bool()))
        x, feats, included, finite = (torch.cat([p[i] for p in parts]).to(device) for i in range(4))
        return BaseView(x, feats, included, finite)


def blocks_to_cpu(model: Any) -> list[dict[str, torch.Tensor]]:
    """The base's block parameters on the CPU, for weight deviation in sequential mode."""
    return [{n: p.detach().to("cpu", copy=True) for n, p in block.named_parameters()} for block in model.blocks]

