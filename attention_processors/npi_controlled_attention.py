"""Processor shell: diffusers' fused attention with the attention core delegated to a rule.

Every attention edit in this project (prompt-to-prompt, MasaCtrl, attention storing) only changes which queries,
keys, values or probabilities meet inside ``softmax(QKᵀ)V``; the projections around it stay exactly those of
diffusers' ``AttnProcessor2_0``. So the shell below is written once and each edit is a small *rule*: a callable
``rule(query, key, value, attn_mask, scale) -> out`` on ``(rows, heads, tokens, head_dim)`` tensors.

Rules read their per-step switches from tensors on the device (a 0-dim ``step`` tensor, window tables), never from
Python counters, so a UNet forward with these processors installed can be captured as a CUDA graph or compiled.
"""

from __future__ import annotations

import torch.nn.functional as F


def fused_attention(query, key, value, attn_mask=None, scale=None):
    """The default rule: one fused kernel, attention probabilities never materialised."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)


class ControlledAttnProcessor:
    """``AttnProcessor2_0`` whose ``softmax(QKᵀ)V`` is computed by ``rule``."""

    def __init__(self, rule=fused_attention):
        self.rule = rule

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.rule(query, key, value, attention_mask, attn.scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
