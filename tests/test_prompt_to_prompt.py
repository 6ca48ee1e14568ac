"""Prompt-to-prompt: token maps, fused-vs-explicit parity, batching, fp16/bf16, restoration and input errors."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import WORDS, UNetCalls, assert_rounding_close, edit_ops, scene_image, tiny_components
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer

from negative_prompt_inversion import pipeline_negative_prompt_inversion as npi
from negative_prompt_inversion.attention_processors import npi_prompt_to_prompt as p2p
from negative_prompt_inversion.attention_processors.npi_attention_store import AttentionStore
from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    LocalBlend,
    NegativePromptInversionPipeline,
    PromptToPrompt,
)


STEPS = 3  # EDIT's windows still leave steps replaced and steps free: cross 0–1, self 0
SOURCE = "a red cat on a white background"
EDIT = PromptToPrompt(cross_replace_steps=0.6, self_replace_steps=0.5)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture()
def inversion(shared_inversion):
    return shared_inversion(SOURCE, STEPS)


def latents(pipe, **kwargs):
    return pipe(output_type="latent", **kwargs).images


# --------------------------------------------------------------------------------------------------------------
# Word and token maps


def test_multi_token_words_map_to_all_their_tokens(tok):
    assert p2p.word_token_indices("a hippopotamus on a wall", tok) == [[1], [2, 3], [4], [5], [6]]
    assert p2p.find_word("a hippopotamus and a hippopotamus", "hippopotamus", tok) == [2, 3, 6, 7]
    assert p2p.find_word("a cat", "dog", tok) == []


def test_word_swap_table(tok):
    edit = p2p.word_swap("a cat on a wall", "a hippopotamus on a wall", tok)
    m = edit.matrix
    assert m[0, 0] == 1 and m[1, 1] == 1  # BOS, "a"
    assert m[2, 2] == 0.5 and m[2, 3] == 0.5  # cat → hippo, potamus
    assert m[3, 4] == 1 and m[6, 7] == 1  # "on" and EOS stay aligned after the longer word (the reference's quirk)
    assert m[76].sum() == 0  # the last padding token has no partner: the target is one token longer


def test_refinement_table(tok):
    edit = p2p.refinement("a cat on a wall", "a big cat on a wall", tok)
    assert edit.keep[2] == 1 and edit.matrix[:, 2].sum() == 0  # the new word keeps its own map
    assert edit.matrix[2, 3] == 1 and edit.matrix[1, 1] == 1 and edit.matrix[6, 7] == 1


phrases = st.lists(st.sampled_from(WORDS + ["hippopotamus", "rhinoceros"]), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(source=phrases, swaps=st.lists(st.tuples(st.integers(0, 7), st.sampled_from(WORDS + ["rhinoceros"]))))
def test_word_swap_rows_sum_to_one(tokenizer_dir, source, swaps):
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    target = list(source)
    for position, word in swaps:
        target[position % len(target)] = word
    source, target = " ".join(source), " ".join(target)
    matrix = p2p.word_swap(source, target, tok).matrix
    length = len(tok(source).input_ids)  # BOS … EOS
    torch.testing.assert_close(matrix[:length].sum(dim=1), torch.ones(length))


@settings(max_examples=40, deadline=None)
@given(prompt=phrases)
def test_refinement_of_identical_prompts_is_identity(tokenizer_dir, prompt):
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    prompt = " ".join(prompt)
    edit = p2p.refinement(prompt, prompt, tok)
    assert torch.equal(edit.matrix, torch.eye(77)) and edit.keep.sum() == 0


def test_windows(tok):
    alpha = p2p.cross_attention_window(10, ["a big dog", "a dog"], {"default_": 0.5, "big": (0.0, 0.2)}, tok)
    assert alpha.shape == (11, 2, 77)
    assert alpha[:5, 1].eq(1).all() and alpha[5:, 1].eq(0).all()  # int(0.5·11) = 5
    assert alpha[:2, 0, 2].eq(1).all() and alpha[2:, 0, 2].eq(0).all()  # "big" has its own window
    window = p2p.self_attention_window(10, (0.2, 0.6))
    assert window.tolist() == [False, False, True, True, True, True, False, False, False, False]


# --------------------------------------------------------------------------------------------------------------
# Explicit-probability reference path (kept here, never in the product): every attention materialised.


def _explicit_probs(query, key, mask, scale):
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    return (scores if mask is None else scores + mask).softmax(-1)


def explicit_cross(self, query, key, value, attn_mask, scale):
    probs = _explicit_probs(query, key, attn_mask, scale)
    rows = self.rows
    for j in range(len(self.targets)):
        src, tgt = rows[self.sources[j]], rows[self.targets[j]]
        base, own = probs[src], probs[tgt]
        edit = p2p.TokenEdit(self.edits.matrix[j, 0], self.edits.keep[j, 0, 0], self.edits.scale[j, 0, 0])
        alpha = self.alpha[int(self.step)][j]
        probs[tgt] = alpha * edit(base, own) + (1 - alpha) * own
    if self.store is not None:
        self.store.record(probs[rows])
    return probs.to(value.dtype) @ value


def explicit_self_replace(self, query, key, value, attn_mask, scale):
    assert self.borrow == ("query", "key")  # prompt-to-prompt's self-attention replacement: the source's map
    probs = _explicit_probs(query, key, attn_mask, scale)
    if self.window[int(self.step)]:
        probs[self.target_rows] = probs[self.source_rows]
    return probs.to(value.dtype) @ value


@pytest.mark.parametrize(
    "target, kwargs",
    [
        ("a blue cat on a white background", {}),  # replace
        ("a red hippopotamus on a white background", {}),  # replace, token counts differ
        ("a big red cat on a white background", {}),  # refine
        ("a red cat on a white background", {"reweight": {"red": 3.0}}),  # reweight
        ("a big red cat on a white background", {"reweight": [{"big": 2.0, "cat": 0.5}, {}]}),  # refine + reweight
        ("a red dog on a white background", {"local_blend": LocalBlend(("cat", "dog"))}),  # local blend
    ],
)
def test_fused_paths_match_explicit_reference(pipe, inversion, monkeypatch, target, kwargs):
    control = dataclasses.replace(EDIT, **kwargs)
    fused = latents(
        pipe, prompt=[target, "a red dog on a white background"], inversion=inversion, attention_control=control
    )
    # Patch the classes the pipeline uses (its leaves load under the pipeline module's name when it is imported
    # top-level, so `attention_processors.…` here are other class objects), and count that the explicit paths ran.
    ran = {"cross": 0, "self": 0}

    def counted(name, explicit):
        def call(*args):
            ran[name] += 1
            return explicit(*args)

        return call

    monkeypatch.setattr(npi.CrossAttentionControl, "__call__", counted("cross", explicit_cross))
    monkeypatch.setattr(npi.MutualSelfAttention, "__call__", counted("self", explicit_self_replace))
    explicit = latents(
        pipe, prompt=[target, "a red dog on a white background"], inversion=inversion, attention_control=control
    )
    assert ran["cross"] > 0 and ran["self"] > 0
    assert_rounding_close(fused, explicit, ops=edit_ops(STEPS))  # another attention kernel: other roundings


# --------------------------------------------------------------------------------------------------------------
# Pipeline properties


@pytest.mark.parametrize("method", ["npi", "nti", "ddim"])
def test_same_prompt_edit_reproduces_reconstruction(pipe, method):
    inv = pipe.invert(
        scene_image(1), SOURCE, num_inference_steps=STEPS, inversion_method=method, null_text_inner_steps=2
    )
    reconstruction = latents(pipe, inversion=inv)
    edit = latents(
        pipe,
        prompt=SOURCE,
        inversion=inv,
        attention_control=dataclasses.replace(EDIT, local_blend=LocalBlend(("cat", "cat"))),
    )
    assert_rounding_close(edit, reconstruction, ops=edit_ops(STEPS))


def test_npi_batch_is_one_plus_two_k_rows_and_targets_are_independent(pipe, inversion):
    targets = [
        "a blue cat on a white background",
        "a big red cat on a white background",
        "a red dog on a black background",
    ]
    with UNetCalls(pipe.unet) as calls:
        together = latents(pipe, prompt=targets, inversion=inversion, attention_control=EDIT)
    assert calls.batches == [1 + 2 * len(targets)] * STEPS
    for k, target in enumerate(targets):
        alone = latents(pipe, prompt=target, inversion=inversion, attention_control=EDIT)
        assert_rounding_close(together[k : k + 1], alone, ops=edit_ops(STEPS))


def test_works_with_nti_and_ddim_rows(pipe):
    nti = pipe.invert(scene_image(2), SOURCE, num_inference_steps=3, inversion_method="nti", null_text_inner_steps=1)
    with UNetCalls(pipe.unet) as calls:
        out = latents(pipe, prompt="a blue cat on a white background", inversion=nti, attention_control=EDIT)
    assert calls.batches == [4] * 3 and torch.isfinite(out).all()


def test_non_square_latents_with_local_blend(pipe):
    inv = pipe.invert(scene_image(0, size=48), SOURCE, num_inference_steps=3, height=24, width=40)
    out = pipe(
        prompt="a red dog on a white background",
        inversion=inv,
        attention_control=PromptToPrompt(local_blend=LocalBlend(("cat", "dog"))),
        output_type="np",
        return_attention_maps=True,
    )
    assert out.images.shape == (1, 24, 40, 3)
    assert out.attention_maps[0].shape[:2] == (12, 20)  # the finest: no level has 16 tokens on the short side
    reference_level = PromptToPrompt(local_blend=LocalBlend(("cat", "dog"), map_level=1))
    out = pipe(
        prompt="a red dog on a white background",
        inversion=inv,
        attention_control=reference_level,
        output_type="latent",
        return_attention_maps=True,
    )
    assert out.attention_maps[0].shape[:2] == (6, 10)


BACKGROUND = "a red cat on a black background"  # SOURCE's background edit


def blended_target(blend, tok, source_cells, target_cells, index=5, steps=10, cells=8, latent=16):
    """One local-blend step on planted maps: the source's and the target's "cat" attend only to the given map cells
    (8×8, a 16×16 latent); with the source's latents 0 and the target's 1, the blended target is the blend's mask."""
    branches = [
        npi.Branch(0, SOURCE, SOURCE, True, "source", False),
        npi.Branch(0, SOURCE, BACKGROUND, False, "source", True),
    ]
    store = AttentionStore(cells * cells, (cells, cells), rows=2, tokens=tok.model_max_length)
    store.sums.fill_(1.0)
    for row, (prompt, planted) in enumerate([(SOURCE, source_cells), (BACKGROUND, target_cells)]):
        for y, x in planted:
            store.sums[row, y * cells + x, p2p.find_word(prompt, "cat", tok)] = 1000.0
    rows = npi.lay_out_rows(branches, 7.5)
    plan = npi.EditPlan(branches, rows, [], steps, torch.zeros((), dtype=torch.long), store, tok, torch.device("cpu"))
    context = npi.StepContext(torch.zeros(2, steps + 1, 4, latent, latent), store, index=index)
    latents = torch.stack([torch.zeros(4, latent, latent), torch.ones(4, latent, latent)])
    return blend.prepare(plan)(latents, context)[1, 0]


def planted_mask() -> torch.Tensor:
    """Where "cat" attends in `blended_target`'s planted maps: the source's cells (0..1, 0..1) and the target's
    (6, 6), each 3×3-dilated (0..2, 0..2 and 5..7, 5..7), upsampled 2× to the 16² latent."""
    mask = torch.zeros(16, 16)
    mask[0:6, 0:6] = 1
    mask[10:16, 10:16] = 1
    return mask


def test_keep_blend_edits_exactly_where_the_words_do_not_attend(tok):
    """`LocalBlend` edits where the words of the source or of the target attend; with ``keep=True`` the same words
    edit exactly everywhere else: the two masks sum to 1 at every latent cell."""
    words = (["cat"], ["cat"])
    edited = blended_target(LocalBlend(words), tok, [(0, 0), (1, 1)], [(6, 6)])
    torch.testing.assert_close(edited, planted_mask(), rtol=0, atol=0)
    kept = blended_target(LocalBlend(words, keep=True), tok, [(0, 0), (1, 1)], [(6, 6)])
    torch.testing.assert_close(kept, 1 - planted_mask(), rtol=0, atol=0)
    torch.testing.assert_close(kept + edited, torch.ones(16, 16), rtol=0, atol=0)


@pytest.mark.parametrize("index, blends", [(1, False), (2, True), (5, True), (6, False), (9, False)])
def test_local_blend_applies_from_start_until_stop(tok, index, blends):
    """10 steps, ``start=0.2, stop=0.6``: steps 2–5 blend; before step 2 and from step 6 on the target is left as
    its DDIM step made it (here all ones)."""
    blend = LocalBlend(("cat", "cat"), start=0.2, stop=0.6, keep=True)
    edited = blended_target(blend, tok, [(0, 0), (1, 1)], [(6, 6)], index=index)
    torch.testing.assert_close(edited, 1 - planted_mask() if blends else torch.ones(16, 16), rtol=0, atol=0)


def test_local_blend_stopped_at_its_start_is_no_blend(pipe, inversion):
    blend = LocalBlend(("cat", "cat"), start=0.0, stop=0.0, keep=True)
    stopped = latents(
        pipe, prompt=BACKGROUND, inversion=inversion, attention_control=dataclasses.replace(EDIT, local_blend=blend)
    )
    unblended = latents(pipe, prompt=BACKGROUND, inversion=inversion, attention_control=EDIT)
    assert_rounding_close(stopped, unblended, ops=edit_ops(STEPS))


def test_a_batch_mixing_object_and_background_blends_equals_single_edits(pipe):
    """``keep`` is one flag per image: a batch of an object edit (blend on the changed word) and a background edit
    (keep the object's words) edits each image as its own call does."""
    sources = [SOURCE, "a blue dog on a white background"]
    targets = ["a red dog on a white background", "a blue dog on a red background"]
    blends = [LocalBlend(("cat", "dog")), LocalBlend((["blue", "dog"], ["blue", "dog"]), keep=True)]
    batched = pipe.invert([scene_image(0), scene_image(1)], sources, num_inference_steps=STEPS)
    mixed = LocalBlend([blend.words for blend in blends], keep=[blend.keep for blend in blends])
    control = dataclasses.replace(EDIT, local_blend=mixed)
    together = latents(pipe, prompt=targets, inversion=batched, attention_control=control)
    for k, blend in enumerate(blends):
        control = dataclasses.replace(EDIT, local_blend=blend)
        alone = latents(pipe, prompt=targets[k], inversion=batched[k], attention_control=control)
        assert_rounding_close(together[k : k + 1], alone, ops=edit_ops(STEPS))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pipelines_run(tokenizer_dir, dtype):
    pipe = NegativePromptInversionPipeline(**tiny_components(tokenizer_dir)).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    inv = pipe.invert(scene_image(0), SOURCE, num_inference_steps=2)
    control = dataclasses.replace(EDIT, reweight={"dog": 2.0}, local_blend=LocalBlend(("cat", "dog")))
    out = pipe(
        prompt="a red dog on a white background", inversion=inv, attention_control=control, output_type="np"
    ).images
    assert np.isfinite(out).all()


def test_processors_restored_after_an_exception_inside_a_step(pipe, inversion):
    before = dict(pipe.unet.attn_processors)

    def fail(pipe_, i, t, tensors):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pipe(
            prompt="a blue cat on a white background",
            inversion=inversion,
            callback_on_step_end=fail,
            attention_control=EDIT,
        )
    assert dict(pipe.unet.attn_processors) == before
    latents(pipe, prompt="a blue cat on a white background", inversion=inversion, attention_control=EDIT)  # usable


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(prompt="a blue cat", attention_control=PromptToPrompt(edit_type="replace")),
            "edit_type='replace' needs equal word counts",
        ),
        (
            dict(
                prompt="a blue cat on a white background",
                attention_control=PromptToPrompt(local_blend=LocalBlend(("dog", "cat"))),
            ),
            "LocalBlend.words: 'dog' is not a word of the source prompt",
        ),
        (
            dict(prompt="a blue cat on a white background", attention_control=PromptToPrompt(reweight={"dog": 2.0})),
            "PromptToPrompt.reweight: 'dog' is not a word of the target prompt",
        ),
        (
            dict(prompt="a blue cat on a white background", attention_control=PromptToPrompt(cross_replace_steps=1.5)),
            r"PromptToPrompt.cross_replace_steps must lie in \[0, 1\]",
        ),
        (
            dict(
                prompt="a blue cat on a white background",
                attention_control=PromptToPrompt(self_replace_steps=(0.5, 0.2)),
            ),
            r"PromptToPrompt.self_replace_steps must lie in \[0, 1\]",
        ),
        (
            dict(
                prompt="a blue cat on a white background",
                attention_control=PromptToPrompt(cross_replace_steps={"dog": 0.3}),
            ),
            "PromptToPrompt.cross_replace_steps: 'dog' is not a word of any target",
        ),
        (
            dict(prompt=[], attention_control=PromptToPrompt(cross_replace_steps=0.4)),
            "prompt must be a string or a non-empty list",
        ),
        (
            dict(prompt="a blue cat", attention_control=PromptToPrompt(edit_type="swap")),
            "PromptToPrompt.edit_type must be one of",
        ),
        (
            dict(
                prompt="a red dog on a white background",
                attention_control=PromptToPrompt(local_blend=LocalBlend(("cat", "dog"), map_level=7)),
            ),
            "LocalBlend.map_level must be an integer in",
        ),
        (
            dict(
                prompt="a red dog on a white background",
                attention_control=PromptToPrompt(local_blend=LocalBlend(("cat", "dog"), map_level=True)),
            ),
            "LocalBlend.map_level must be an integer in",
        ),
        (
            dict(
                prompt="a red dog on a white background",
                attention_control=PromptToPrompt(local_blend=LocalBlend(("cat", "dog"), map_level="fine")),
            ),
            r"LocalBlend.map_level must be a level \(an integer\), 'finest' or None, got 'fine'",
        ),
        (
            dict(
                prompt=BACKGROUND,
                attention_control=PromptToPrompt(local_blend=LocalBlend(("cat", "cat"), keep="objects")),
            ),
            "LocalBlend.keep must be True, False or a list of them",
        ),
        (
            dict(
                prompt=BACKGROUND,
                attention_control=PromptToPrompt(local_blend=LocalBlend(("cat", "cat"), keep=[True] * 2)),
            ),
            "LocalBlend.keep has 2 flags for 1 images",
        ),
        (
            dict(
                prompt=BACKGROUND, attention_control=PromptToPrompt(local_blend=LocalBlend(("cat", "cat"), stop=1.5))
            ),
            r"LocalBlend.stop must lie in \[0, 1\]",
        ),
        (
            dict(
                prompt=BACKGROUND, attention_control=PromptToPrompt(local_blend=LocalBlend(("cat", "cat"), stop=0.1))
            ),
            r"LocalBlend.stop must be at least LocalBlend.start \(0.2\)",
        ),
    ],
)
def test_bad_input_is_rejected_and_pipeline_stays_usable(pipe, inversion, kwargs, message):
    before = dict(pipe.unet.attn_processors)
    with UNetCalls(pipe.unet) as calls, pytest.raises(ValueError, match=message):
        pipe(inversion=inversion, **kwargs)
    assert calls.batches == [] and dict(pipe.unet.attn_processors) == before


def test_attention_heat_map_grid(pipe, inversion):
    out = pipe(
        prompt="a red dog on a white background",
        inversion=inversion,
        return_attention_maps=True,
        attention_control=EDIT,
    )
    grid = pipe.attention_heat_maps(out.attention_maps[0], "a red dog on a white background", image=out.images[0])
    assert grid.size == (8 * 96, 2 * (96 + 14))  # 9 tokens: BOS, 7 words, EOS
    maps = out.attention_maps[0]
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:2]))  # averaged probabilities
