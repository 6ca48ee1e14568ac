"""Input policies: bad input fails early and clearly, odd input is converted faithfully, threads are serialised,
and common component swaps (tiny VAE, LoRA) work. Every error must come before the first UNet or VAE pass."""

import copy
import logging
import math
import subprocess
import sys
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, scene_image
from diffusers import AutoencoderTiny
from diffusers.utils import logging as diffusers_logging

from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    LocalBlend,
    MasaCtrl,
    NegativePromptInversionPipeline,
    PromptToPrompt,
    ProximalGuidance,
)


SOURCE = "a red circle on a white background"
TARGET = "a blue circle on a white background"
STEPS = 3


@pytest.fixture()
def inversion(shared_inversion):
    return shared_inversion(SOURCE, STEPS)


@pytest.fixture()
def warnings_of(caplog):
    """Warnings logged by the pipeline module (diffusers loggers don't propagate to the root logger by default)."""
    diffusers_logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    yield lambda: [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    diffusers_logging.disable_propagation()


class ModelCalls:
    """Counts UNet forwards and VAE encoder / decoder forwards."""

    def __init__(self, pipe):
        self.calls = []
        self.handles = [
            module.register_forward_pre_hook(lambda *_, name=name: self.calls.append(name))
            for name, module in (
                ("unet", pipe.unet),
                ("vae encoder", pipe.vae.encoder),
                ("vae decoder", pipe.vae.decoder),
            )
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def long_prompt(words_before: int, last: str) -> str:
    return " ".join(["a"] * words_before + [last, "on", "a", "white", "background"])


# -------------------------------------------------------------------------------------------------------------------
# Errors before any model pass


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p, im: p.invert(torch.where(torch.arange(32) == 5, torch.nan, im), SOURCE), "NaN or infinite"),
        (lambda p, im: p.invert(im[:, :0, :0], SOURCE), "no pixels"),
        (lambda p, im: p.invert(im, SOURCE, num_inference_steps=1001), "at most the scheduler's 1000"),
        (lambda p, im: p.invert(im, SOURCE, null_text_early_stop="x"), "null_text_early_stop must be a number"),
        (lambda p, im: p.invert(im, SOURCE, null_text_inner_steps=2.5), "null_text_inner_steps must be an integer"),
        (lambda p, im: p.invert(im, SOURCE, guidance_scale=1e30), r"guidance_scale must lie in \[0, 100"),
        (lambda p, im: p.invert(im, SOURCE, guidance_scale=math.nan), "guidance_scale must lie in"),
    ],
)
def test_bad_invert_input_fails_before_any_model_pass(pipe, call, message):
    image = torch.from_numpy(scene_image(0)).permute(2, 0, 1) / 255.0
    with ModelCalls(pipe) as seen, pytest.raises(ValueError, match=message):
        call(pipe, image)
    assert seen.calls == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(guidance_scale=1e30), "guidance_scale must lie in"),
        (dict(guidance_rescale=1.5), r"guidance_rescale must lie in \[0, 1\]"),
        (
            dict(attention_control=PromptToPrompt(cross_replace_steps="abc")),
            r"cross_replace_steps must lie in \[0, 1\]",
        ),
        (dict(attention_control=PromptToPrompt(cross_replace_steps=(0.1, "x"))), r"cross_replace_steps must lie in"),
        (
            dict(attention_control=PromptToPrompt(cross_replace_steps={"blue": "x"})),
            r"cross_replace_steps must lie in",
        ),
        (dict(attention_control=PromptToPrompt(self_replace_steps=True)), r"self_replace_steps must lie in \[0, 1\]"),
        (dict(attention_control=PromptToPrompt(reweight={"blue": math.nan})), "reweight factor of 'blue' must lie in"),
        (dict(proximal_guidance=ProximalGuidance(step_size=math.nan)), r"step_size must lie in \[0, 1\]"),
        (dict(proximal_guidance=ProximalGuidance(below_timestep="late")), "below_timestep must be"),
        (
            dict(attention_control=PromptToPrompt(local_blend=LocalBlend(("circle", "circle"), threshold="high"))),
            r"threshold must lie in \[0, 1\]",
        ),
        (dict(proximal_guidance=ProximalGuidance(mask_dilation=1.5)), "mask_dilation must be an integer"),
        (dict(attention_control=MasaCtrl(start_step=math.nan)), "start_step must be an integer"),
        (dict(attention_control=object()), "attention_control must be one of"),
        (dict(proximal_guidance=True), "proximal_guidance must be one of"),
    ],
)
def test_bad_call_input_fails_before_any_model_pass(pipe, inversion, kwargs, message):
    with ModelCalls(pipe) as seen, pytest.raises((ValueError, TypeError), match=message):
        pipe(prompt=TARGET, inversion=inversion, **kwargs)
    assert seen.calls == []


def test_scheduler_is_required(components):
    with pytest.raises(ValueError, match="scheduler is required"):
        NegativePromptInversionPipeline(**{**components, "scheduler": None})


def test_an_overflowing_model_raises_instead_of_returning_nan(pipe, inversion):
    handle = pipe.unet.register_forward_hook(lambda module, args, output: (output[0] * math.inf,))
    try:
        with pytest.raises(FloatingPointError, match="denoised latents contain NaN or inf"):
            pipe(prompt=TARGET, inversion=inversion)
    finally:
        handle.remove()


# -------------------------------------------------------------------------------------------------------------------
# Prompts longer than the text encoder reads


def test_truncated_words_are_named_in_a_warning(pipe, warnings_of):
    prompt = long_prompt(80, "cat")
    pipe.invert(scene_image(0), prompt, num_inference_steps=1)
    assert any("these words are ignored" in message and "cat" in message for message in warnings_of())


def test_an_edit_that_only_changes_truncated_words_is_refused(pipe):
    source, target = long_prompt(80, "cat"), long_prompt(80, "dog")
    inversion = pipe.invert(scene_image(0), source, num_inference_steps=1)
    with ModelCalls(pipe) as seen, pytest.raises(ValueError, match="differs from its source prompt only past"):
        pipe(prompt=target, inversion=inversion)
    assert seen.calls == []


@pytest.mark.parametrize("argument", ["blend_words", "reweight"])
def test_an_edited_word_past_the_token_limit_is_refused(pipe, argument):
    source = " ".join(["red"] + ["a"] * 80 + ["cat"])
    target = " ".join(["blue"] + ["a"] * 80 + ["cat"])
    inversion = pipe.invert(scene_image(0), source, num_inference_steps=1)
    p2p = (
        PromptToPrompt(local_blend=LocalBlend(("cat", "cat")))
        if argument == "blend_words"
        else PromptToPrompt(reweight={"cat": 2.0})
    )
    with ModelCalls(pipe) as seen, pytest.raises(ValueError, match="'cat' lies past the text encoder's 77 tokens"):
        pipe(prompt=target, inversion=inversion, attention_control=p2p)
    assert seen.calls == []


# -------------------------------------------------------------------------------------------------------------------
# Image formats


def test_16_bit_images_keep_their_values(pipe):
    grey = np.full((32, 32), 30000, dtype=np.uint16)
    for image in (PIL.Image.fromarray(grey), PIL.Image.fromarray(grey.astype(np.int32), mode="I"), grey):
        pixels = pipe._prepare_images(image, 32, 32, "crop")
        torch.testing.assert_close(pixels, torch.full_like(pixels, 2 * 30000 / 65535 - 1))


def test_transparent_pixels_are_composited_over_white_with_a_warning(pipe, warnings_of):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)  # black everywhere; the left half opaque, the right transparent
    rgba[:, :16, 3] = 255
    for image in (PIL.Image.fromarray(rgba, mode="RGBA"), torch.from_numpy(rgba).permute(2, 0, 1) / 255.0):
        pixels = (pipe._prepare_images(image, 32, 32, "crop") + 1) / 2
        assert (pixels[..., :16] == 0).all() and (pixels[..., 16:] == 1).all()
    assert sum("transparent pixels" in message for message in warnings_of()) == 2
    opaque = rgba.copy()
    opaque[..., 3] = 255
    pipe._prepare_images(PIL.Image.fromarray(opaque, mode="RGBA"), 32, 32, "crop")
    assert sum("transparent pixels" in message for message in warnings_of()) == 2  # fully opaque: nothing to say


def test_unsupported_integer_arrays_are_refused(pipe):
    with pytest.raises(ValueError, match="image arrays must be uint8, uint16"):
        pipe._prepare_images(scene_image(0).astype(np.int64), 32, 32, "crop")


def test_one_image_takes_its_blend_words_in_either_form(pipe, inversion):
    """``(source_words, target_words)`` and a list of one such pair per image (what a batch tool writes) agree."""
    edits = [
        pipe(
            prompt="a red square on a white background",
            inversion=inversion,
            output_type="latent",
            attention_control=PromptToPrompt(local_blend=LocalBlend(words)),
        ).images
        for words in (("circle", "square"), [("circle", "square")])
    ]
    assert torch.equal(*edits)


# -------------------------------------------------------------------------------------------------------------------
# Threads


@pytest.mark.parametrize("second", ["same pipeline", "pipeline sharing the UNet"])
def test_concurrent_calls_are_serialised_and_equal_serial_calls(pipe, inversion, second):
    """A and B pause in their first step, each until the other is inside too (or a timeout). Unserialised, each
    would denoise under the other's attention processors, and B would finally restore A's processors for good."""
    pipe_b = pipe if second == "same pipeline" else NegativePromptInversionPipeline.from_pipe(pipe)
    assert pipe_b.unet is pipe.unet
    p2p = dict(prompt=TARGET, inversion=inversion, output_type="pt", attention_control=PromptToPrompt(1.0, 1.0))
    masactrl = dict(prompt=TARGET, inversion=inversion, output_type="pt", attention_control=MasaCtrl(start_step=0))
    expected = {"a": pipe(**p2p).images, "b": pipe_b(**masactrl).images}
    assert not torch.equal(expected["a"], expected["b"])
    processors = dict(pipe.unet.attn_processors)
    inside = {"a": threading.Event(), "b": threading.Event()}

    def meet(me, other):
        def callback(pipeline, step, timestep, tensors):
            if step == 0:
                inside[me].set()
                inside[other].wait(timeout=1.0)  # serialised, the other never gets in while we are here
            return tensors

        return callback

    results = {}
    thread_a = threading.Thread(
        target=lambda: results.update(a=pipe(**p2p, callback_on_step_end=meet("a", "b")).images)
    )
    thread_b = threading.Thread(
        target=lambda: (
            inside["a"].wait(),
            results.update(b=pipe_b(**masactrl, callback_on_step_end=meet("b", "a")).images),
        )
    )
    thread_a.start(), thread_b.start()
    thread_a.join(), thread_b.join()
    torch.testing.assert_close(results["a"], expected["a"], rtol=0, atol=0)
    torch.testing.assert_close(results["b"], expected["b"], rtol=0, atol=0)
    assert dict(pipe.unet.attn_processors) == processors


# -------------------------------------------------------------------------------------------------------------------
# Component swaps and loading


def test_tiny_autoencoder_inverts_and_edits(pipe):
    pipe.vae = AutoencoderTiny(
        encoder_block_out_channels=(32, 32),
        decoder_block_out_channels=(32, 32),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).eval()
    image = pipe._prepare_images(scene_image(0), 32, 32, "crop")
    inversion = pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    expected = pipe.vae.encode(image).latents * pipe.vae.config.scaling_factor
    torch.testing.assert_close(inversion.latents[:, 0], expected, rtol=0, atol=0)
    edited = pipe(prompt=TARGET, inversion=inversion, attention_control="p2p", output_type="np").images
    assert edited.shape == (1, 32, 32, 3) and np.isfinite(edited).all()


def test_lora_weights_load_and_change_the_unet(pipe, inversion, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    before = pipe(prompt=TARGET, inversion=inversion, output_type="pt").images
    torch.manual_seed(0)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    NegativePromptInversionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))

    pipe.load_lora_weights(tmp_path, adapter_name="toy")
    with pytest.raises(ValueError, match=r"different models than this pipeline's: unet \(weights\)"):
        pipe(prompt=TARGET, inversion=inversion)  # the adapter changed what the UNet computes: invert again
    inversion = pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    after = pipe(prompt=TARGET, inversion=inversion, output_type="pt").images
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_loading_the_file_names_no_missing_package(tmp_path):
    """diffusers scans a custom pipeline's absolute imports and asks to ``pip install`` any it cannot import, so
    scan it from a folder where the project is not importable, as a user's notebook would."""
    script = "from diffusers.utils.dynamic_modules_utils import check_imports; import sys; check_imports(sys.argv[1])"
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "pipeline_negative_prompt_inversion.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "might require" not in result.stderr + result.stdout
