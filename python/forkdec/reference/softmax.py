"""Reference softmax: torch.softmax(x.float() / temperature, dim)."""
from __future__ import annotations

import torch
from torch import Tensor


def softmax(x: Tensor, dim: int = -1, temperature: float | Tensor | None = None) -> Tensor:
    """fp32 softmax of `x / temperature` along `dim`.

    `temperature`: None (1), a float, or a tensor with one value per row, shaped
    like `x` without `dim` (or flat, in the row order of `x.movedim(dim, -1)`).
    """
    x = x.float()
    if isinstance(temperature, Tensor):
        rows_shape = x.movedim(dim, -1).shape[:-1]
        x = x / temperature.float().reshape(rows_shape).unsqueeze(-1).movedim(-1, dim)
    elif temperature is not None:
        x = x / temperature
    return torch.softmax(x, dim)
