"""Mutual self-attention control (MasaCtrl, Cao et al. 2023) as an attention rule.

From ``start_step`` on, in the controlled layers, a target's queries attend to its source's keys and values,
``attention(Q_tgt, K_src, V_src)``, separately for each half of the classifier-free-guidance batch; the source is
untouched. The target keeps the source's appearance while its own queries (hence its layout or pose) follow the
target prompt. Fused kernel only; the switch is a device tensor so the step stays capturable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MutualSelfAttention:
    """Target rows take key and value from their source rows once ``step >= start_step`` (both 0-dim tensors)."""

    def __init__(self, step, start_step, source_rows, target_rows):
        self.step, self.start_step = step, start_step
        self.source_rows, self.target_rows = source_rows, target_rows

    def __call__(self, query, key, value, attn_mask, scale):
        on = self.step >= self.start_step
        src, tgt = self.source_rows, self.target_rows
        key = key.index_copy(0, tgt, torch.where(on, key[src], key[tgt]))
        value = value.index_copy(0, tgt, torch.where(on, value[src], value[tgt]))
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
