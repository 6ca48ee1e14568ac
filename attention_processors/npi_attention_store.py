"""Cross-attention store, prompt-to-prompt's local blend, and a per-token heat-map grid.

The store sums probabilities over heads, layers and steps at one map size. Every probability row
sums to one over tokens, so dividing by that sum gives the average without Python-side counters, which keeps
``record`` capturable by CUDA graphs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class AttentionStore:
    """Running sum ``(rows, length, tokens)`` of the cross-attention maps whose query length is ``length``.

    The buffer is allocated up front, so every ``record`` is the same in-place add: no first-call branch for
    ``torch.compile`` to specialise on, and nothing allocated inside a captured graph.
    """

    def __init__(self, length: int, size: tuple[int, int], rows: int, tokens: int, device=None):
        self.length, self.size = length, tuple(size)
        self.sums = torch.zeros(rows, length, tokens, device=device)

    def record(self, probs: torch.Tensor) -> None:
        """Add ``(rows, heads, query, tokens)`` probabilities; maps of other sizes are ignored."""
        if probs.shape[2] == self.length:
            self.sums.add_(probs.sum(dim=1, dtype=torch.float32))

    def average(self) -> torch.Tensor:
        """Average maps ``(rows, height, width, tokens)``."""
        return (self.sums / self.sums.sum(dim=-1, keepdim=True)).unflatten(1, self.size)


def local_blend_mask(maps: torch.Tensor, word_weights: torch.Tensor, size: tuple[int, int], threshold: float):
    """Where the blend words attend (P2P §3.2, local editing): boolean ``(rows, 1, *size)``.

    ``maps`` are average maps ``(rows, h, w, tokens)``, ``word_weights`` ``(rows, tokens)`` is 1 on the blend
    words. As the reference: sum over words, 3×3 max-pool, nearest upsampling, divide by the maximum, threshold.
    """
    mask = (maps * word_weights[:, None, None, :]).sum(dim=-1)[:, None]
    mask = F.max_pool2d(mask, kernel_size=3, stride=1, padding=1)
    mask = F.interpolate(mask, size=size)
    mask = mask / mask.amax(dim=(2, 3), keepdim=True)
    return mask > threshold


def heat_map_grid(maps: torch.Tensor, labels: list[str], image=None, cell: int = 96):
    """A PIL grid: one heat map per label (``maps`` ``(h, w, len(labels))``), over ``image`` if given."""
    import numpy as np
    from PIL import Image, ImageDraw

    count = len(labels)
    columns = min(count, 8)
    rows = math.ceil(count / columns)
    label_height = 14
    grid = Image.new("RGB", (columns * cell, rows * (cell + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    maps = maps.float().cpu()
    background = None
    if image is not None:
        background = torch.from_numpy(np.array(image.convert("RGB").resize((cell, cell)))).float()
    for index, label in enumerate(labels):
        heat = maps[..., index]
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
        heat = F.interpolate(heat[None, None], size=(cell, cell), mode="bilinear", align_corners=False)[0, 0]
        colour = torch.stack([heat, 0.2 + 0.0 * heat, 1 - heat], dim=-1) * 255  # blue (low) → red (high)
        if background is not None:
            colour = 0.5 * colour + 0.5 * background
        tile = Image.fromarray(colour.clamp(0, 255).byte().numpy())
        x, y = (index % columns) * cell, (index // columns) * (cell + label_height)
        grid.paste(tile, (x, y))
        draw.text((x + 2, y + cell), label[:14], fill="black")
    return grid
