"""Proximal guidance (ProxEdit) and mutual self-attention control (MasaCtrl)."""

import dataclasses

import pytest
import torch
from conftest import UNetCalls, assert_rounding_close, edit_ops, scene_image, tolerance

from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    LocalBlend,
    MasaCtrl,
    MutualSelfAttention,
    PromptToPrompt,
    ProximalGuidance,
    edit_region,
    hard_threshold,
    proximal_direction,
    soft_threshold,
)


STEPS = 4
SOURCE = "a red cat on a white background"
TARGET = "a blue cat on a white background"
NO_GUIDANCE = dict(inversion_guidance=False, reconstruction_guidance=False)  # ProximalGuidance fields


@pytest.fixture()
def inversion(shared_inversion):
    return shared_inversion(SOURCE, STEPS)


def latents(pipe, **kwargs):
    return pipe(output_type="latent", **kwargs).images


def test_thresholds_follow_their_formulas_on_a_hand_made_tensor():
    d = torch.tensor([[-3.0, -1.5, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0]]).view(1, 1, 2, 4)
    lam = torch.tensor(1.0).view(1, 1, 1, 1)
    soft = soft_threshold(d, lam).flatten().tolist()
    hard = hard_threshold(d, lam).flatten().tolist()
    assert soft == [-2.0, -0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 3.0]
    assert hard == [-3.0, -1.5, 0.0, 0.0, 0.0, 0.0, 2.0, 4.0]  # |d| = λ is zeroed: strict inequality
    mask = edit_region(soft_threshold(d, lam), lam, dilation=0).flatten().tolist()
    assert mask == [1.0, 0, 0, 0, 0, 0, 0, 1.0]  # soft: |d| > 2λ


def test_quantile_is_per_sample():
    torch.manual_seed(0)
    d = torch.randn(3, 4, 8, 8) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1)
    _, lam = proximal_direction(d, "soft", 0.7, None)
    for k in range(3):
        _, alone = proximal_direction(d[k : k + 1], "soft", 0.7, None)
        assert torch.equal(lam[k], alone[0])


def test_per_target_quantile_2q_minus_1_matches_the_references_batch_quantile_under_npi():
    # The references take one quantile over the batch; under NPI the source's direction is exactly zero, so q over
    # (zeros, d) falls between the same two order statistics of |d| as 2q − 1 over d alone (benchmarks/pie_bench.py
    # runs PnPInversion's q = 0.75 as 0.5). Positions: 0.75·(2n − 1) − n = n/2 − 0.75 and 0.5·(n − 1) = n/2 − 0.5.
    torch.manual_seed(0)
    d = torch.randn(1, 4, 16, 16)
    batch_lambda = torch.cat([torch.zeros_like(d), d]).abs().flatten().quantile(0.75)
    _, ours = proximal_direction(d, "soft", 2 * 0.75 - 1, None)
    ordered = d.abs().flatten().sort().values
    n = ordered.numel()
    for lam in (batch_lambda, ours.flatten()[0]):
        assert ordered[n // 2 - 1] <= lam <= ordered[n // 2]


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_everything_zeroed_is_exactly_the_ddim_reconstruction(pipe, inversion, mode):
    edit = latents(
        pipe, prompt=TARGET, inversion=inversion, proximal_guidance=ProximalGuidance(mode, quantile=1.0, **NO_GUIDANCE)
    )
    reconstruction = latents(pipe, inversion=dataclasses.replace(inversion, method="ddim"), guidance_scale=1.0)
    # d is zeroed exactly, so ε = ε_u: the paths differ only in the UNet's batch size (2 rows vs 1), never amplified
    assert_rounding_close(edit, reconstruction, ops=edit_ops(STEPS, guidance_scale=1.0))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_nothing_zeroed_is_exactly_plain_npi(pipe, inversion, mode):
    edit = latents(
        pipe,
        prompt=TARGET,
        inversion=inversion,
        proximal_guidance=ProximalGuidance(mode, threshold=0.0, **NO_GUIDANCE),
    )
    plain = latents(pipe, prompt=TARGET, inversion=inversion)
    assert torch.equal(edit, plain)


@pytest.mark.parametrize(
    "extra",
    [{}, {"attention_control": PromptToPrompt(0.5, local_blend=LocalBlend(("cat", "cat")))}],
    ids=["plain", "p2p"],
)
def test_inversion_guidance_with_step_one_pins_the_unedited_region(pipe, shared_inversion, extra):
    steps = 5  # local blend starts at step int(0.2 · 5) = 1: step 0 shows inversion guidance on its own
    inversion = shared_inversion(SOURCE, steps)
    seen = []

    def capture(pipe_, i, t, tensors):
        seen.append((i, int(t), tensors["latents"][-1:].clone(), tensors["edit_mask"].clone()))
        return tensors

    pipe(
        prompt=TARGET,
        inversion=inversion,
        proximal_guidance=ProximalGuidance("soft", step_size=1.0, below_timestep=1000),
        callback_on_step_end=capture,
        callback_on_step_end_tensor_inputs=["latents", "edit_mask"],
        output_type="latent",
        **extra,
    )
    guided = 0
    for i, t, z, mask in seen:
        if extra and i >= int(0.2 * steps):
            continue  # local blend runs after the guidance and may move the latent again
        keep = (1 - mask).bool()
        anchor = inversion.latents[:, steps - i - 1]
        assert keep.any()
        assert_rounding_close(z[keep], anchor[keep], ops=4)  # z − 1·(z − a)·1: two roundings of values ≤ 2·scale
        guided += 1
    assert guided > 0


def test_edit_mask_images_are_returned(pipe, inversion):
    out = pipe(prompt=TARGET, inversion=inversion, proximal_guidance="hard", return_edit_mask=True)
    assert len(out.edit_masks) == 1 and out.edit_masks[0].size == (32, 32) and out.edit_masks[0].mode == "L"


def test_proximal_batch_independence_with_nti_and_p2p(pipe):
    # Thresholds are discontinuous: float32 batch-size noise in the UNet could flip an element sitting exactly at
    # λ. In float64 that noise is far below float32 rounding, so equality must be exact up to it.
    pipe.to(torch.float64)
    nti = pipe.invert(scene_image(1), SOURCE, num_inference_steps=3, inversion_method="nti", null_text_inner_steps=1)
    targets = [TARGET, "a red dog on a white background"]
    kwargs = dict(inversion=nti, proximal_guidance="soft", attention_control=PromptToPrompt(cross_replace_steps=0.5))
    together = latents(pipe, prompt=targets, **kwargs)
    for k, target in enumerate(targets):
        # ε comes back as float32: float64 noise can only change its rounding, one eps per step
        assert_rounding_close(together[k : k + 1], latents(pipe, prompt=target, **kwargs), ops=edit_ops(3, unet_ops=1))


def edit_and_masks(pipe, prompt, **kwargs):
    """Latents of the edited branches, and proximal guidance's edit mask of every step."""
    masks = []

    def capture(pipe_, i, t, tensors):
        if tensors["edit_mask"] is not None:  # None without proximal guidance
            masks.append(tensors["edit_mask"])
        return tensors

    out = latents(
        pipe,
        prompt=prompt,
        callback_on_step_end=capture,
        callback_on_step_end_tensor_inputs=["latents", "edit_mask"],
        **kwargs,
    )
    return out, masks


BATCH_MODES = {
    "soft": dict(proximal_guidance="soft"),
    "hard": dict(proximal_guidance="hard"),
    "fixed": dict(proximal_guidance=ProximalGuidance("hard", threshold=0.003)),
    "p2p-soft": dict(proximal_guidance="soft", attention_control=PromptToPrompt(cross_replace_steps=0.4)),
    "p2p-hard": dict(proximal_guidance="hard", attention_control=PromptToPrompt(cross_replace_steps=0.4)),
    "p2p-fixed": dict(
        proximal_guidance=ProximalGuidance("soft", threshold=0.003),
        attention_control=PromptToPrompt(cross_replace_steps=0.4),
    ),
    "masactrl": dict(attention_control=MasaCtrl(start_step=1)),
    "prox-masactrl": dict(attention_control=MasaCtrl(start_step=1), proximal_guidance="soft"),
}


@pytest.mark.parametrize("mode", BATCH_MODES)
def test_float32_batch_edits_equal_single_ones_and_masks_never_flip(pipe, inversion, mode):
    # The UNet's float32 rounding depends on the batch size, so outputs may differ by rounding, but a threshold
    # decision must not: one flipped mask element moves a latent by ~0.3 through inversion guidance. With P2P, a
    # target equal to its source has d ≡ 0, i.e. pure rounding noise in a batch (MasaCtrl's null uncond: a real d).
    kwargs = dict(inversion=inversion, **BATCH_MODES[mode])
    targets = [TARGET, "a red dog on a white background"] if "masactrl" in mode else [TARGET, SOURCE]
    together, together_masks = edit_and_masks(pipe, targets, **kwargs)
    for k, target in enumerate(targets):
        alone, alone_masks = edit_and_masks(pipe, target, **kwargs)
        for step, (batch_mask, mask) in enumerate(zip(together_masks, alone_masks)):
            assert torch.equal(batch_mask[k : k + 1], mask), f"{target!r}: mask flipped at step {step}"
        assert_rounding_close(together[k : k + 1], alone, ops=edit_ops(STEPS))


@pytest.mark.parametrize("kwargs", [dict(), dict(threshold=0.0)], ids=["quantile", "threshold-0"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_a_target_equal_to_its_source_is_never_in_the_edit_mask(pipe, inversion, mode, kwargs):
    # Its d is 0 in exact arithmetic; in a P2P batch it is rounding noise, which must not reach the mask.
    kwargs = dict(
        inversion=inversion,
        proximal_guidance=ProximalGuidance(mode, **kwargs),
        attention_control=PromptToPrompt(cross_replace_steps=0.4),
    )
    for prompt in (SOURCE, [TARGET, "a red dog on a white background", SOURCE]):
        _, masks = edit_and_masks(pipe, prompt, **kwargs)
        assert all(not mask[-1].any() for mask in masks)


def test_proximal_flag_in_config_is_the_default(components, inversion):
    from negative_prompt_inversion.pipeline_negative_prompt_inversion import NegativePromptInversionPipeline

    prox = NegativePromptInversionPipeline(**components, proximal_guidance="soft")
    prox.set_progress_bar_config(disable=True)
    plain = NegativePromptInversionPipeline(**components)
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(
        latents(prox, prompt=TARGET, inversion=inversion),
        latents(plain, prompt=TARGET, inversion=inversion, proximal_guidance="soft"),
    )
    assert torch.equal(
        latents(prox, prompt=TARGET, inversion=inversion, proximal_guidance=False),
        latents(plain, prompt=TARGET, inversion=inversion),
    )


def test_masactrl_same_prompt_reproduces_reconstruction(pipe, inversion):
    edit = latents(
        pipe, prompt=SOURCE, inversion=inversion, attention_control=MasaCtrl(start_step=0), guidance_scale=1.0
    )
    assert_rounding_close(edit, latents(pipe, inversion=inversion), ops=edit_ops(STEPS, guidance_scale=1.0))


def test_masactrl_after_the_last_step_is_the_uncontrolled_edit(pipe, inversion):
    controlled = latents(pipe, prompt=TARGET, inversion=inversion, attention_control=MasaCtrl(start_step=STEPS))
    # The synthesis branch uses the null embedding, i.e. exactly a DDIM-style edit from the same trajectory.
    uncontrolled = latents(pipe, prompt=TARGET, inversion=dataclasses.replace(inversion, method="ddim"))
    assert_rounding_close(controlled, uncontrolled, ops=edit_ops(STEPS))  # batch of 3 rows vs 2
    started = latents(pipe, prompt=TARGET, inversion=inversion, attention_control=MasaCtrl(start_step=0))
    assert (started - uncontrolled).abs().max() > tolerance(uncontrolled, edit_ops(STEPS))


def test_mutual_self_attention_switches_on_exactly_at_start_step():
    # Exact and local: the end-to-end check above cannot see a switch one step early (at t = 1 it moves the latents
    # by ~1e-4, under the rounding budget of two differently batched runs).
    import torch.nn.functional as F

    torch.manual_seed(0)
    query, key, value = (torch.randn(3, 2, 16, 8) for _ in range(3))
    window = torch.arange(6) >= 4  # MasaCtrl(start_step=4) in 6 steps
    rule = MutualSelfAttention(torch.tensor(3), window, torch.tensor([0]), torch.tensor([2]), borrow=("key", "value"))
    assert torch.equal(rule(query, key, value, None, None), F.scaled_dot_product_attention(query, key, value))
    rule.step.fill_(4)
    mutual_key, mutual_value = key.clone(), value.clone()
    mutual_key[2], mutual_value[2] = key[0], value[0]
    expected = F.scaled_dot_product_attention(query, mutual_key, mutual_value)
    assert torch.equal(rule(query, key, value, None, None), expected)


def test_prox_masactrl_rows_and_batch_independence(pipe):
    pipe.to(torch.float64)
    steps = 3  # MasaCtrl from step 1: one step without it, two with it
    inversion = pipe.invert(scene_image(0), SOURCE, num_inference_steps=steps)
    targets = [TARGET, "a red dog on a white background"]
    kwargs = dict(inversion=inversion, attention_control=MasaCtrl(start_step=1), proximal_guidance="soft")
    with UNetCalls(pipe.unet) as calls:
        together = latents(pipe, prompt=targets, **kwargs)
    assert calls.batches == [1 + 2 * len(targets)] * steps  # NPI source: one pass; targets: null + prompt
    for k, target in enumerate(targets):
        assert_rounding_close(
            together[k : k + 1], latents(pipe, prompt=target, **kwargs), ops=edit_ops(steps, unet_ops=1)
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(proximal_guidance=ProximalGuidance(quantile=1.5)), r"ProximalGuidance.quantile must lie in \[0, 1\]"),
        (dict(proximal_guidance=ProximalGuidance(quantile=-0.1)), r"ProximalGuidance.quantile must lie in \[0, 1\]"),
        (dict(proximal_guidance="l0"), "proximal_guidance must be one of"),
        (dict(proximal_guidance=ProximalGuidance(threshold=-1.0)), "ProximalGuidance.threshold must be a number >= 0"),
        (dict(attention_control=MasaCtrl(start_step=STEPS + 1)), "MasaCtrl.start_step must be an integer in"),
        (dict(attention_control=MasaCtrl(start_layer=99)), "MasaCtrl.start_layer must be an integer in"),
        (dict(attention_control="mutual"), "attention_control must be one of"),
    ],
)
def test_bad_input_is_rejected(pipe, inversion, kwargs, message):
    with UNetCalls(pipe.unet) as calls, pytest.raises(ValueError, match=message):
        pipe(prompt=TARGET, inversion=inversion, **kwargs)
    assert calls.batches == []
