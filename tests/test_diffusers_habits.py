"""The arguments diffusers users reach for: accepted where they mean something (``negative_prompt``,
``prompt_embeds``, ``negative_prompt_embeds``), refused naming the alternative where they do not, before any UNet
pass; the ``Examples:`` docstring; NTI's guidance default; checked callbacks; no re-entrant calls."""

from unittest import mock

import pytest
import torch
from conftest import UNetCalls, assert_rounding_close, edit_ops, scene_image, tolerance

from negative_prompt_inversion import pipeline_negative_prompt_inversion as npi
from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    MasaCtrl,
    NegativePromptInversionPipeline,
    PromptToPrompt,
)


STEPS = 3
SOURCE = "a red cat on a white background"
TARGET = "a blue cat on a white background"


@pytest.fixture()
def inversion(pipe):
    return pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)


def latents(pipe, **kwargs):
    return pipe(output_type="latent", **kwargs).images


# --------------------------------------------------------------------------------------------------------------
# Accepted: they do what they say


def test_negative_prompt_equals_its_embedding_passed_explicitly(pipe, inversion):
    direct = dict(inversion=inversion, inversion_method="direct", prompt=TARGET, attention_control="p2p")
    plain, steered = latents(pipe, **direct), latents(pipe, **direct, negative_prompt="blurry")
    assert (steered - plain).abs().max() > tolerance(plain, edit_ops(STEPS))
    blurry = pipe.encode_text(["blurry"], "cpu")[0]
    # the pipeline encodes "blurry" in one batch with the target: other roundings of the same embedding
    assert_rounding_close(latents(pipe, **direct, negative_prompt_embeds=blurry), steered, ops=edit_ops(STEPS))
    per_target = latents(pipe, **dict(direct, prompt=[TARGET, TARGET]), negative_prompt=["blurry", ""])
    assert_rounding_close(per_target[:1], steered, ops=edit_ops(STEPS))
    assert_rounding_close(per_target[1:], plain, ops=edit_ops(STEPS))


def test_negative_prompt_is_what_ddim_and_masactrl_targets_are_steered_against(pipe, inversion):
    for kwargs in (dict(inversion_method="ddim"), dict(attention_control=MasaCtrl(start_step=1))):
        call = dict(inversion=inversion, prompt=TARGET, **kwargs)
        assert not torch.equal(latents(pipe, **call), latents(pipe, **call, negative_prompt="blurry"))


def test_target_guidance_null_lets_npi_p2p_targets_take_a_negative_prompt(pipe, inversion):
    call = dict(inversion=inversion, prompt=TARGET, attention_control="p2p")
    with UNetCalls(pipe.unet) as calls, pytest.raises(ValueError, match="pass target_guidance='null'"):
        pipe(**call, negative_prompt="blurry")
    assert calls.batches == []
    null_guided = latents(pipe, **call, target_guidance="null")
    assert not torch.equal(null_guided, latents(pipe, **call))
    assert not torch.equal(null_guided, latents(pipe, **call, target_guidance="null", negative_prompt="blurry"))


def test_nti_refuses_a_negative_prompt_naming_direct_inversion(pipe):
    nti = pipe.invert(
        scene_image(0), SOURCE, num_inference_steps=STEPS, inversion_method="nti", null_text_inner_steps=1
    )
    with UNetCalls(pipe.unet) as calls, pytest.raises(ValueError, match="inversion_method='direct'"):
        pipe(inversion=nti, prompt=TARGET, attention_control=MasaCtrl(start_step=1), negative_prompt="blurry")
    assert calls.batches == []


def test_prompt_embeds_equal_prompt(pipe, inversion):
    embeds = pipe.encode_text([TARGET], "cpu")[0]
    assert torch.equal(
        latents(pipe, inversion=inversion, prompt_embeds=embeds), latents(pipe, inversion=inversion, prompt=TARGET)
    )  # the same text-encoder batch
    masactrl = dict(inversion=inversion, attention_control=MasaCtrl(start_step=1))  # E("") joins the batch
    assert_rounding_close(
        latents(pipe, prompt_embeds=embeds, **masactrl), latents(pipe, prompt=TARGET, **masactrl), ops=edit_ops(STEPS)
    )
    two = pipe.encode_text([TARGET, "a red dog on a white background"], "cpu")[0]
    together = latents(pipe, inversion=inversion, prompt_embeds=two)
    assert_rounding_close(
        together[1:], latents(pipe, inversion=inversion, prompt="a red dog on a white background"), ops=edit_ops(STEPS)
    )


def test_sdxl_prompt_embeds_come_with_pooled_embeddings(sdxl_pipe):
    inversion = sdxl_pipe.invert(scene_image(0, 64), SOURCE, num_inference_steps=STEPS)
    embeds, pooled = sdxl_pipe.encode_text([TARGET], "cpu")
    with pytest.raises(ValueError, match="needs pooled_prompt_embeds"):
        sdxl_pipe(inversion=inversion, prompt_embeds=embeds)
    assert torch.equal(
        latents(sdxl_pipe, inversion=inversion, prompt_embeds=embeds, pooled_prompt_embeds=pooled),
        latents(sdxl_pipe, inversion=inversion, prompt=TARGET),
    )


# --------------------------------------------------------------------------------------------------------------
# Refused: naming the alternative, before any UNet pass


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(generator=torch.Generator().manual_seed(0)), "deterministic DDIM"),
        (dict(image=scene_image(0)), r"pipe.invert\(image, source_prompt\)"),
        (dict(num_images_per_prompt=2), "give several target prompts"),
        (dict(eta=0.0, num_images_per_prompt=1, generator=None, image=[]), "image is not used"),
        (dict(latents=torch.zeros(1, 4, 16, 16)), "starts from the inversion's z_T"),
        (dict(eta=0.5), "leave eta unset"),
        (dict(prompt_embeds=torch.zeros(1, 77, 32), attention_control="p2p"), "pass prompt=..., not prompt_embeds"),
        (dict(prompt_embeds=torch.zeros(1, 77, 32), prompt=TARGET), "prompt or as prompt_embeds, not both"),
        (dict(prompt_embeds=torch.zeros(1, 7, 32)), r"prompt_embeds must be a floating-point tensor \(n, 77, 32\)"),
        (dict(pooled_prompt_embeds=torch.zeros(1, 24)), "comes with prompt_embeds"),
        (
            dict(negative_prompt="blurry", negative_prompt_embeds=torch.zeros(1, 77, 32), inversion_method="direct"),
            "not both",
        ),
        (dict(negative_prompt=["a", "b"], inversion_method="direct"), "a list of 1 strings"),
        (dict(negative_prompt="blurry"), "target_guidance='null'"),
        (dict(target_guidance="source"), "target_guidance must be one of"),
        (dict(inversion_method="pnp"), "inversion_method must be one of"),
    ],
)
def test_refused_arguments_name_the_alternative_before_any_unet_pass(pipe, inversion, kwargs, message):
    with UNetCalls(pipe.unet) as calls, pytest.raises(ValueError, match=message):
        pipe(**{"prompt": None if "prompt_embeds" in kwargs else TARGET, "inversion": inversion, **kwargs})
    assert calls.batches == []


def test_the_examples_docstring_is_filled_with_todays_arguments():
    doc = NegativePromptInversionPipeline.__call__.__doc__
    example = doc[doc.index("Examples:") : doc.index("Returns:")]
    assert "```py" in example and "pipe.invert(" in example and "inversion=inversion" in example
    assert "torch_dtype" not in example and "dtype=torch.float16" in example


# --------------------------------------------------------------------------------------------------------------
# NTI's guidance scale


def test_nti_edits_default_to_the_inversions_guidance_and_warn_at_another(pipe):
    nti = pipe.invert(
        scene_image(0),
        SOURCE,
        num_inference_steps=STEPS,
        inversion_method="nti",
        guidance_scale=3.0,
        null_text_inner_steps=1,
    )
    with mock.patch.object(npi.logger, "warning") as warning:
        default = latents(pipe, inversion=nti, prompt=TARGET)
        assert warning.call_count == 0
        assert torch.equal(default, latents(pipe, inversion=nti, prompt=TARGET, guidance_scale=3.0))
        assert warning.call_count == 0
        assert not torch.equal(default, latents(pipe, inversion=nti, prompt=TARGET, guidance_scale=7.5))
    assert warning.call_count == 1 and "optimised for guidance_scale=3;" in warning.call_args.args[0]


# --------------------------------------------------------------------------------------------------------------
# Callbacks


@pytest.mark.parametrize(
    "returns, error, message",
    [
        (lambda tensors: None, TypeError, "callback_on_step_end must return a dict"),
        (lambda tensors: [tensors["latents"]], TypeError, "callback_on_step_end must return a dict"),
        (
            lambda tensors: {"latents": tensors["latents"][:1]},
            ValueError,
            "callback_on_step_end returned latents of sh",
        ),
        (
            lambda tensors: {"latents": tensors["latents"].double()},
            ValueError,
            "callback_on_step_end returned latents",
        ),
        (lambda tensors: {"latents": "z"}, ValueError, "callback_on_step_end returned latents of type str"),
        (lambda tensors: {"latents": tensors["latents"] * torch.nan}, ValueError, "NaN or inf values at step 0"),
    ],
)
def test_callback_mistakes_are_named(pipe, inversion, returns, error, message):
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(error, match=message):
        pipe(
            inversion=inversion,
            prompt=TARGET,
            attention_control="p2p",
            callback_on_step_end=lambda pipe_, i, t, tensors: returns(tensors),
        )
    assert dict(pipe.unet.attn_processors) == before


@pytest.mark.parametrize("callback", [5, "print", {"latents": None}])
def test_a_callback_that_cannot_be_called_is_named_before_any_unet_pass(pipe, inversion, callback):
    with UNetCalls(pipe.unet) as calls, pytest.raises(TypeError, match="callback_on_step_end must be a function"):
        pipe(inversion=inversion, prompt=TARGET, attention_control="p2p", callback_on_step_end=callback)
    assert calls.batches == []


def test_a_callback_may_return_changed_latents_or_nothing(pipe, inversion):
    plain = latents(pipe, inversion=inversion, prompt=TARGET)
    assert torch.equal(
        plain, latents(pipe, inversion=inversion, prompt=TARGET, callback_on_step_end=lambda pipe_, i, t, tensors: {})
    )
    halved = latents(
        pipe,
        inversion=inversion,
        prompt=TARGET,
        callback_on_step_end=lambda pipe_, i, t, tensors: {"latents": tensors["latents"] / 2},
    )
    assert not torch.equal(plain, halved)


@pytest.mark.parametrize("second", ["same pipeline", "pipeline sharing the UNet"])
def test_a_call_from_inside_a_callback_is_refused(pipe, inversion, second):
    other = pipe if second == "same pipeline" else NegativePromptInversionPipeline.from_pipe(pipe)
    before = dict(pipe.unet.attn_processors)

    def reenter(pipe_, i, t, tensors):
        other(inversion=inversion, prompt=TARGET)
        return tensors

    with pytest.raises(RuntimeError, match="inside a running call of a pipeline that shares its UNet"):
        pipe(inversion=inversion, prompt=TARGET, attention_control=PromptToPrompt(), callback_on_step_end=reenter)
    assert dict(pipe.unet.attn_processors) == before
    assert torch.isfinite(latents(other, inversion=inversion, prompt=TARGET)).all()  # usable


def test_every_public_name_is_listed_in_the_class_docstring():
    """The public API is what the class docstring lists; a new helper is private unless it is added there."""
    public = [name for name in vars(NegativePromptInversionPipeline) if not name.startswith("_")]
    unlisted = [name for name in public if f"`{name}`" not in NegativePromptInversionPipeline.__doc__]
    assert unlisted == ["model_cpu_offload_seq"]  # diffusers' offloading order, an attribute every pipeline sets
