"""Core pipeline: the papers' identities, orderings, batching, persistence and input checking."""

import dataclasses
import json
import logging
import re

import numpy as np
import pytest
import torch
from conftest import (
    UNetCalls,
    assert_rounding_close,
    edit_ops,
    inversion_ops,
    scene_image,
    tiny_components,
)
from diffusers import PNDMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    InvalidInversionError,
    InversionResult,
    NegativePromptInversionPipeline,
    _file_digest,
    rescale_guidance,
    v_prediction_to_noise,
)


STEPS = 3  # every identity holds at any step count; the orderings below keep their margins at 3
SOURCE = "a red cat on a white background"


def mse(a, b):
    return float(((a - b) ** 2).mean())


def reconstruct(pipe, inversion, guidance_scale=7.5, **kwargs):
    return pipe(inversion=inversion, guidance_scale=guidance_scale, output_type="latent", **kwargs).images


@pytest.fixture()
def inversion(shared_inversion):
    return shared_inversion(SOURCE, STEPS)


def test_npi_reconstruction_equals_ddim_reconstruction_at_guidance_one(pipe, inversion):
    # NPI paper, Remark 3.1: with uncond = E(src) the guided step is DDIM at w = 1, whatever w is.
    npi = reconstruct(pipe, inversion, guidance_scale=7.5)
    ddim = reconstruct(pipe, dataclasses.replace(inversion, method="ddim"), guidance_scale=1.0)
    assert torch.equal(npi, ddim)  # the same single UNet row, and ε + w·0 = ε + 1·0 exactly


def test_guidance_rescale_mixes_toward_the_conditional_std():
    # Lin et al. 2024, §3.4, against its equations written out
    g = torch.Generator().manual_seed(0)
    guided, cond = 3 * torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    std = lambda x: x.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    for phi in (0.0, 0.7, 1.0):
        want = phi * guided * std(cond) / std(guided) + (1 - phi) * guided
        assert_rounding_close(rescale_guidance(guided, cond, phi), want, ops=64)  # two 256-term stds, a few products
    assert_rounding_close(std(rescale_guidance(guided, cond, 1.0)), std(cond), ops=64)
    assert torch.equal(rescale_guidance(cond, cond, 0.7), cond)  # guidance that changed nothing stays exact


def test_npi_reconstruction_is_unchanged_by_guidance_rescale(pipe, inversion):
    # NPI's source branch has ε̃ = ε_c, which rescaling leaves bit for bit; an edit it does change
    plain, rescaled = reconstruct(pipe, inversion), reconstruct(pipe, inversion, guidance_rescale=0.7)
    assert torch.equal(plain, rescaled)
    edit = dict(prompt="a blue cat on a white background", inversion=inversion, output_type="latent")
    assert not torch.equal(pipe(**edit).images, pipe(**edit, guidance_rescale=0.7).images)


def test_npi_reconstruction_costs_one_unet_pass_per_step(pipe, inversion):
    with UNetCalls(pipe.unet) as calls:
        reconstruct(pipe, inversion)
        pipe(prompt=SOURCE, inversion=inversion, output_type="latent")  # the source prompt also reconstructs
    assert calls.batches == [1] * (2 * STEPS)


def test_plain_edit_uses_source_embedding_as_negative(pipe, inversion):
    with UNetCalls(pipe.unet) as calls:
        edited = pipe(prompt="a blue cat on a white background", inversion=inversion, output_type="latent").images
    assert calls.batches == [2] * STEPS
    assert mse(edited, inversion.latents[:, 0]) > 0


def test_reconstruction_error_ordering_matches_the_papers(pipe):
    image = scene_image(0)
    npi = pipe.invert(image, SOURCE, num_inference_steps=STEPS)
    nti_kwargs = dict(num_inference_steps=STEPS, inversion_method="nti", null_text_inner_steps=5)
    nti = pipe.invert(image, SOURCE, null_text_init="null", **nti_kwargs)
    # On random weights the null embedding barely moves ε, so optimising from E("") cannot reach NPI's accuracy;
    # from E(src) (the NPI solution) the optimisation must only improve it. The trained toy model checks the rest.
    nti_from_prompt = pipe.invert(image, SOURCE, **nti_kwargs)  # the default initialisation: E(src)
    z0 = npi.latents[:, 0]
    error = {
        "ddim+cfg": mse(reconstruct(pipe, dataclasses.replace(npi, method="ddim")), z0),
        "npi": mse(reconstruct(pipe, npi), z0),
        "nti": mse(reconstruct(pipe, nti), z0),
    }
    assert error["ddim+cfg"] > 2 * error["npi"], error
    assert error["ddim+cfg"] > error["nti"], error
    track = {}
    for name, inv in (("npi", npi), ("nti", nti_from_prompt)):
        captured = []
        pipe(inversion=inv, output_type="latent", callback_on_step_end=_capture(captured))
        track[name] = [mse(z, inv.latents[:, STEPS - i - 1]) for i, z in enumerate(captured)]
    assert sum(track["nti"]) <= sum(track["npi"]), track


def _capture(store):
    def callback(pipe, i, t, tensors):
        store.append(tensors["latents"].clone())
        return tensors

    return callback


def test_nti_without_inner_steps_is_ddim_with_cfg(pipe):
    nti = pipe.invert(
        scene_image(1),
        SOURCE,
        num_inference_steps=STEPS,
        inversion_method="nti",
        null_text_inner_steps=0,
        null_text_init="null",
    )
    ddim = dataclasses.replace(nti, method="ddim", null_embeds=None, null_text_losses=None)
    # E("") may come from a text-encoder batch of another size, hence rounding
    assert_rounding_close(reconstruct(pipe, nti), reconstruct(pipe, ddim), ops=edit_ops(STEPS))


def test_nti_loss_decreases_within_a_step(pipe):
    nti = pipe.invert(
        scene_image(2),
        SOURCE,
        num_inference_steps=STEPS,
        inversion_method="nti",
        null_text_inner_steps=5,
        null_text_early_stop=0.0,
    )
    losses = nti.null_text_losses[0, 0]
    assert torch.isfinite(losses).all() and losses[-1] < losses[0]
    assert nti.null_embeds.dtype == torch.float32


def test_nti_keeps_unet_frozen_and_restores_grad_flags(pipe):
    pipe.unet.conv_in.weight.requires_grad_(True)
    pipe.invert(scene_image(0), SOURCE, num_inference_steps=3, inversion_method="nti", null_text_inner_steps=2)
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert pipe.unet.conv_in.weight.requires_grad


def test_nti_optimises_in_float32_under_bfloat16(tokenizer_dir):
    pipe = NegativePromptInversionPipeline(**tiny_components(tokenizer_dir)).to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    nti = pipe.invert(scene_image(0), SOURCE, num_inference_steps=2, inversion_method="nti", null_text_inner_steps=2)
    assert nti.null_embeds.dtype == torch.float32
    out = pipe(prompt="a blue cat on a white background", inversion=nti, output_type="np").images
    assert np.isfinite(out).all()


def test_batched_inversion_and_edits_equal_single_ones(pipe):
    images, prompts = [scene_image(3), scene_image(4)], [SOURCE, "a blue dog on a black background"]
    batched = pipe.invert(images, prompts, num_inference_steps=STEPS)
    for k in range(2):
        single = pipe.invert(images[k], prompts[k], num_inference_steps=STEPS)
        assert_rounding_close(batched.latents[k : k + 1], single.latents, ops=inversion_ops(STEPS))
    targets = ["a blue cat on a white background", "a red dog on a white background", SOURCE]
    inv = batched[0]
    together = pipe(prompt=targets, inversion=inv, output_type="latent").images
    for k, target in enumerate(targets):
        alone = pipe(prompt=target, inversion=inv, output_type="latent").images
        assert_rounding_close(together[k : k + 1], alone, ops=edit_ops(STEPS))


def test_nti_batch_equals_single(pipe):
    # Adam's first steps are nearly sign steps, so float32 batch-size noise in a near-zero gradient would show
    # as a full step; in float64 that noise is negligible and the per-image optimisation must agree.
    pipe.to(torch.float64)
    images = [scene_image(5), scene_image(6)]
    kwargs = dict(
        num_inference_steps=2, inversion_method="nti", null_text_inner_steps=3
    )  # step 2 starts from step 1's
    batched = pipe.invert(images, [SOURCE, SOURCE], **kwargs)
    single = pipe.invert(images[1], SOURCE, **kwargs)
    # float32 copies of float64 optimisations: one rounding per Adam update (a flipped sign step is lr = 1e-2)
    assert_rounding_close(batched.null_embeds[1:], single.null_embeds, ops=2 * 3)


def test_save_load_edit_is_bit_identical(pipe, inversion, tmp_path):
    path = tmp_path / "inversion.safetensors"
    inversion.save(path)
    loaded = pipe.load_inversion(path)
    target = "a blue cat on a white background"
    first = pipe(prompt=target, inversion=inversion, output_type="latent").images
    second = pipe(prompt=target, inversion=loaded, output_type="latent").images
    assert torch.equal(first, second)


def test_nti_inversion_round_trips(pipe, tmp_path):
    nti = pipe.invert(scene_image(0), SOURCE, num_inference_steps=3, inversion_method="nti", null_text_inner_steps=1)
    nti.save(tmp_path / "nti.safetensors")
    loaded = InversionResult.load(tmp_path / "nti.safetensors")
    assert torch.equal(loaded.null_embeds, nti.null_embeds) and loaded.method == "nti"


def test_tampered_files_are_rejected(inversion, tmp_path):
    path = tmp_path / "inversion.safetensors"
    inversion.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a tensor byte
    tampered = tmp_path / "tensor.safetensors"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="modified"):
        InversionResult.load(tampered)
    text = path.read_bytes().replace(b"a red cat", b"a red dog")  # metadata edited
    (tmp_path / "meta.safetensors").write_bytes(text)
    with pytest.raises(ValueError, match="modified"):
        InversionResult.load(tmp_path / "meta.safetensors")
    torch.save({"latents": inversion.latents}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="not an inversion file"):
        InversionResult.load(tmp_path / "pickle.pt")


def test_mismatched_model_or_steps_are_rejected(pipe, inversion, tokenizer_dir, tmp_path):
    other = NegativePromptInversionPipeline(**tiny_components(tokenizer_dir, seed=1))
    inversion.save(tmp_path / "inversion.safetensors")
    with pytest.raises(ValueError, match="different models"):
        other.load_inversion(tmp_path / "inversion.safetensors")
    with pytest.raises(ValueError, match="different models"):
        other(inversion=inversion)
    with pytest.raises(ValueError, match=f"num_inference_steps=20 but the inversion was made with {STEPS}"):
        pipe(inversion=inversion, num_inference_steps=20)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe.load_inversion(tmp_path / "inversion.safetensors", num_inference_steps=5)


def test_signature_tolerates_bfloat16_rounding_only(pipe, inversion):
    """A weight cast to bfloat16 moves by at most eps/2 of its size: the same model. Scaled by 1 + 3 eps: another."""
    weight = next(pipe.unet.parameters())
    with torch.no_grad():
        weight.copy_(weight.to(torch.bfloat16).float())
    pipe.check_inversion(inversion)
    with torch.no_grad():
        weight.mul_(1 + 3 * torch.finfo(torch.bfloat16).eps)
    with pytest.raises(ValueError, match="different models"):
        pipe.check_inversion(inversion)


def rewrite(path, edit):
    """Apply ``edit(metadata, tensors)`` to a saved inversion and store a matching checksum again, so that the
    validation, not the checksum, has to find the problem."""
    with safe_open(path, framework="pt") as handle:
        metadata = json.loads(handle.metadata()["inversion"])
    tensors = load_file(path)
    metadata.pop("sha256")
    edit(metadata, tensors)
    metadata["sha256"] = _file_digest(metadata, tensors)
    save_file(tensors, path, metadata={"inversion": json.dumps(metadata)})


def _set(container, key, value):
    container[key] = value


BROKEN_FILES = {  # case: (edit(metadata, tensors), what the error must name)
    "image-size-three-numbers": (lambda m, t: _set(m, "image_size", [1, 2, 3]), "image_size"),
    "image-size-not-latent-size-times-factor": (lambda m, t: _set(m, "image_size", [32, 48]), "image_size"),
    "reversed-timesteps": (lambda m, t: _set(t, "timesteps", t["timesteps"].flip(0)), "descending"),
    "float-timesteps": (lambda m, t: _set(t, "timesteps", t["timesteps"].float()), "timesteps of dtype"),
    "int64-latents": (lambda m, t: _set(t, "latents", t["latents"].long()), "latents of dtype"),
    "extra-tensor": (lambda m, t: _set(t, "extra", torch.zeros(1)), "unknown entries: extra"),
    "missing-metadata-key": (lambda m, t: m.pop("method"), "missing entries: method"),
    "missing-tensor": (lambda m, t: t.pop("prompt_embeds"), "missing entries: prompt_embeds"),
    "null-embeds-without-nti": (lambda m, t: _set(t, "null_embeds", torch.zeros(1, STEPS, 77, 32)), "null_embeds"),
    "prompts-not-strings": (lambda m, t: _set(m, "source_prompts", [1]), "source_prompts"),
    "prompts-of-other-batch": (lambda m, t: _set(m, "source_prompts", [SOURCE, SOURCE]), "latents of shape"),
    "guidance-not-finite": (lambda m, t: _set(m, "guidance_scale", float("nan")), "guidance_scale"),
}


@pytest.mark.parametrize("case", BROKEN_FILES)
def test_loaded_files_are_validated_beyond_the_checksum(pipe, inversion, tmp_path, case):
    edit, problem = BROKEN_FILES[case]
    path = tmp_path / "inversion.safetensors"
    inversion.save(path)
    rewrite(path, edit)
    for load in (InversionResult.load, pipe.load_inversion):
        with pytest.raises(InvalidInversionError, match=problem) as error:
            load(path)
        assert str(path) in str(error.value)


def test_unreadable_or_missing_files_are_named(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        InversionResult.load(missing)
    for name, data in (("text.safetensors", b"not a tensor file"), ("empty.safetensors", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidInversionError, match=re.escape(str(tmp_path / name)) + ".*not an inversion file"):
            InversionResult.load(tmp_path / name)


def test_objects_passed_to_the_pipeline_are_validated_too(pipe, inversion):
    broken = {
        "descending": dataclasses.replace(inversion, timesteps=inversion.timesteps.flip(0)),
        "image_size": dataclasses.replace(inversion, image_size=(64, 64)),  # 16 latents × 4: not this VAE's factor 2
        "source_prompts": dataclasses.replace(inversion, source_prompts="a red cat"),
    }
    for problem, bad in broken.items():
        with pytest.raises(InvalidInversionError, match=rf"^inversion: .*{problem}"):
            pipe(inversion=bad)


def test_save_into_a_missing_folder_names_it(inversion, tmp_path):
    folder = tmp_path / "not-created"
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        inversion.save(folder / "inversion.safetensors")
    assert not folder.exists()


def test_v_prediction_conversion_is_exact():
    torch.manual_seed(0)
    x0, noise, alpha = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor(0.3)
    latents = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    v = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    torch.testing.assert_close(v_prediction_to_noise(v, latents, alpha), noise)


def test_v_prediction_model_identity_holds(tokenizer_dir):
    pipe = NegativePromptInversionPipeline(
        **tiny_components(tokenizer_dir, prediction_type="v_prediction"), inversion_method="npi"
    )
    pipe.set_progress_bar_config(disable=True)
    inv = pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    npi = reconstruct(pipe, inv)
    ddim = reconstruct(pipe, dataclasses.replace(inv, method="ddim"), guidance_scale=1.0)
    assert torch.equal(npi, ddim)  # the same single UNet row, and ε + w·0 = ε + 1·0 exactly
    assert mse(npi, inv.latents[:, 0]) < 0.1 * float(inv.latents[:, 0].pow(2).mean())


def test_non_ddim_scheduler_runs_ddim_with_a_warning(components, inversion, caplog):
    pndm = PNDMScheduler.from_config(components["scheduler"].config)
    with caplog.at_level(logging.WARNING):
        pipe = NegativePromptInversionPipeline(**{**components, "scheduler": pndm})
    assert "not deterministic DDIM" in caplog.text
    pipe.set_progress_bar_config(disable=True)
    reference = NegativePromptInversionPipeline(**components)
    reference.set_progress_bar_config(disable=True)
    torch.testing.assert_close(reconstruct(pipe, inversion), reconstruct(reference, inversion))


def test_resize_policy(pipe):
    wide = scene_image(0, size=64)[:40]  # 40×64, not square
    inv = pipe.invert(wide, SOURCE, num_inference_steps=2)
    assert inv.image_size == (32, 32) and inv.latents.shape[-2:] == (16, 16)  # native size, centre crop
    inv = pipe.invert(wide, SOURCE, num_inference_steps=2, height=24, width=40)
    assert inv.image_size == (24, 40)
    same = [scene_image(0), torch.from_numpy(scene_image(0)).permute(2, 0, 1) / 255.0]
    both = pipe.invert(same, [SOURCE, SOURCE], num_inference_steps=2)
    torch.testing.assert_close(both.latents[0], both.latents[1])  # PIL/numpy/tensor inputs agree
    with pytest.raises(ValueError, match="height must be a positive multiple of 2"):
        pipe.invert(wide, SOURCE, height=25)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p, im: p.invert(im, []), "source_prompt must be a string or a non-empty list"),
        (lambda p, im: p.invert([im, im], [SOURCE]), r"1 prompt\(s\) for 2 image\(s\)"),
        (lambda p, im: p.invert("not an image", SOURCE), "image must be a PIL image"),
        (lambda p, im: p.invert(im, SOURCE, num_inference_steps=0), "num_inference_steps must be a positive integer"),
        (lambda p, im: p.invert(im, SOURCE, num_inference_steps=-3), "num_inference_steps must be a positive integer"),
        (
            lambda p, im: p.invert(im, SOURCE, inversion_method="nti", guidance_scale=0.5),
            "guidance_scale must be >= 1",
        ),
        (lambda p, im: p.invert(im, SOURCE, inversion_method="magic"), "inversion_method must be one of"),
        (lambda p, im: p.invert(im * 3.0, SOURCE), r"values must lie in \[0, 1\]"),
    ],
)
def test_bad_invert_input_is_rejected_before_work(pipe, call, message):
    image = scene_image(0).astype(np.float32) / 255
    with UNetCalls(pipe.unet) as calls, pytest.raises((ValueError, TypeError), match=message):
        call(pipe, image)
    assert calls.batches == []


def test_bad_call_input_is_rejected_before_work(pipe, inversion):
    nti = dataclasses.replace(inversion, method="nti", null_embeds=torch.zeros(1, STEPS, 77, 32))
    cases = [
        (dict(prompt=[]), "prompt must be a string or a non-empty list"),
        (dict(prompt=[["a"], ["b"]]), "target lists for 2 images"),
        (dict(inversion=nti, guidance_scale=0.5), "guidance_scale must be >= 1"),
        (dict(inversion=None), "inversion must be an InversionResult"),
        (dict(output_type="jpeg"), "output_type must be one of"),
    ]
    for kwargs, message in cases:
        kwargs = {"inversion": inversion, **kwargs}
        with UNetCalls(pipe.unet) as calls, pytest.raises((ValueError, TypeError), match=message):
            pipe(**kwargs)
        assert calls.batches == []
    two = pipe.invert([scene_image(0), scene_image(1)], [SOURCE, SOURCE], num_inference_steps=2)
    with pytest.raises(ValueError, match="3 prompts for 2 inverted images"):
        pipe(prompt=["a", "b", "c"], inversion=two)


def test_constructor_flags_are_validated(components):
    with pytest.raises(ValueError, match="inversion_method must be one of"):
        NegativePromptInversionPipeline(**components, inversion_method="fast")
    with pytest.raises(ValueError, match="proximal_guidance must be one of"):
        NegativePromptInversionPipeline(**components, proximal_guidance="l0")
