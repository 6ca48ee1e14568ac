"""A minimal, independent prompt-to-prompt word swap over negative-prompt inversion.

Written from the papers' formulas (Hertz et al. 2022, §3; Miyake et al. 2023, §3), not from the pipeline: plain
DDIM inversion, explicit (non-fused) attention with the probabilities in hand, cross-attention replacement,
self-attention replacement and local blend. It exists to tell the model's faults from the pipeline's: the same
edit through both must give the same image, and its attention maps are read at every level, not only the one
the pipeline's blend uses. Only word swaps with one token per swapped word (the toy world's colour and shape
edits), where the token mapper is the identity.

    ref = ReferenceP2P(unet, text_encoder, tokenizer, scheduler)
    out = ref.edit(latent0, source_prompt, target_prompt, blend_words=("red", "blue"))
    out.latents  # [2, 4, h, w]: source reconstruction, edit
    out.maps     # {(h, w): [2, h, w, tokens]} cond-branch cross-attention summed over heads, layers and steps
    out.masks    # [steps, 1, h, w] local blend mask of the edit at each blended step
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Controller:
    """What every attention layer consults. Rows of the CFG batch: [uncond src, uncond tgt, cond src, cond tgt];
    only the conditional half is read or controlled (P2P controls the text-conditioned pass)."""

    steps: int
    cross_until: int  # replace target cross-attention by the source's in steps [0, cross_until)
    self_until: int  # replace target self-attention maps in steps [0, self_until) ...
    self_max_length: int  # ... in layers whose query length is at most this
    step: int = 0
    maps: dict = field(default_factory=dict)  # (h, w) -> [2, h*w, tokens] sums over heads, layers, steps

    def __call__(self, probs: torch.Tensor, heads: int, cross: bool) -> torch.Tensor:
        if probs.shape[0] != 4 * heads:  # the inversion (one uncontrolled row)
            return probs
        probs = probs.unflatten(0, (4, heads))  # [4, heads, query, key]
        src, tgt = 2, 3
        if cross:
            if self.step < self.cross_until:
                probs = probs.clone()
                probs[tgt] = probs[src]  # identity mapper: each swapped word has one token
            # Stored after replacement, as in P2P's code, where the store holds the tensor the edit then
            # overwrites in place: inside the window the target's blend map is the source's.
            cond = probs[src:].sum(1)
            self.maps[cond.shape[1]] = self.maps.get(cond.shape[1], 0) + cond
        elif self.step < self.self_until and probs.shape[2] <= self.self_max_length:
            probs = probs.clone()
            probs[tgt] = probs[src]
        return probs.flatten(0, 1)


class ExplicitAttention:
    """softmax(Q Kᵀ / √d) V with the probabilities passed through the controller."""

    def __init__(self, controller: Controller):
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        probs = self.controller(probs, attn.heads, cross)
        out = attn.batch_to_head_dim(probs @ v)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class Result:
    latents: torch.Tensor
    maps: dict
    masks: torch.Tensor | None


def blend_mask(maps: torch.Tensor, weights: torch.Tensor, size, threshold: float) -> torch.Tensor:
    """Local blend (P2P §3.2): word maps ``[rows, h, w, tokens]`` × word weights ``[rows, tokens]`` summed,
    3×3 max-pooled, nearest-upsampled to the latent, divided by their maximum, thresholded; a pixel is edited
    where either the source's or the target's word attends."""
    m = (maps * weights[:, None, None, :]).sum(-1)[:, None]
    m = F.interpolate(F.max_pool2d(m, 3, stride=1, padding=1), size=size, mode="nearest")
    m = m / m.amax(dim=(2, 3), keepdim=True)
    m = m > threshold
    return m[:1] | m[1:]


class ReferenceP2P:
    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.alphas = scheduler.alphas_cumprod.float()
        self.train_steps = scheduler.config.num_train_timesteps

    @torch.no_grad()
    def embed(self, prompts):
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def timesteps(self, steps: int) -> torch.Tensor:
        """DDIM's evenly spaced timesteps with SD's offset of 1, descending."""
        return torch.arange(steps).flip(0) * (self.train_steps // steps) + 1

    def alpha(self, t: int) -> torch.Tensor:
        return self.alphas[t] if t >= 0 else self.alphas[0]  # SD's "set_alpha_to_one=False"

    @torch.no_grad()
    def invert(self, latent0: torch.Tensor, prompt: str, steps: int) -> torch.Tensor:
        """DDIM inversion at guidance 1 (NPI's inversion): z_{t+} = √ā₊ x̂₀ + √(1-ā₊) ε(z_t, t)."""
        cond = self.embed([prompt])
        ts = self.timesteps(steps).flip(0)
        z = latent0
        for i, t in enumerate(ts):
            prev = int(t) - self.train_steps // steps
            a_prev, a_t = self.alpha(prev), self.alpha(int(t))
            eps = self.unet(z, int(t), cond).sample  # ε at the step's upper timestep, as NTI's reference code
            x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            z = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        return z

    @torch.no_grad()
    def edit(
        self,
        latent0,
        source: str,
        target: str,
        blend_words=None,
        steps: int = 50,
        guidance: float = 7.5,
        cross_replace: float = 0.4,
        self_replace: float = 0.6,
        blend_threshold: float = 0.3,
        blend_start: float = 0.2,
        blend_size=None,
    ) -> Result:
        latent_len = latent0.shape[-2] * latent0.shape[-1]
        ctl = Controller(steps, int(cross_replace * (steps + 1)), int(self_replace * steps), latent_len // 4)
        saved = self.unet.attn_processors
        self.unet.set_attn_processor(ExplicitAttention(ctl))
        try:
            zT = self.invert(latent0, source, steps)
            src_emb, tgt_emb = self.embed([source, target])
            # NPI: the source prompt's embedding is the negative ("unconditional") one of every branch.
            context = torch.stack([src_emb, src_emb, src_emb, tgt_emb])
            weights = None
            if blend_words is not None:
                weights = torch.zeros(2, self.tokenizer.model_max_length, device=latent0.device)
                for row, (prompt, word) in enumerate(zip((source, target), blend_words)):
                    weights[row, prompt.split().index(word) + 1] = 1.0  # toy grammar: one token per word, BOS first
            z = zT.expand(2, -1, -1, -1).clone()
            masks = []
            for i, t in enumerate(self.timesteps(steps)):
                ctl.step = i
                eps = self.unet(torch.cat([z, z]), int(t), context).sample
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)
                a_t, a_prev = self.alpha(int(t)), self.alpha(int(t) - self.train_steps // steps)
                x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
                if weights is not None and i >= int(blend_start * steps):
                    length = blend_size[0] * blend_size[1]
                    maps = ctl.maps[length].unflatten(1, blend_size)
                    mask = blend_mask(maps, weights, z.shape[-2:], blend_threshold)
                    masks.append(mask[0])
                    z = torch.stack([z[0], z[0] + mask[0] * (z[1] - z[0])])
        finally:
            self.unet.set_attn_processor(saved)
        maps = {}
        for length, m in ctl.maps.items():
            side = int(round(length**0.5))
            maps[(side, length // side)] = m.unflatten(1, (side, length // side))
        return Result(z, maps, torch.stack(masks) if masks else None)
