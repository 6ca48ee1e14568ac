"""SDXL in the same pipeline class, on tiny SDXL-layout components (conftest `tiny_sdxl_components`): the text
embeddings and added conditioning, the identities that hold on SD 1.x as well, and what is SDXL's own (the null
embedding, the VAE upcast, loading, and inversions that belong to one architecture)."""

import copy
import dataclasses
import functools

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import (
    UNET_OPS,
    UNetCalls,
    assert_rounding_close,
    edit_ops,
    inversion_ops,
    scene_image,
    tolerance,
)
from diffusers import StableDiffusionXLPipeline
from test_prompt_to_prompt import explicit_cross, explicit_self_replace
from transformers import CLIPTokenizer

from negative_prompt_inversion import pipeline_negative_prompt_inversion as npi
from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    LocalBlend,
    MasaCtrl,
    NegativePromptInversionPipeline,
    PromptToPrompt,
    ProximalGuidance,
)
from toy_world.tokenizer import write_word_tokenizer


STEPS = 4
SIZE = 64  # the tiny VAE halves it: a 32² latent, attention maps of 16² and 8² (SDXL at 1024 px: 64² and 32²)
SOURCE = "a red cat on a white background"
TARGET = "a red dog on a white background"
P2P = PromptToPrompt(cross_replace_steps=0.6, self_replace_steps=0.5)
# Rounding accumulates layer by layer: this UNet chains 11 transformer blocks where the SD tiny UNet, for which
# conftest's per-pass budget is counted, chains 7.
SDXL_UNET_OPS = UNET_OPS * 11 / 7


@pytest.fixture()
def inversion(shared_inversion):
    return shared_inversion(SOURCE, STEPS, size=SIZE, sdxl=True)


def latents(pipe, **kwargs):
    return pipe(output_type="latent", **kwargs).images


class UNetInputs:
    """Records the text embeddings and added conditioning of every UNet forward."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append((kwargs["encoder_hidden_states"].clone(), copy.deepcopy(kwargs["added_cond_kwargs"])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --------------------------------------------------------------------------------------------------------------
# Text embeddings, added conditioning and the UNet's layers


def test_embeddings_are_both_penultimate_states_and_the_second_pooled_projection(sdxl_pipe):
    pipe, prompts = sdxl_pipe, [SOURCE, TARGET]
    embeds, pooled = pipe.encode_text(prompts, "cpu")
    assert embeds.shape == (2, 77, 32 + 48) and pooled.shape == (2, 24)
    first = pipe.text_encoder(
        pipe.tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids, output_hidden_states=True
    )
    second = pipe.text_encoder_2(
        pipe.tokenizer_2(prompts, padding="max_length", return_tensors="pt").input_ids, output_hidden_states=True
    )
    assert torch.equal(embeds, torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1))
    assert torch.equal(pooled, second.text_embeds)
    assert pipe.tokenizer_2("a cat", padding="max_length").input_ids[-1] == 0  # pads with "!", as SDXL's


def test_unet_reads_each_rows_pooled_embedding_and_the_image_time_ids(sdxl_pipe, inversion):
    with UNetInputs(sdxl_pipe.unet) as inputs:
        latents(sdxl_pipe, prompt=TARGET, inversion=inversion)
    (embeds, added), pooled = inputs.calls[0], sdxl_pipe.encode_text([TARGET], "cpu")[1]
    # rows: the unconditional (NPI: the source prompt's embedding and pooled embedding), then the target's
    assert torch.equal(added["text_embeds"], torch.cat([inversion.pooled_prompt_embeds, pooled]))
    assert torch.equal(embeds[0], inversion.prompt_embeds[0])
    assert added["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2


def test_layers_masactrl_choice_and_local_blend_level_are_resolution_relative(sdxl_pipe):
    layers = sdxl_pipe._attention_layers((SIZE // 2, SIZE // 2))
    assert len(layers) == len(sdxl_pipe.unet.attn_processors) == 22  # 11 transformer blocks, two with depth 2
    assert {layer.level for layer in layers} == {1, 2}  # no attention at full latent resolution, as SDXL
    assert sdxl_pipe._map_level(layers) == (256, (16, 16))  # ¼ (8²) would be coarser than 16²
    assert sdxl_pipe._map_level(sdxl_pipe._attention_layers((128, 128))) == (1024, (32, 32))  # ¼: 1024 px
    plan = npi.EditPlan(
        [npi.Branch(0, SOURCE, SOURCE, True, "source", False), npi.Branch(0, SOURCE, TARGET, False, "empty", True)],
        npi.RowLayout((1, 2), (1, 0)),
        layers,
        STEPS,
        torch.zeros((), dtype=torch.long),
        None,
        sdxl_pipe.tokenizer,
        torch.device("cpu"),
    )
    rules, _ = MasaCtrl().prepare(plan)
    chosen = [layer.block for layer in layers if layer.name in rules]
    assert chosen == [5, 6, 7, 8, 9, 10]  # every decoder self-attention block at the two finest attention levels
    # LocalBlend.keeping reads the finest maps that exist: level 1 here, where level 0 has no cross-attention
    assert sdxl_pipe._map_level(layers, "finest") == (256, (16, 16))
    assert sdxl_pipe._map_level(sdxl_pipe._attention_layers((128, 128)), "finest") == (4096, (64, 64))
    LocalBlend.keeping("cat").check(layers)
    with pytest.raises(ValueError, match=r"LocalBlend.map_level must be one of \[1, 2\]"):
        LocalBlend(("cat", "cat"), map_level=0).check(layers)


def test_tokenizers_that_split_a_prompt_differently_are_refused(sdxl_components, tmp_path):
    components = copy.copy(sdxl_components)
    words = ["a", "red", "on", "white", "background"]  # no "cat": it splits into characters
    pipe = NegativePromptInversionPipeline(**components)
    # swapped in after construction, which refuses another vocabulary (test_api_errors.py): refused per prompt
    pipe.tokenizer_2 = CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp_path, words), pad_token="!")
    with UNetCalls(pipe.unet) as calls, pytest.raises(ValueError, match="tokenizer and tokenizer_2 split"):
        pipe.invert(scene_image(0, SIZE), SOURCE, num_inference_steps=STEPS)
    assert calls.batches == []


@pytest.mark.parametrize("missing", ["text_encoder_2", "tokenizer_2", "both"])
def test_constructor_pairs_the_unet_with_its_text_encoders(sdxl_components, components, missing):
    sdxl = dict(sdxl_components)
    for name in ("text_encoder_2", "tokenizer_2") if missing == "both" else (missing,):
        sdxl[name] = None
    with pytest.raises(ValueError, match="text_encoder_2"):
        NegativePromptInversionPipeline(**sdxl)
    with pytest.raises(ValueError, match="addition_embed_type"):
        NegativePromptInversionPipeline(
            **components, text_encoder_2=sdxl_components["text_encoder_2"], tokenizer_2=sdxl_components["tokenizer_2"]
        )


# --------------------------------------------------------------------------------------------------------------
# The identities of the inversion methods


def test_npi_reconstruction_equals_ddim_reconstruction_at_guidance_one(sdxl_pipe, inversion):
    npi_run = latents(sdxl_pipe, inversion=inversion, guidance_scale=7.5)
    ddim = latents(sdxl_pipe, inversion=dataclasses.replace(inversion, method="ddim"), guidance_scale=1.0)
    assert torch.equal(npi_run, ddim)  # one UNet row on E(src) and its pooled embedding, ε + w·0 either way


def test_nti_optimises_the_sequence_and_keeps_the_pooled_null_of_its_initialisation(sdxl_pipe, inversion):
    image, kwargs = scene_image(0, SIZE), {"num_inference_steps": STEPS, "inversion_method": "nti"}
    nti = sdxl_pipe.invert(
        image, SOURCE, null_text_inner_steps=3, null_text_early_stop=0.0, null_text_init="null", **kwargs
    )
    losses = nti.null_text_losses[0, 0]
    assert torch.isfinite(losses).all() and losses[-1] < losses[0]
    assert nti.null_embeds.shape == (1, STEPS, 77, 80) and nti.null_embeds.dtype == torch.float32
    assert torch.equal(nti.null_pooled_embeds, torch.zeros(1, 24))  # force_zeros_for_empty_prompt's null
    # From the prompt without inner steps NTI is NPI: same rows, same embeddings, pooled included
    start = sdxl_pipe.invert(image, SOURCE, null_text_inner_steps=0, **kwargs)
    assert torch.equal(start.null_pooled_embeds, start.pooled_prompt_embeds)
    assert torch.equal(
        latents(sdxl_pipe, prompt=TARGET, inversion=start), latents(sdxl_pipe, prompt=TARGET, inversion=inversion)
    )


@pytest.mark.parametrize("force_zeros", [True, False])
def test_the_null_embedding_follows_force_zeros_for_empty_prompt(sdxl_components, inversion, force_zeros):
    pipe = NegativePromptInversionPipeline(**sdxl_components, force_zeros_for_empty_prompt=force_zeros)
    with UNetInputs(pipe.unet) as inputs:
        latents(pipe, inversion=dataclasses.replace(inversion, method="ddim"))
    embeds, added = inputs.calls[0]
    empty, empty_pooled = pipe.encode_text([""], "cpu")
    if force_zeros:
        empty, empty_pooled = torch.zeros_like(empty), torch.zeros_like(empty_pooled)
    assert torch.equal(embeds[0], empty[0]) and torch.equal(added["text_embeds"][0], empty_pooled[0])
    assert torch.equal(embeds[1], inversion.prompt_embeds[0])


# --------------------------------------------------------------------------------------------------------------
# Editing


def test_p2p_fused_paths_match_the_explicit_reference(sdxl_pipe, inversion, monkeypatch):
    control = dataclasses.replace(
        P2P, reweight=[{"big": 2.0}, {}], local_blend=LocalBlend([["cat"], ["cat"], ["dog"]])
    )
    kwargs = {
        "prompt": ["a big red cat on a white background", TARGET],
        "inversion": inversion,
        "attention_control": control,
    }
    fused = latents(sdxl_pipe, **kwargs)
    monkeypatch.setattr(npi.CrossAttentionControl, "__call__", explicit_cross)
    monkeypatch.setattr(npi.MutualSelfAttention, "__call__", explicit_self_replace)
    assert_rounding_close(fused, latents(sdxl_pipe, **kwargs), ops=edit_ops(STEPS, unet_ops=SDXL_UNET_OPS))


def test_batched_inversion_and_edits_equal_single_ones(sdxl_pipe):
    images, prompts = [scene_image(3, SIZE), scene_image(4, SIZE)], [SOURCE, "a blue dog on a black background"]
    batched = sdxl_pipe.invert(images, prompts, num_inference_steps=STEPS)
    targets = [TARGET, "a blue cat on a black background"]
    together = latents(sdxl_pipe, prompt=targets, inversion=batched, attention_control=P2P)
    for k in range(2):
        single = sdxl_pipe.invert(images[k], prompts[k], num_inference_steps=STEPS)
        assert_rounding_close(batched.latents[k : k + 1], single.latents, ops=inversion_ops(STEPS, SDXL_UNET_OPS))
        alone = latents(sdxl_pipe, prompt=targets[k], inversion=batched[k], attention_control=P2P)
        assert_rounding_close(together[k : k + 1], alone, ops=edit_ops(STEPS, unet_ops=SDXL_UNET_OPS))


def test_same_prompt_edits_reproduce_the_reconstruction(sdxl_pipe, inversion):
    reconstruction = latents(sdxl_pipe, inversion=inversion)
    p2p = latents(
        sdxl_pipe,
        prompt=SOURCE,
        inversion=inversion,
        attention_control=dataclasses.replace(P2P, local_blend=LocalBlend(("cat", "cat"))),
    )
    assert_rounding_close(p2p, reconstruction, ops=edit_ops(STEPS, unet_ops=SDXL_UNET_OPS))
    masactrl = latents(
        sdxl_pipe, prompt=SOURCE, inversion=inversion, attention_control=MasaCtrl(start_step=0), guidance_scale=1.0
    )
    assert_rounding_close(masactrl, reconstruction, ops=edit_ops(STEPS, guidance_scale=1.0, unet_ops=SDXL_UNET_OPS))


def test_masactrl_and_proximal_guidance_edit(sdxl_pipe, inversion):
    reconstruction = latents(sdxl_pipe, inversion=inversion)
    out = sdxl_pipe(
        prompt="a red cat sitting on a white background",
        inversion=inversion,
        attention_control=MasaCtrl(start_step=1),
        proximal_guidance="soft",
        return_edit_mask=True,
        output_type="pt",
    )
    assert torch.isfinite(out.images).all() and out.edit_masks[0].size == (SIZE, SIZE)
    # With nothing thresholded away and no pulls, proximal guidance is plain NPI guidance, exactly
    kept = ProximalGuidance(threshold=0.0, inversion_guidance=False, reconstruction_guidance=False)
    edit = latents(sdxl_pipe, prompt=TARGET, inversion=inversion)
    assert torch.equal(latents(sdxl_pipe, prompt=TARGET, inversion=inversion, proximal_guidance=kept), edit)
    assert (edit - reconstruction).abs().max() > tolerance(reconstruction, edit_ops(STEPS, unet_ops=SDXL_UNET_OPS))


def test_processors_are_restored_after_a_call_and_after_an_exception(sdxl_pipe, inversion):
    before = dict(sdxl_pipe.unet.attn_processors)
    latents(sdxl_pipe, prompt=TARGET, inversion=inversion, attention_control=P2P)
    assert dict(sdxl_pipe.unet.attn_processors) == before

    def fail(pipe, i, t, tensors):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sdxl_pipe(prompt=TARGET, inversion=inversion, attention_control=MasaCtrl(), callback_on_step_end=fail)
    assert dict(sdxl_pipe.unet.attn_processors) == before


def test_cuda_graph_runner_passes_the_added_conditioning(sdxl_pipe, inversion):
    want = latents(sdxl_pipe, prompt=TARGET, inversion=inversion, attention_control=P2P)
    sdxl_pipe.enable_cuda_graphs()  # on the CPU the runner calls the UNet eagerly with the same inputs
    assert torch.equal(latents(sdxl_pipe, prompt=TARGET, inversion=inversion, attention_control=P2P), want)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_match_eager_on_cuda(sdxl_components, monkeypatch, compile):
    monkeypatch.setattr(
        torch.backends.cudnn, "allow_tf32", False
    )  # TF32 picks would differ by ~1e-3 (test_fast_paths)
    eager, fast = (NegativePromptInversionPipeline(**copy.deepcopy(sdxl_components)).to("cuda") for _ in range(2))
    fast.enable_cuda_graphs(compile=compile)
    inversions = [pipe.invert(scene_image(0, SIZE), SOURCE, num_inference_steps=STEPS) for pipe in (eager, fast)]
    for prompt in (TARGET, "a blue cat on a white background", TARGET):  # new pooled embeddings replay the graph
        want, got = (
            latents(pipe, prompt=prompt, inversion=inv, attention_control=P2P)
            for pipe, inv in zip((eager, fast), inversions)
        )
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert fast._cuda_graphs.graphs


# --------------------------------------------------------------------------------------------------------------
# SDXL's VAE in float16


@pytest.mark.parametrize("force_upcast", [True, False])
def test_float16_vae_runs_in_float32_when_its_config_says_so(sdxl_components, force_upcast):
    pipe = NegativePromptInversionPipeline(**copy.deepcopy(sdxl_components)).to(dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.register_to_config(force_upcast=force_upcast)
    seen = []
    for part in (pipe.vae.encoder, pipe.vae.decoder):
        part.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    # float16 convolutions are slow on CPUs: 32 px, one step (the property is per VAE call)
    inv = pipe.invert(scene_image(0), SOURCE, num_inference_steps=1)
    out = pipe(prompt=TARGET, inversion=inv, output_type="np").images
    assert seen == [torch.float32 if force_upcast else torch.float16] * 2
    assert pipe.vae.dtype == torch.float16 and np.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------------
# Inversion files and loading


def test_sdxl_inversions_round_trip_through_a_file(sdxl_pipe, tmp_path):
    nti = sdxl_pipe.invert(
        scene_image(0, SIZE), SOURCE, num_inference_steps=STEPS, inversion_method="nti", null_text_inner_steps=1
    )
    nti.save(tmp_path / "nti.safetensors")
    loaded = sdxl_pipe.load_inversion(tmp_path / "nti.safetensors")
    for name in ("latents", "prompt_embeds", "pooled_prompt_embeds", "null_embeds", "null_pooled_embeds"):
        assert torch.equal(getattr(loaded, name), getattr(nti, name)), name
    assert torch.equal(
        latents(sdxl_pipe, prompt=TARGET, inversion=loaded), latents(sdxl_pipe, prompt=TARGET, inversion=nti)
    )


def test_an_inversion_belongs_to_its_architecture(sdxl_pipe, inversion, pipe, tmp_path):
    sd_inversion = pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    assert pipe._model_signature()["config"] != sdxl_pipe._model_signature()["config"]
    path = tmp_path / "inversion.safetensors"
    for owner, stranger, made, made_by in (
        (pipe, sdxl_pipe, sd_inversion, "SD 1.x/2.x"),
        (sdxl_pipe, pipe, inversion, "SDXL"),
    ):
        made.save(path)
        for attempt, argument in ((stranger.load_inversion, path), (functools.partial(stranger, TARGET), made)):
            with UNetCalls(stranger.unet) as calls, pytest.raises(ValueError, match=f"made by an {made_by} pipeline"):
                attempt(argument)
            assert calls.batches == []
        owner.load_inversion(path)


def test_an_inversion_without_its_pooled_null_is_invalid(sdxl_pipe):
    nti = sdxl_pipe.invert(
        scene_image(0, SIZE), SOURCE, num_inference_steps=2, inversion_method="nti", null_text_inner_steps=0
    )
    with pytest.raises(npi.InvalidInversionError, match="null_pooled_embeds"):
        sdxl_pipe(inversion=dataclasses.replace(nti, null_pooled_embeds=None))


def test_from_pipe_of_a_stable_diffusion_xl_pipeline(sdxl_components, inversion):
    sdxl = StableDiffusionXLPipeline(**sdxl_components, force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe = NegativePromptInversionPipeline.from_pipe(sdxl)
    pipe.set_progress_bar_config(disable=True)
    assert all(getattr(pipe, name) is getattr(sdxl, name) for name in ("unet", "text_encoder_2", "tokenizer_2"))
    assert pipe.config.force_zeros_for_empty_prompt is False  # the SDXL pipeline's setting carries over
    assert torch.equal(
        latents(pipe, prompt=TARGET, inversion=inversion, attention_control=P2P),
        latents(
            NegativePromptInversionPipeline(**sdxl_components),
            prompt=TARGET,
            inversion=inversion,
            attention_control=P2P,
        ),
    )


def test_an_sdxl_model_folder_loads_as_a_custom_pipeline(sdxl_components, inversion, tmp_path):
    from diffusers import DiffusionPipeline

    StableDiffusionXLPipeline(**sdxl_components, add_watermarker=False).save_pretrained(tmp_path / "sdxl")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "sdxl", custom_pipeline=npi.__file__, trust_remote_code=True)
    assert type(loaded).__name__ == "NegativePromptInversionPipeline" and loaded.is_sdxl
    assert loaded.config.force_zeros_for_empty_prompt is True
    loaded.set_progress_bar_config(disable=True)
    want = latents(NegativePromptInversionPipeline(**sdxl_components), prompt=TARGET, inversion=inversion)
    assert torch.equal(latents(loaded, prompt=TARGET, inversion=inversion), want)


def test_command_line_edits_with_an_sdxl_folder(sdxl_components, tmp_path):
    from negative_prompt_inversion import cli

    StableDiffusionXLPipeline(**sdxl_components, add_watermarker=False).save_pretrained(tmp_path / "sdxl")
    PIL.Image.fromarray(scene_image(0, SIZE)).save(tmp_path / "cat.png")
    common = ["--model", str(tmp_path / "sdxl"), "--device", "cpu"]
    threads = torch.get_num_threads()
    try:
        cli.main(
            [
                "invert",
                str(tmp_path / "cat.png"),
                "--prompt",
                SOURCE,
                "--out",
                str(tmp_path / "inv.safetensors"),
                "--steps",
                str(STEPS),
                *common,
            ]
        )
        cli.main(
            [
                "edit",
                str(tmp_path / "inv.safetensors"),
                "--prompt",
                TARGET,
                "--p2p",
                "--blend",
                "cat",
                "dog",
                "--out",
                str(tmp_path / "dog.png"),
                *common,
            ]
        )
    finally:
        torch.set_num_threads(threads)
    pipe = NegativePromptInversionPipeline(**sdxl_components)
    inversion = pipe.load_inversion(tmp_path / "inv.safetensors")
    assert inversion.pooled_prompt_embeds is not None  # an SDXL inversion
    p2p = PromptToPrompt(local_blend=LocalBlend(("cat", "dog")))
    want = pipe(prompt=TARGET, inversion=inversion, attention_control=p2p).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "dog.png")), np.asarray(want))
