"""Token grounding for training the toy world: each object word's cross-attention drawn into its object.

Why: prompt-to-prompt and local blend need word maps that pick out their objects. Stable Diffusion learns that from
web-scale data; the toy model, trained from scratch on a few million captions, does not: after 11.5k steps of 512
scenes the peak of a word's map is in its object about 45% of the time and not rising, and the local-blend mask is
the whole image (``benchmarks/results/toy_v2/diagnosis.md``). The toy world knows every word's region exactly, so
training can ask for it directly, as TokenCompose does for SD (Wang et al., CVPR 2024, §3.2: the token loss, and
the pixel loss that makes a word's map cover its whole region rather than its rim).

``GroundingAttnProcessor`` is diffusers' attention unchanged unless the UNet is called with
``cross_attention_kwargs={"grounding": {"regions": …, "slots": …, "losses": []}}``; then each cross-attention layer
computes its probabilities explicitly and appends its ``token_loss`` to ``losses`` (and its ``pixel_loss`` to
``pixel_losses`` when the dict has that list).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


def _token_masks(probs: torch.Tensor, regions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[b, T, HW]: the share of each map cell inside the region each token names (rows of ungrounded tokens, slot -1,
    hold region 0's mask: ``_mean_over_grounded`` drops them)."""
    side = math.isqrt(probs.shape[1])
    if side * side != probs.shape[1]:
        raise ValueError(f"grounding losses need square maps: probs has {probs.shape[1]} positions")
    masks = F.adaptive_avg_pool2d(regions.to(probs.dtype), side).flatten(2)  # share of each map cell in the region
    return masks.gather(1, slots.clamp(min=0)[..., None].expand(-1, -1, masks.shape[-1]))


def _mean_over_grounded(per_token: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    grounded = slots >= 0
    return (per_token.float() * grounded).sum() / grounded.sum().clamp(min=1)


def token_loss(probs: torch.Tensor, regions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al. 2024, §3.2): mean over grounded tokens of (1 − Σ_{u∈B} A_u / Σ_u A_u)²,
    the share of a token's attention outside its region B, squared.

    Args:
        probs: [b, HW, T] attention probabilities of one layer (heads averaged), HW a square map.
        regions: [b, S, h, w] soft region masks at any resolution divisible by the map's side.
        slots: [b, T] the region each token names, -1 for none.
    """
    inside = torch.einsum("bpt,btp->bt", probs, _token_masks(probs, regions, slots))
    outside_share = 1 - inside / probs.sum(1).clamp(min=torch.finfo(probs.dtype).tiny)
    return _mean_over_grounded(outside_share**2, slots)


def pixel_loss(probs: torch.Tensor, regions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """TokenCompose's pixel loss (Wang et al. 2024, §3.2): mean over grounded tokens of the binary cross-entropy
    between the token's attention probability A_u at each cell u and the region's mask M_u,
    −mean_u[M_u log A_u + (1 − M_u) log(1 − A_u)]. The token loss only asks a word's attention to stay inside its
    region, which a map on the region's rim satisfies; this one asks the word to hold every cell of it, which is
    what a local-blend mask thresholded at a share of its maximum needs. Arguments as ``token_loss``'s."""
    masks = _token_masks(probs, regions, slots).float()
    eps = torch.finfo(torch.float32).eps
    a = probs.float().transpose(1, 2).clamp(eps, 1 - eps)  # [b, T, HW]; log 0 would be −inf
    bce = -(masks * a.log() + (1 - masks) * (1 - a).log()).mean(-1)
    return _mean_over_grounded(bce, slots)


class GroundingAttnProcessor:
    """Scaled-dot-product attention (diffusers' ``AttnProcessor2_0``); for cross-attention with ``grounding``, the
    same attention with explicit probabilities, whose ``token_loss`` is appended to ``grounding["losses"]``."""

    def __init__(self):
        self.fused = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        grounding: dict | None = None,
    ):
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
        if "pixel_losses" in grounding:
            grounding["pixel_losses"].append(pixel_loss(heads_mean, grounding["regions"], grounding["slots"]))
        return out / attn.rescale_output_factor
