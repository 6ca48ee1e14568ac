"""Token grounding for training the toy world: each object word's cross-attention drawn into its object.

Why: prompt-to-prompt and local blend need word maps that pick out their objects. Stable Diffusion learns that from
web-scale data; the toy model, trained from scratch on a few million captions, does not: after 11.5k steps of 512
scenes the peak of a word's map is in its object about 45% of the time and not rising, and the local-blend mask is
the whole image (``benchmarks/results/toy_v2/diagnosis.md``). The toy world knows every word's region exactly, so
training can ask for it directly, as TokenCompose does for SD (Wang et al., CVPR 2024, §3.2: the token loss).

``GroundingAttnProcessor`` is diffusers' attention unchanged unless the UNet is called with
``cross_attention_kwargs={"grounding": {"regions": …, "slots": …, "losses": []}}``; then each cross-attention layer
computes its probabilities explicitly and appends its ``token_loss`` to ``losses``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


def token_loss(probs: torch.Tensor, regions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al. 2024, §3.2): mean over grounded tokens of (1 − Σ_{u∈B} A_u / Σ_u A_u)²,
    the share of a token's attention outside its region B, squared.

    Args:
        probs: [b, HW, T] attention probabilities of one layer (heads averaged), HW a square map.
        regions: [b, S, h, w] soft region masks at any resolution divisible by the map's side.
        slots: [b, T] the region each token names, -1 for none.
    """
    side = math.isqrt(probs.shape[1])
    if side * side != probs.shape[1]:
        raise ValueError(f"token_loss needs square maps: probs has {probs.shape[1]} positions")
    masks = F.adaptive_avg_pool2d(regions.to(probs.dtype), side).flatten(2)  # share of each map cell in the region
    token_masks = masks.gather(1, slots.clamp(min=0)[..., None].expand(-1, -1, masks.shape[-1]))  # [b, T, HW]
    inside = torch.einsum("bpt,btp->bt", probs, token_masks)
    outside_share = 1 - inside / probs.sum(1).clamp(min=torch.finfo(probs.dtype).tiny)
    grounded = slots >= 0
    return (outside_share.float() ** 2 * grounded).sum() / grounded.sum().clamp(min=1)


class GroundingAttnProcessor:
    """Scaled-dot-product attention (diffusers' ``AttnProcessor2_0``); for cross-attention with ``grounding``, the
    same attention with explicit probabilities, whose ``token_loss`` is appended to ``grounding["losses"]``."""

    def __init__(self):
        self.fused = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 grounding: dict | None = None):
        if grounding is None or encoder_hidden_states is None:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attn.norm_cross or attn.group_norm is not None or attn.spatial_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError("token grounding supports the plain cross-attention of UNet2DConditionModel")
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [b·heads, HW, T]
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        heads_mean = probs.unflatten(0, (-1, attn.heads)).mean(1)
        grounding["losses"].append(token_loss(heads_mean, grounding["regions"], grounding["slots"]))
        return out / attn.rescale_output_factor
