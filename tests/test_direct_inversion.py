"""Direct Inversion (Ju et al. 2024, "PnP Inversion"; ALGORITHMS §8): the source branch sits on the inversion
trajectory bit for bit, reconstructions are the VAE round trip of z_0 at no UNet cost, targets are guided against the
null embedding at NPI+P2P's row count, and batches equal single edits."""

import dataclasses

import pytest
import torch
from conftest import UNET_OPS, UNetCalls, assert_rounding_close, edit_ops, scene_image, tolerance
from diffusers.models.attention_processor import AttnProcessor

from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    LocalBlend,
    MasaCtrl,
    PromptToPrompt,
    ProximalGuidance,
)


STEPS = 4
SOURCE = "a red cat on a white background"
TARGETS = ["a red dog on a white background", "a big red dog on a white background"]  # word swap, refinement
BLEND = PromptToPrompt(0.6, 0.5, local_blend=LocalBlend(("cat", "dog")))
CONTROLS = {
    "p2p local blend": dict(attention_control=BLEND, prompt=TARGETS[0]),
    "p2p refine reweight": dict(attention_control=PromptToPrompt(reweight={"big": 2.0}), prompt=TARGETS[1]),
    "masactrl": dict(attention_control=MasaCtrl(start_step=1), prompt=TARGETS[0]),
    "p2p proximal": dict(
        attention_control="p2p", proximal_guidance=ProximalGuidance(reconstruction_guidance=True), prompt=TARGETS
    ),
}


@pytest.fixture()
def inversion(pipe):
    return pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS, inversion_method="direct")


def latents(pipe, **kwargs):
    return pipe(output_type="latent", **kwargs).images


def step_latents(pipe, **kwargs) -> list[torch.Tensor]:
    """Every branch's latent after each step, as `callback_on_step_end` sees it."""
    seen = []

    def record(pipe_, i, t, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    pipe(output_type="latent", callback_on_step_end=record, **kwargs)
    return seen


class UNetEmbeddings:
    """The text embeddings of every UNet forward."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(
            lambda module, args, kwargs: self.calls.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --------------------------------------------------------------------------------------------------------------
# The inversion: DDIM's, under another name


def test_direct_inversion_is_ddim_inversion_and_round_trips_through_a_file(pipe, inversion, tmp_path):
    npi = pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    assert inversion.method == "direct" and torch.equal(inversion.latents, npi.latents)
    inversion.save(tmp_path / "direct.safetensors")
    loaded = pipe.load_inversion(tmp_path / "direct.safetensors")
    assert loaded.method == "direct" and torch.equal(loaded.latents, inversion.latents)
    # the same trajectory, so an NPI inversion edited as "direct" is Direct Inversion, bit for bit
    edit = dict(prompt=TARGETS[0], attention_control=BLEND)
    assert torch.equal(
        latents(pipe, inversion=npi, inversion_method="direct", **edit), latents(pipe, inversion=loaded, **edit)
    )


def test_constructor_flag_makes_direct_inversions(components):
    from negative_prompt_inversion.pipeline_negative_prompt_inversion import NegativePromptInversionPipeline

    pipe = NegativePromptInversionPipeline(**components, inversion_method="direct")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.invert(scene_image(0), SOURCE, num_inference_steps=2).method == "direct"


def test_nti_inversions_can_be_edited_as_direct_but_not_the_reverse(pipe, inversion):
    nti = pipe.invert(
        scene_image(0), SOURCE, num_inference_steps=STEPS, inversion_method="nti", null_text_inner_steps=1
    )
    assert torch.equal(
        latents(pipe, inversion=nti, inversion_method="direct", prompt=TARGETS[0]),
        latents(pipe, inversion=inversion, prompt=TARGETS[0]),
    )
    with (
        UNetCalls(pipe.unet) as calls,
        pytest.raises(ValueError, match="invert the image with inversion_method='nti'"),
    ):
        pipe(inversion=inversion, inversion_method="nti")
    assert calls.batches == []


# --------------------------------------------------------------------------------------------------------------
# The source branch and reconstructions sit on the trajectory


@pytest.mark.parametrize("name", list(CONTROLS))
def test_source_branch_equals_the_trajectory_bit_for_bit_at_every_step(pipe, inversion, name):
    seen = step_latents(pipe, inversion=inversion, **CONTROLS[name])
    assert len(seen) == STEPS
    for i, step in enumerate(seen):
        assert torch.equal(step[0], inversion.latents[0, STEPS - 1 - i]), f"step {i}"
        assert not torch.equal(step[1], inversion.latents[0, STEPS - 1 - i])  # the target is edited


def test_reconstruction_is_the_vae_decode_of_z0_and_costs_no_unet_pass(pipe, inversion):
    with UNetCalls(pipe.unet) as calls:
        images = pipe(inversion=inversion, output_type="pt").images
        z0 = latents(pipe, inversion=inversion, prompt=SOURCE)  # the source prompt, no control: a reconstruction
    assert calls.batches == []
    decoded = pipe.image_processor.postprocess(pipe.decode_latents(inversion.latents[:, 0]), output_type="pt")
    assert torch.equal(images, decoded) and torch.equal(z0, inversion.latents[:, 0])


def test_a_reconstruction_beside_an_edit_costs_nothing_and_stays_z0(pipe, inversion):
    with UNetCalls(pipe.unet) as calls:
        out = latents(pipe, inversion=inversion, prompt=[TARGETS[0], SOURCE])
    assert calls.batches == [2] * STEPS  # the edit's conditional and null rows only
    assert torch.equal(out[1], inversion.latents[0, 0])
    assert torch.equal(out[:1], latents(pipe, inversion=inversion, prompt=TARGETS[0]))  # same rows, same batch


def test_attention_maps_of_a_reconstruction_are_recorded_on_the_trajectory(pipe, inversion):
    # asking for maps gives the reconstruction its conditional row; it still sits on the trajectory
    with UNetCalls(pipe.unet) as calls:
        out = pipe(inversion=inversion, output_type="latent", return_attention_maps=True)
    assert calls.batches == [1] * STEPS
    assert torch.equal(out.images, inversion.latents[:, 0])
    torch.testing.assert_close(out.attention_maps[0].sum(-1), torch.ones(out.attention_maps[0].shape[:2]))


# --------------------------------------------------------------------------------------------------------------
# Targets: guided against the null embedding, at NPI+P2P's cost


def test_rows_equal_npi_p2p_and_targets_are_guided_against_the_null_embedding(pipe, inversion):
    npi = dataclasses.replace(inversion, method="npi")
    runs = {}
    for name, kwargs in {
        "direct": dict(inversion=inversion),
        "npi": dict(inversion=npi),
        "npi, null-guided": dict(inversion=npi, target_guidance="null"),
    }.items():
        with UNetEmbeddings(pipe.unet) as seen, pipe.count_unet_calls() as log:
            latents(pipe, prompt=TARGETS, attention_control="p2p", **kwargs)
        runs[name] = seen.calls
        assert log.calls == [(1 + 2 * len(TARGETS), False)] * STEPS, name  # source: 1 row; each target: 2
    # rows: the targets' unconditional rows, then the conditional rows of the source and the targets
    empty = pipe.encode_text([""], "cpu")[0][0].detach()
    for embeds in runs["direct"]:
        for row in embeds[: len(TARGETS)]:
            assert_rounding_close(row, empty, ops=UNET_OPS)  # E("") from a batch of other prompts
        assert torch.equal(embeds[len(TARGETS)], inversion.prompt_embeds[0])
    assert all(torch.equal(row, inversion.prompt_embeds[0]) for row in runs["npi"][0][: len(TARGETS)])
    assert all(torch.equal(a, b) for a, b in zip(runs["direct"], runs["npi, null-guided"]))


def test_direct_inversion_is_null_guided_npi_with_a_pinned_source(pipe, inversion, monkeypatch):
    # Without the pin, Direct Inversion's step is NPI+P2P's with null-guided targets (Ju et al. 2024, §4)
    from negative_prompt_inversion import pipeline_negative_prompt_inversion as npi

    monkeypatch.setattr(npi, "pin_to_trajectory", lambda latents, anchor, pinned: latents)
    unpinned = latents(pipe, inversion=inversion, prompt=TARGETS, attention_control=BLEND)
    null_guided = latents(
        pipe,
        inversion=dataclasses.replace(inversion, method="npi"),
        prompt=TARGETS,
        attention_control=BLEND,
        target_guidance="null",
    )
    assert torch.equal(unpinned, null_guided)


def test_negative_prompt_steers_direct_inversion_targets(pipe, inversion):
    plain = latents(pipe, inversion=inversion, prompt=TARGETS[0], attention_control=BLEND)
    assert torch.equal(
        plain, latents(pipe, inversion=inversion, prompt=TARGETS[0], attention_control=BLEND, negative_prompt="")
    )  # "" is the default
    steered = latents(pipe, inversion=inversion, prompt=TARGETS[0], attention_control=BLEND, negative_prompt="blurry")
    assert (steered - plain).abs().max() > tolerance(plain, edit_ops(STEPS))


# --------------------------------------------------------------------------------------------------------------
# Batches and the user's processors


def test_batch_equals_single_edits_and_user_processors_are_restored(pipe):
    images, sources = [scene_image(3), scene_image(4)], [SOURCE, "a blue dog on a black background"]
    targets = [
        ["a red dog on a white background", "a big red dog on a white background"],  # swap, refine
        ["a blue cat on a black background", "a green cat on a black background"],
    ]
    blend = [("cat", "dog"), ("dog", "cat")]
    control = PromptToPrompt(0.6, 0.5, local_blend=LocalBlend(blend))
    user = AttnProcessor()
    pipe.unet.set_attn_processor(user)
    batched = pipe.invert(images, sources, num_inference_steps=STEPS, inversion_method="direct")
    together = latents(pipe, prompt=targets, inversion=batched, attention_control=control)
    for k in range(2):  # (batched inversions equal single ones: test_pipeline_core)
        for j, target in enumerate(targets[k]):
            alone = latents(
                pipe,
                prompt=target,
                inversion=batched[k],
                attention_control=dataclasses.replace(control, local_blend=LocalBlend(blend[k])),
            )
            assert_rounding_close(together[2 * k + j : 2 * k + j + 1], alone, ops=edit_ops(STEPS))
    assert all(processor is user for processor in pipe.unet.attn_processors.values())

    def fail(pipe_, i, t, tensors):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pipe(prompt=targets, inversion=batched, attention_control=control, callback_on_step_end=fail)
    assert all(processor is user for processor in pipe.unet.attn_processors.values())


# --------------------------------------------------------------------------------------------------------------
# SDXL


def test_sdxl_direct_inversion_with_p2p_pins_its_source_and_guides_against_zeros(sdxl_pipe):
    inversion = sdxl_pipe.invert(scene_image(0, 64), SOURCE, num_inference_steps=STEPS, inversion_method="direct")
    with UNetEmbeddings(sdxl_pipe.unet) as seen:
        steps = step_latents(sdxl_pipe, inversion=inversion, prompt=TARGETS[0], attention_control=BLEND)
    for i, step in enumerate(steps):
        assert torch.equal(step[0], inversion.latents[0, STEPS - 1 - i])
    assert all(len(embeds) == 3 and not embeds[0].any() for embeds in seen.calls)  # the null: zeros on SDXL
    with UNetCalls(sdxl_pipe.unet) as calls:
        assert torch.equal(latents(sdxl_pipe, inversion=inversion), inversion.latents[:, 0])
    assert calls.batches == []
