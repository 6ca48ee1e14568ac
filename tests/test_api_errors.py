"""Errors of the Python API that name the real cause (issue 30) and its loose ends (issue 27): inputs that cannot give
finite results are refused up front naming the argument, file-system errors name the path, the model signature
sees every weight tensor, and each misuse gets one clear error before any UNet pass."""

import base64
import copy
import dataclasses
import errno
import json
import math
import os
import re
import stat
import threading

import numpy as np
import pytest
import torch
from conftest import StoredElsewhere, UNetCalls, scene_image, tiny_components
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    MAX_REWEIGHT,
    SIGNATURE_SAMPLES,
    InvalidInversionError,
    InversionResult,
    LocalBlend,
    NegativePromptInversionPipeline,
    PromptToPrompt,
    ProximalGuidance,
    _ensure_finite,
    _file_digest,
    _weight_samples,
    _weights_match,
)
from toy_world.tokenizer import write_word_tokenizer


SOURCE = "a red cat on a white background"
TARGET = "a blue cat on a white background"
STEPS = 3
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # permissions do not stop root


@pytest.fixture(scope="module")
def inversion(components):
    """One inversion for the module (tests never change it in place), made by a copy of the components that every
    test's ``pipe`` copies too."""
    pipe = NegativePromptInversionPipeline(**copy.deepcopy(components), inversion_method="npi")
    pipe.set_progress_bar_config(disable=True)
    return pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)


def rewrite(path, edit):
    """Apply ``edit(metadata, tensors)`` to a saved inversion and store a matching checksum again, so that the
    validation, not the checksum, has to find the problem."""
    tensors = load_file(path)
    metadata = json.loads(_read_metadata(path)["inversion"])
    metadata.pop("sha256")
    edit(metadata, tensors)
    metadata["sha256"] = _file_digest(metadata, tensors)
    save_file(tensors, path, metadata={"inversion": json.dumps(metadata)})


def _read_metadata(path) -> dict:
    data = open(path, "rb").read()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]


def refused_before_any_unet_pass(pipe, call, error, match):
    """``call()`` raises ``error`` matching ``match`` and the UNet never ran."""
    with UNetCalls(pipe.unet) as calls, pytest.raises(error, match=match) as raised:
        call()
    assert calls.batches == []
    return raised.value


# -------------------------------------------------------------------------------------------------------------------
# Inputs that cannot give finite results


def one_nan(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[5] = math.nan
    return tensor


NON_FINITE = {
    "latents-nan": ("latents", one_nan, "latents contain NaN or inf"),
    "latents-inf": ("latents", lambda t: t.mul(math.inf), "latents contain NaN or inf"),
    "latents-1e30": ("latents", lambda t: t.mul(1e30), "latents reach .*beyond the 10000"),
    "prompt-embeds-nan": ("prompt_embeds", one_nan, "prompt_embeds contain NaN or inf"),
    "prompt-embeds-1e30": ("prompt_embeds", lambda t: t.add(1e30), "prompt_embeds reach"),
}


@pytest.mark.parametrize("case", NON_FINITE)
def test_non_finite_inversions_are_named_before_any_unet_pass(pipe, inversion, tmp_path, case):
    name, change, message = NON_FINITE[case]
    bad = dataclasses.replace(inversion, **{name: change(getattr(inversion, name).clone())})
    refused_before_any_unet_pass(
        pipe, lambda: pipe(prompt=TARGET, inversion=bad), InvalidInversionError, f"^inversion: .*{message}"
    )
    path = tmp_path / "inversion.safetensors"
    with pytest.raises(InvalidInversionError, match=message):
        bad.save(path)  # never writes a file that load refuses
    assert not path.exists()
    inversion.save(path)
    rewrite(path, lambda metadata, tensors: tensors.update({name: change(tensors[name])}))
    for load in (InversionResult.load, pipe.load_inversion):
        refused_before_any_unet_pass(
            pipe, lambda: load(path), InvalidInversionError, re.escape(str(path)) + f".*{message}"
        )


def test_nti_null_embeddings_must_be_finite_and_nti_losses_may_be_nan(pipe):
    nti = pipe.invert(scene_image(0), SOURCE, num_inference_steps=2, inversion_method="nti", null_text_inner_steps=1)
    early_stopped = dataclasses.replace(nti, null_text_losses=torch.full_like(nti.null_text_losses, math.nan))
    pipe.check_inversion(early_stopped)  # NaN losses mark early-stopped steps
    bad = dataclasses.replace(nti, null_embeds=nti.null_embeds.mul(math.inf))
    refused_before_any_unet_pass(
        pipe, lambda: pipe(prompt=TARGET, inversion=bad), InvalidInversionError, "null_embeds contain NaN or inf"
    )


def test_an_absurd_guidance_scale_in_a_file_is_named(pipe, inversion, tmp_path):
    path = tmp_path / "inversion.safetensors"
    inversion.save(path)
    rewrite(path, lambda metadata, tensors: metadata.update(guidance_scale=1e30))
    with pytest.raises(InvalidInversionError, match=re.escape(str(path)) + r".*guidance_scale must lie in \[0, 100"):
        InversionResult.load(path)


@pytest.mark.parametrize(
    "factor", [1e30, math.nan, math.inf, -math.inf, MAX_REWEIGHT * 1.01, -MAX_REWEIGHT * 1.01, True]
)
def test_absurd_reweights_are_refused_before_any_unet_pass(pipe, inversion, factor):
    p2p = PromptToPrompt(reweight={"blue": factor})
    refused_before_any_unet_pass(
        pipe,
        lambda: pipe(prompt=TARGET, inversion=inversion, attention_control=p2p),
        ValueError,
        r"PromptToPrompt.reweight factor of 'blue' must lie in \[-10.0, 10.0\]",
    )


@pytest.mark.parametrize("reweight", ["blue", [{"blue": 2.0}, 3], {1: 2.0}, {" ": 2.0}, []])
def test_malformed_reweights_name_the_argument(pipe, inversion, reweight):
    p2p = PromptToPrompt(reweight=reweight)
    refused_before_any_unet_pass(
        pipe,
        lambda: pipe(prompt=TARGET, inversion=inversion, attention_control=p2p),
        ValueError,
        "PromptToPrompt.reweight",
    )


def test_reweights_in_the_documented_range_are_accepted(pipe, inversion):
    layers = pipe._attention_layers(tuple(inversion.latents.shape[-2:]))
    for factor in (-MAX_REWEIGHT, -2, 0, 0.5, 5, MAX_REWEIGHT):  # the paper's [-2, 2], the references' 5
        PromptToPrompt(reweight={"blue": factor}).check(STEPS, layers)
    PromptToPrompt(reweight=[{"blue": 2}, {}]).check(STEPS, layers)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(step_size=1e6), r"ProximalGuidance.step_size must lie in \[0, 1\]"),
        (dict(step_size=1.5), r"ProximalGuidance.step_size must lie in \[0, 1\]"),  # overshoots the anchor
        (dict(step_size=-0.1), r"ProximalGuidance.step_size must lie in \[0, 1\]"),
        (dict(step_size=10**400), r"ProximalGuidance.step_size must lie in \[0, 1\]"),  # too large for a float
        (dict(below_timestep=-1), r"ProximalGuidance.below_timestep must be a number >= 0"),
        (dict(inversion_guidance="no"), "ProximalGuidance.inversion_guidance must be True or False"),
        (dict(reconstruction_guidance=1), "ProximalGuidance.reconstruction_guidance must be True or False"),
    ],
)
def test_absurd_proximal_settings_are_refused_before_any_unet_pass(pipe, inversion, settings, message):
    prox = ProximalGuidance(**settings)
    refused_before_any_unet_pass(
        pipe, lambda: pipe(prompt=TARGET, inversion=inversion, proximal_guidance=prox), ValueError, message
    )


def test_a_mask_dilation_beyond_the_latent_is_the_whole_latent():
    """A radius of the latent's side already spreads an edit everywhere: a huge one costs nothing more."""
    torch.manual_seed(0)
    direction, noise_cond = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    direction[1] = 0  # nothing edited: stays empty under any dilation
    whole = ProximalGuidance(mask_dilation=15).guide(direction, noise_cond)
    huge = ProximalGuidance(mask_dilation=10**9).guide(direction, noise_cond)
    assert torch.equal(whole[1], huge[1]) and torch.equal(whole[0], huge[0])
    assert bool((huge[1][0] == 1).all()) and bool((huge[1][1] == 0).all())


# -------------------------------------------------------------------------------------------------------------------
# NaN at the end: for true overflows only, naming the dtype


def test_non_finite_weights_are_named_instead_of_an_overflow(pipe):
    with torch.no_grad():
        pipe.unet.conv_out.bias[0] = math.nan
    with pytest.raises(FloatingPointError, match="inversion latents .*conv_out.bias holds NaN or inf") as raised:
        pipe.invert(scene_image(0), SOURCE, num_inference_steps=1)
    assert "overflow" not in str(raised.value)


def test_a_float32_model_is_never_told_to_run_in_float32(pipe, inversion):
    handle = pipe.unet.register_forward_hook(lambda module, args, output: (output[0] * math.inf,))
    try:
        with pytest.raises(
            FloatingPointError, match=r"denoised latents contain NaN or inf: .*runs in torch.float32"
        ) as raised:
            pipe(prompt=TARGET, inversion=inversion, output_type="latent")
    finally:
        handle.remove()
    assert "overflowed" not in str(raised.value) and "Run it in float32" not in str(raised.value)


def test_a_float16_overflow_is_called_one():
    model = torch.nn.Linear(2, 2).half()
    with pytest.raises(FloatingPointError, match="overflowed float16 .* run it in bfloat16 or float32"):
        _ensure_finite(torch.tensor([math.inf]), "The decoded images", model)
    finite = torch.ones(3)
    assert _ensure_finite(finite, "x", model) is finite


# -------------------------------------------------------------------------------------------------------------------
# File-system errors name the path; files are written atomically with the umask's permissions


def test_save_onto_a_folder_a_missing_folder_or_a_nul_byte_names_the_path(inversion, tmp_path):
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path)) + ".*is a folder"):
        inversion.save(tmp_path)
    missing = tmp_path / "not-created" / "inversion.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*no folder"):
        inversion.save(missing)
    with pytest.raises(ValueError, match=r"inv\\x00.*NUL byte"):
        inversion.save(str(tmp_path / "inv\0.safetensors"))
    with pytest.raises(TypeError, match="a path must be a str or os.PathLike"):
        inversion.save(3)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(AS_ROOT, reason="permissions do not stop root")
def test_save_into_a_read_only_folder_or_onto_a_read_only_file_names_the_path(inversion, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    (tmp_path / "kept.safetensors").write_bytes(b"old")
    (tmp_path / "kept.safetensors").chmod(0o444)
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=re.escape(str(folder / "inv.safetensors"))):
            inversion.save(folder / "inv.safetensors")
        with pytest.raises(PermissionError, match=re.escape(str(tmp_path / "kept.safetensors")) + ".*read-only"):
            inversion.save(tmp_path / "kept.safetensors")
    finally:
        folder.chmod(0o755)
    assert (tmp_path / "kept.safetensors").read_bytes() == b"old" and os.listdir(folder) == []


def test_a_failing_write_names_the_path_and_keeps_the_earlier_file(inversion, tmp_path, monkeypatch):
    """A full disk (or a read-only file system, as root sees it) fails the write: the error names the path, the
    earlier file stays whole and no temporary file is left."""
    path = tmp_path / "inversion.safetensors"
    inversion.save(path)
    before = path.read_bytes()
    for code in (errno.ENOSPC, errno.EROFS):

        def fail(descriptor, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", fail)
        with pytest.raises(OSError, match=re.escape(f"Cannot save the inversion to {path}")) as raised:
            inversion.save(path)
        assert raised.value.errno == code
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def test_saved_files_follow_the_umask(inversion, tmp_path):
    path = tmp_path / "inversion.safetensors"
    for umask in (0o022, 0o077, 0o002):
        previous = os.umask(umask)
        try:
            inversion.save(path)  # over the earlier file: the mode follows the umask, not the earlier file
        finally:
            os.umask(previous)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path) == [path.name]


def test_load_of_a_missing_folder_unreadable_or_corrupt_file_names_the_path(inversion, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        InversionResult.load(missing)
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        InversionResult.load(tmp_path)
    with pytest.raises(ValueError, match="NUL byte"):
        InversionResult.load(str(tmp_path / "a\0b"))
    path = tmp_path / "inversion.safetensors"
    inversion.save(path)
    data = path.read_bytes()
    for name, corrupt in (
        ("truncated", data[: len(data) // 2]),
        ("huge-header", b"\xff" * 8 + data[8:]),
        ("empty", b""),
        ("text", b"not a tensor file"),
    ):
        (tmp_path / name).write_bytes(corrupt)
        with pytest.raises(InvalidInversionError, match=re.escape(str(tmp_path / name)) + ".*not an inversion file"):
            InversionResult.load(tmp_path / name)
    if not AS_ROOT:
        path.chmod(0)
        with pytest.raises(PermissionError, match=re.escape(str(path))):
            InversionResult.load(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_files_that_are_not_regular_files_are_refused_without_reading_them(inversion, tmp_path):
    pipe_path = tmp_path / "fifo"
    os.mkfifo(pipe_path)  # opening it would wait for a writer forever
    with pytest.raises(FileExistsError, match=re.escape(str(pipe_path)) + ".*not a regular file"):
        inversion.save(pipe_path)
    for path in (pipe_path, "/dev/zero"):  # and reading /dev/zero would never end
        if os.path.exists(path):
            with pytest.raises(InvalidInversionError, match=re.escape(str(path)) + ".*not a regular file"):
                InversionResult.load(path)
    weights = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(4)}, weights)  # a safetensors file, but not an inversion
    with pytest.raises(InvalidInversionError, match="holds no inversion metadata"):
        InversionResult.load(weights)


def test_saving_through_a_symbolic_link_writes_its_target(inversion, tmp_path):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "inversion.safetensors"
    target.write_bytes(b"old")
    (tmp_path / "link.safetensors").symlink_to(target)
    inversion.save(tmp_path / "link.safetensors")
    assert (tmp_path / "link.safetensors").is_symlink()
    assert torch.equal(InversionResult.load(target).latents, inversion.latents)


def test_saving_below_a_file_names_it(inversion, tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=re.escape(str(tmp_path / "file")) + " is a file, not a folder"):
        inversion.save(tmp_path / "file" / "inversion.safetensors")
    with pytest.raises(ValueError, match="the path is empty"):
        inversion.save("")


def test_an_nti_file_without_its_null_embeddings_says_so(pipe, tmp_path):
    nti = pipe.invert(scene_image(0), SOURCE, num_inference_steps=2, inversion_method="nti", null_text_inner_steps=0)
    path = tmp_path / "nti.safetensors"
    nti.save(path)
    rewrite(path, lambda metadata, tensors: tensors.pop("null_embeds"))
    with pytest.raises(InvalidInversionError, match="method 'nti' needs null_embeds") as raised:
        InversionResult.load(path)
    assert "belong to method 'nti' only" not in str(raised.value)
    ddim = dataclasses.replace(nti, method="ddim", null_embeds=None)  # losses left behind
    with pytest.raises(InvalidInversionError, match="null_text_losses belong to method 'nti' only, method is 'ddim'"):
        ddim.save(tmp_path / "ddim.safetensors")


# -------------------------------------------------------------------------------------------------------------------
# Falsy and mistyped flags are errors, not the default


@pytest.mark.parametrize("method", ["", 0, False, ["npi"], "NPI"])
def test_an_empty_or_falsy_inversion_method_is_refused(pipe, components, method):
    image = scene_image(0)
    refused_before_any_unet_pass(
        pipe,
        lambda: pipe.invert(image, SOURCE, num_inference_steps=STEPS, inversion_method=method),
        ValueError,
        "inversion_method must be one of",
    )
    with pytest.raises(ValueError, match="inversion_method must be one of"):
        NegativePromptInversionPipeline(**components, inversion_method=method)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(null_text_init=""), "null_text_init must be one of"),
        (dict(proximal_guidance=""), "proximal_guidance must be one of"),
        (dict(proximal_guidance=0), "proximal_guidance must be one of"),
        (dict(force_zeros_for_empty_prompt="no"), "force_zeros_for_empty_prompt must be True or False"),
    ],
)
def test_falsy_constructor_flags_are_refused(components, flags, message):
    with pytest.raises(ValueError, match=message):
        NegativePromptInversionPipeline(**components, **flags)


@pytest.mark.parametrize("steps", [0, 3.0, False, "3"])
def test_a_step_count_that_is_no_count_is_named_as_such(pipe, inversion, steps):
    refused_before_any_unet_pass(
        pipe,
        lambda: pipe(inversion=inversion, num_inference_steps=steps),
        ValueError,
        "num_inference_steps must be a positive integer",
    )


def test_an_empty_null_text_init_is_refused_per_call(pipe):
    refused_before_any_unet_pass(
        pipe,
        lambda: pipe.invert(scene_image(0), SOURCE, inversion_method="nti", null_text_init=""),
        ValueError,
        "null_text_init must be one of",
    )


@pytest.mark.parametrize(
    "words",
    [((), ()), ("cat", ()), ("cat", ""), ("cat", "  "), "cat", [("cat", [])], (("cat",), [["dog"]]), ("cat", 3)],
)
def test_blend_words_that_are_empty_or_not_words_are_refused(pipe, inversion, words):
    p2p = PromptToPrompt(local_blend=LocalBlend(words))
    refused_before_any_unet_pass(
        pipe,
        lambda: pipe(prompt=TARGET, inversion=inversion, attention_control=p2p),
        ValueError,
        "LocalBlend.words must be",
    )


# -------------------------------------------------------------------------------------------------------------------
# Indexing an inversion


def test_inversion_indices_are_checked_as_a_list_s(inversion):
    two = dataclasses.replace(
        inversion,
        latents=torch.cat([inversion.latents, inversion.latents + 1]),
        prompt_embeds=inversion.prompt_embeds.repeat(2, 1, 1),
        source_prompts=[SOURCE, TARGET],
    )
    assert two[-1].source_prompts == [TARGET] and torch.equal(two[-1].latents, two[1].latents)
    assert two[-2].source_prompts == two[0].source_prompts == [SOURCE]
    assert two[np.int64(1)].source_prompts == [TARGET]
    for index in (2, 5, -3):
        with pytest.raises(IndexError, match=f"image index {index} is out of range for an inversion of 2 image"):
            two[index]
    for index in ("0", 0.0, True, slice(0, 1)):
        with pytest.raises(TypeError, match="indices must be integers"):
            two[index]
    assert [item.source_prompts for item in two] == [[SOURCE], [TARGET]]  # iteration ends


# -------------------------------------------------------------------------------------------------------------------
# The model signature: every tensor of every model, within rounding of a cast


def test_weights_changed_everywhere_but_in_the_first_tensor_are_caught(pipe, inversion, tmp_path):
    inversion.save(tmp_path / "inversion.safetensors")
    changed = NegativePromptInversionPipeline(**copy.deepcopy(pipe.components))
    with torch.no_grad():
        for parameter in list(changed.unet.parameters())[1:]:
            parameter.mul_(1.05)
    for attempt in (
        lambda: changed.load_inversion(tmp_path / "inversion.safetensors"),
        lambda: changed(prompt=TARGET, inversion=inversion),
    ):
        refused_before_any_unet_pass(
            changed, attempt, ValueError, r"different models than this pipeline's: unet \(weights\)\."
        )


def test_a_changed_text_encoder_is_named(pipe, inversion):
    with torch.no_grad():
        list(pipe.text_encoder.parameters())[-1].add_(0.5)  # the final layer norm
    with pytest.raises(ValueError, match=r"different models than this pipeline's: text_encoder \(weights\)\."):
        pipe(prompt=TARGET, inversion=inversion)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_same_weights_in_another_dtype_match(pipe, inversion, dtype):
    pipe.to(dtype)
    pipe.check_inversion(inversion)
    pipe.to(torch.float32)  # back from the rounded weights: still within a cast of the originals
    pipe.check_inversion(inversion)


def test_samples_match_across_casts_and_rounding_boundaries():
    """Values at bfloat16's rounding midpoints (float16 holds them exactly, bfloat16 rounds them to even), tiny values
    float16 flushes, and double rounding (float16, then bfloat16) all match the float32 weights; a change of 3 eps
    of bfloat16 does not."""
    torch.manual_seed(0)
    midpoints = (1 + (2 * torch.arange(8) + 1) * 2.0**-8) * torch.tensor([1, -1, 0.25, 3e-3] * 2)
    weights = {"midpoints": midpoints, "random": torch.randn(64), "tiny": torch.tensor([1e-7, -3e-8, 5e-6, 0.0] * 2)}
    model = torch.nn.ParameterDict({name: torch.nn.Parameter(value) for name, value in weights.items()})
    original = _weight_samples("model", model)
    for dtypes in ([torch.float16], [torch.bfloat16], [torch.float16, torch.bfloat16]):
        cast = copy.deepcopy(model)
        for dtype in dtypes:
            cast = cast.to(dtype)
        assert _weights_match(_weight_samples("model", cast), original), dtypes
        assert _weights_match(original, _weight_samples("model", cast)), dtypes
    with torch.no_grad():
        model["random"].mul_(1 + 3 * torch.finfo(torch.bfloat16).eps)
    assert not _weights_match(_weight_samples("model", model), original)
    assert not _weights_match(original, "not base64!") and not _weights_match(original, None)


def test_quantised_weights_are_signed_by_the_values_they_stand_for():
    """enable_fp8() replaces linear weights by torchao tensors, on which no view can be taken: their samples are those
    of their dequantised values (an FP8 pipeline's inversions match it; a bfloat16 pipeline's do not)."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 40)
    quantised = copy.deepcopy(plain)
    quantised.weight = torch.nn.Parameter(StoredElsewhere(plain.weight.detach().clone()), requires_grad=False)
    assert _weight_samples("model", quantised) == _weight_samples("model", plain)


def test_samples_are_a_fixed_number_per_tensor(pipe):
    samples = base64.b64decode(pipe._model_signature()["weights"]["unet"])
    tensors = list(pipe.unet.parameters())
    assert len(samples) == 4 * sum(min(SIGNATURE_SAMPLES, tensor.numel()) for tensor in tensors)


def test_files_of_the_earlier_signature_still_load(pipe, inversion, tmp_path, tokenizer_dir):
    """Files saved before this version hold one config digest and 8 values of each model's first tensor."""
    first = {
        name: [float(v) for v in next(getattr(pipe, name).parameters()).detach().flatten()[:8]]
        for name in ("unet", "vae", "text_encoder")
    }
    earlier = dataclasses.replace(
        inversion, model_signature={"config": pipe._model_signature()["config"], "probe": first}
    )
    path = tmp_path / "earlier.safetensors"
    earlier.save(path)
    torch.testing.assert_close(
        pipe(inversion=pipe.load_inversion(path), output_type="latent").images,
        pipe(inversion=inversion, output_type="latent").images,
        rtol=0,
        atol=0,
    )
    other = NegativePromptInversionPipeline(**tiny_components(tokenizer_dir, seed=1))
    with pytest.raises(ValueError, match=r"different models than this pipeline's: unet \(weights\); vae"):
        other.load_inversion(path)


def test_another_vae_factor_names_the_vae(components, inversion):
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=32,
    )
    other = NegativePromptInversionPipeline(**{**copy.deepcopy(components), "vae": vae})
    refused_before_any_unet_pass(
        other,
        lambda: other(prompt=TARGET, inversion=inversion),
        ValueError,
        r"different models than this pipeline's: vae \(config, weights, VAE factor 4 here, 2 in the inversion\)\.",
    )


@pytest.mark.parametrize(
    "change",
    [
        dict(prediction_type="v_prediction"),
        dict(steps_offset=0),
        dict(beta_end=0.02),
        dict(timestep_spacing="trailing"),
    ],
)
def test_another_noise_schedule_names_the_scheduler(components, inversion, change):
    scheduler = type(components["scheduler"]).from_config(components["scheduler"].config, **change)
    other = NegativePromptInversionPipeline(**{**copy.deepcopy(components), "scheduler": scheduler})
    refused_before_any_unet_pass(
        other,
        lambda: other(prompt=TARGET, inversion=inversion),
        ValueError,
        r"different models than this pipeline's: scheduler \(config\)\.",
    )


def test_timesteps_that_the_scheduler_does_not_give_are_refused(pipe, inversion):
    shifted = dataclasses.replace(inversion, timesteps=inversion.timesteps - 1)
    refused_before_any_unet_pass(pipe, lambda: pipe(inversion=shifted), ValueError, "this pipeline's scheduler gives")


# -------------------------------------------------------------------------------------------------------------------
# UNet call counting is per thread


def test_count_unet_calls_counts_only_the_calling_thread(pipe, inversion):
    inside, done = threading.Event(), threading.Event()
    other = {}

    def run_elsewhere():
        inside.wait()
        with pipe.count_unet_calls() as log:
            pipe(inversion=inversion, output_type="latent")
        other["calls"] = log.calls
        done.set()

    thread = threading.Thread(target=run_elsewhere)
    thread.start()
    with pipe.count_unet_calls() as outer:
        inside.set()
        done.wait(timeout=60)
        with pipe.count_unet_calls() as inner:
            pipe(inversion=inversion, output_type="latent")
    thread.join()
    assert len(other["calls"]) == STEPS  # NPI reconstruction: one pass per step
    assert outer.calls == inner.calls == [(1, False)] * STEPS  # nested blocks both see their thread's calls
    assert pipe._unet_call_logs == {}


# -------------------------------------------------------------------------------------------------------------------
# Devices


@pytest.mark.parametrize(
    "device, message",
    [
        ("meta", "device 'meta' holds tensors without values"),
        (torch.device("meta"), "device 'meta' holds tensors without values"),
        ("bogus", "device 'bogus' is not a device torch can use"),
        ("mps", "device 'mps'"),
    ],
)
def test_to_an_unusable_device_is_refused_and_moves_nothing(pipe, inversion, device, message):
    if isinstance(device, str) and device == "mps" and torch.backends.mps.is_available():
        pytest.skip("mps is available here")
    with pytest.raises(ValueError, match=message):
        pipe.to(device)
    with pytest.raises(ValueError, match=message):
        pipe.to(device=device, dtype=torch.float32)
    assert {parameter.device.type for parameter in pipe.unet.parameters()} == {"cpu"}
    pipe.check_inversion(inversion)  # untouched


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_to_cuda_without_cuda_is_refused_naming_the_device(pipe):
    with pytest.raises(ValueError, match="device 'cuda(:1)?'"):
        pipe.to("cuda")
    with pytest.raises(ValueError, match="device 'cuda:1'"):
        pipe.to("cuda:1", torch.float16)
    assert pipe.device.type == "cpu"


@pytest.mark.gpu
def test_a_missing_cuda_index_is_refused_and_an_inversion_crosses_devices(pipe, inversion):
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"device '{missing}' does not exist"):
        pipe.to(missing)
    pipe.to("cuda")
    pipe.check_inversion(inversion)  # made on the CPU: the same weights


def test_weights_moved_to_meta_are_named_before_any_unet_pass(pipe, inversion):
    pipe.unet.to("meta")
    with pytest.raises(ValueError, match=r"unet\..* is on the meta device"):
        pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"unet\..* is on the meta device"):
        pipe(prompt=TARGET, inversion=inversion)


# -------------------------------------------------------------------------------------------------------------------
# SDXL's second tokenizer


def test_sdxl_with_a_tokenizer_2_of_another_vocabulary_is_refused_at_construction(sdxl_components, tmp_path):
    words = ["a", "red", "on", "white", "background"]
    other = CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp_path, words), pad_token="!")
    with pytest.raises(ValueError, match="tokenizer_2 has another vocabulary than tokenizer"):
        NegativePromptInversionPipeline(**{**sdxl_components, "tokenizer_2": other})
    NegativePromptInversionPipeline(**sdxl_components)  # the same vocabulary, padded with "!": accepted
