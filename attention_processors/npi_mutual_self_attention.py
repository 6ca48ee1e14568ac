"""Self-attention borrowed from a source branch: MasaCtrl's mutual self-attention and prompt-to-prompt's
self-attention replacement, one rule with a setting.

- MasaCtrl (Cao et al. 2023): a target's queries attend to its source's keys and values,
  ``attention(Q_tgt, K_src, V_src)``: the target keeps the source's appearance while its own queries (its layout or
  pose) follow the target prompt. ``borrow=("key", "value")``.
- Prompt-to-prompt (Hertz et al. 2022): the target's self-attention *map* becomes the source's,
  ``softmax(Q_src K_srcᵀ) V_tgt``: the target keeps the source's layout. ``borrow=("query", "key")``.

Both act only inside a window of steps, read from a device table with the device step index, so the rule stays
capturable by CUDA graphs; the source rows are never changed. Fused kernel only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


PARTS = ("query", "key", "value")


class MutualSelfAttention:
    """Inside ``window[step]`` (bool table, 0-dim ``step``), target rows take ``borrow`` from their source rows."""

    def __init__(self, step, window, source_rows, target_rows, borrow: tuple[str, ...]):
        if not set(borrow) <= set(PARTS):
            raise ValueError(f"borrow must name some of {PARTS}, got {borrow!r}.")
        self.step, self.window = step, window
        self.source_rows, self.target_rows = source_rows, target_rows
        self.borrow = tuple(borrow)

    def structure(self) -> tuple:
        """Everything but the tensors' values that shapes the computation (a CUDA-graph key)."""
        return (type(self).__name__, self.borrow)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the rule reads (captured graphs read them in place)."""
        return [self.step, self.window, self.source_rows, self.target_rows]

    def __call__(self, query, key, value, attn_mask, scale):
        on = self.window.index_select(0, self.step.view(1))[0]  # window[step] without a host sync
        src, tgt = self.source_rows, self.target_rows
        parts = {"query": query, "key": key, "value": value}
        for name in self.borrow:
            own = parts[name]
            parts[name] = own.index_copy(0, tgt, torch.where(on, own[src], own[tgt]))
        return F.scaled_dot_product_attention(**parts, attn_mask=attn_mask, scale=scale)
