"""Prompts as people write them: prompt-to-prompt reads the words the tokenizer sees. Punctuation is its own token and
never part of a word, any whitespace separates words, and words match as case-insensitively as CLIP's tokenizer
(it lower-cases), on SD 1.x and on SDXL's pair of tokenizers.

"The same edit" for a punctuated prompt and its unpunctuated twin: every word token, BOS, EOS and padding of the
twin's edit is carried to its position in the punctuated prompt (punctuation shifts the positions after it) with
the same value, and each punctuation token maps to its counterpart in the other prompt."""

import copy

import pytest
import torch
from conftest import UNetCalls, scene_image
from transformers import CLIPTokenizer

from negative_prompt_inversion import pipeline_negative_prompt_inversion as npi
from negative_prompt_inversion.attention_processors import npi_prompt_to_prompt as p2p
from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    LocalBlend,
    NegativePromptInversionPipeline,
    PromptToPrompt,
)
from toy_world.tokenizer import save_tokenizer


STEPS = 3
PIE_SOURCE = "a photo of a cat, on the grass"  # PIE-Bench style: a comma, and "grass" splits into several tokens
PIE_TARGET = "a photo of a dog, on the grass"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def pie_inversion(components):
    """An inversion of a PIE-Bench-style source prompt, shared by the tests that only read it."""
    pipe = NegativePromptInversionPipeline(**copy.deepcopy(components))
    pipe.set_progress_bar_config(disable=True)
    return pipe.invert(scene_image(0), PIE_SOURCE, num_inference_steps=STEPS)


def token_count(prompt: str, tok) -> int:
    return len(tok(prompt, add_special_tokens=False).input_ids)


def carry(plain: str, punctuated: str, tok) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Positions of ``plain`` (BOS, its words' tokens, EOS, the padding that still fits) and the positions they
    take in ``punctuated`` (the same words with punctuation added), and the punctuation's positions there."""
    plain_words, words = p2p.word_token_indices(plain, tok), p2p.word_token_indices(punctuated, tok)
    assert [len(w) for w in plain_words] == [len(w) for w in words]  # the same words, the same pieces
    shift = token_count(punctuated, tok) - token_count(plain, tok)
    tail = range(token_count(plain, tok) + 1, tok.model_max_length - shift)
    source = [0, *(p for w in plain_words for p in w), *tail]
    to = [0, *(p for w in words for p in w), *(p + shift for p in tail)]
    punctuation = sorted(set(range(1, token_count(punctuated, tok) + 1)) - set(to))
    return torch.tensor(source), torch.tensor(to), punctuation


def carried_edit(plain_edit: p2p.TokenEdit, plain: tuple[str, str], punctuated: tuple[str, str], tok) -> p2p.TokenEdit:
    """``plain_edit`` carried to the punctuated prompts: its entries at their new positions, each punctuation token
    of the target taking its counterpart's map (and no re-weighting)."""
    src_from, src_to, src_punct = carry(plain[0], punctuated[0], tok)
    tgt_from, tgt_to, tgt_punct = carry(plain[1], punctuated[1], tok)
    assert len(src_punct) == len(tgt_punct)  # the same punctuation in both prompts
    size = tok.model_max_length
    matrix, keep, scale = torch.zeros(size, size), torch.zeros(size), torch.ones(size)
    matrix[src_to[:, None], tgt_to[None, :]] = plain_edit.matrix[src_from[:, None], tgt_from[None, :]]
    matrix[src_punct, tgt_punct] = 1.0
    keep[tgt_to], scale[tgt_to] = plain_edit.keep[tgt_from], plain_edit.scale[tgt_from]
    return p2p.TokenEdit(matrix, keep, scale)


def token_edit(control: PromptToPrompt, source: str, target: str, tok) -> p2p.TokenEdit:
    """The edit the pipeline builds for one target (edit type chosen by word count unless given, re-weighting)."""
    branch = npi.Branch(0, source, target, False, "source", True)
    return control.token_edit(branch, control.reweight, tok)


def assert_same_edit(actual: p2p.TokenEdit, expected: p2p.TokenEdit):
    assert torch.equal(actual.matrix, expected.matrix)
    assert torch.equal(actual.keep, expected.keep)
    assert torch.equal(actual.scale, expected.scale)


# --------------------------------------------------------------------------------------------------------------
# Words


def test_punctuation_is_its_own_token_and_never_part_of_a_word(tok):
    assert p2p.word_token_indices("a cat on the wall", tok) == [[1], [2], [3], [4], [5]]
    assert p2p.word_token_indices("a cat, on the wall.", tok) == [[1], [2], [4], [5], [6]]  # "," is 3, "." is 7
    assert p2p.word_token_indices("(a hippopotamus!)", tok) == [[2], [3, 4]]  # a two-token word stays whole
    assert p2p.word_token_indices(",.!", tok) == []


@pytest.mark.parametrize(
    "written", ["a  cat on the wall", "a cat\non the wall", " a\tcat \n on  the wall\n", "A Cat On The Wall"]
)
def test_any_whitespace_separates_words_and_case_follows_the_tokenizer(tok, written):
    assert p2p.word_token_indices(written, tok) == p2p.word_token_indices("a cat on the wall", tok)
    assert p2p.find_word(written, "cat", tok) == [2]


@pytest.mark.parametrize("word", ["cat", "Cat", "CAT", "cat,", "(cat)", "cat!", " cat\n"])
def test_a_word_matches_whatever_punctuation_surrounds_it_and_whatever_its_case(tok, word):
    assert p2p.find_word("a photo of a cat, on the grass", word, tok) == [5]
    assert p2p.find_word("A Cat! on a (cat).", word, tok) == [2, 7]


def test_several_words_match_consecutive_words_and_punctuation_alone_matches_nothing(tok):
    assert p2p.find_word("a red-cat on a wall", "red cat", tok) == [2, 4]  # the words' tokens, not the hyphen
    assert p2p.find_word("a red, big cat", "red-big", tok) == [2, 4]
    assert p2p.find_word("a cat red on a wall", "red cat", tok) == []
    assert p2p.find_word("a cat, on a wall", ",", tok) == []


def test_the_toy_worlds_tokenizer_reads_words_alike(tmp_path):
    toy = save_tokenizer(str(tmp_path))
    plain, punctuated = (
        ("a red circle on a blue background", "a green circle on a blue background"),
        ("a red circle, on a blue background.", "A Green Circle,\non a blue  background."),
    )
    assert p2p.word_token_indices(punctuated[1], toy) == [[1], [2], [3], [5], [6], [7], [8]]
    assert p2p.find_word(punctuated[1], "green!", toy) == [2]
    edit = token_edit(PromptToPrompt(), *punctuated, toy)
    assert_same_edit(edit, carried_edit(p2p.word_swap(*plain, toy), plain, punctuated, toy))


def test_a_non_clip_tokenizer_is_refused(tok, monkeypatch):
    monkeypatch.setattr(type(tok), "convert_ids_to_tokens", lambda self, ids: ["piece"] * len(ids))
    with pytest.raises(ValueError, match="needs CLIP's BPE tokenizer"):
        p2p.word_token_indices("a cat", tok)


# --------------------------------------------------------------------------------------------------------------
# The same edit with and without punctuation


CAT, DOG = "a cat on the wall", "a dog on the wall"
PUNCTUATED = {  # each plain prompt written as people do
    CAT: "a cat, on the wall.",
    DOG: "a dog, on the wall.",
    "a hippopotamus on the wall": "a hippopotamus, on the wall.",
    "a big cat on the wall": "a big cat, on the wall.",
    "a cat on the grass": "(a cat), on the grass!",
    "a big cat on the grass": "(a big cat), on the grass!",
}


@pytest.mark.parametrize(
    "source, target, control",
    [
        (CAT, DOG, PromptToPrompt()),  # word swap
        (CAT, "a hippopotamus on the wall", PromptToPrompt()),  # word swap onto a two-token word
        (CAT, "a big cat on the wall", PromptToPrompt()),  # refinement
        ("a cat on the grass", "a big cat on the grass", PromptToPrompt()),  # refinement, punctuation at both ends
        (CAT, DOG, PromptToPrompt(reweight={"dog": 2.0, "wall": 0.5})),  # re-weighting a swap
        (CAT, "a big cat on the wall", PromptToPrompt(reweight={"big": 3.0})),  # re-weighting a refinement
        (CAT, CAT, PromptToPrompt(edit_type="refine")),  # refinement of the same prompt: the identity
    ],
)
def test_edits_of_punctuated_prompts_are_the_same_edits(tok, source, target, control):
    plain = token_edit(control, source, target, tok)
    punctuated = token_edit(control, PUNCTUATED[source], PUNCTUATED[target], tok)
    assert_same_edit(punctuated, carried_edit(plain, (source, target), (PUNCTUATED[source], PUNCTUATED[target]), tok))


def test_word_swap_counts_words_not_spaces(tok):
    """The issue's example: a newline and a double space do not add words, and the comma is no part of one."""
    target = "a photo of  a dog,\non the grass"
    written = token_edit(PromptToPrompt(), PIE_SOURCE, target, tok)
    assert_same_edit(written, p2p.word_swap(PIE_SOURCE, PIE_TARGET, tok))
    assert written.matrix[5, 5] == 1 and written.matrix[6, 6] == 1  # cat → dog, and "," → ","
    # the explicit edit type agrees, and refinement (which the old space count picked) is another edit
    assert_same_edit(token_edit(PromptToPrompt(edit_type="replace"), PIE_SOURCE, target, tok), written)
    assert not torch.equal(p2p.refinement(PIE_SOURCE, PIE_TARGET, tok).matrix, written.matrix)


def test_punctuation_the_source_lacks_keeps_the_targets_own_map(tok):
    edit = p2p.word_swap(CAT, "a dog, on the wall!", tok)
    plain = p2p.word_swap(CAT, DOG, tok)
    assert edit.keep.nonzero().flatten().tolist() == [3, 7]  # "," and "!"
    assert edit.matrix[:, [3, 7]].sum() == 0
    assert torch.equal(edit.matrix[:6, [0, 1, 2, 4, 5, 6]], plain.matrix[:6, :6])  # BOS and words as without them
    assert edit.matrix[6, 8] == 1  # EOS stays aligned


def test_word_windows_of_punctuated_prompts_are_the_same_windows(tok):
    plain_targets, targets = [DOG, "a big cat on the wall"], [PUNCTUATED[DOG], PUNCTUATED["a big cat on the wall"]]
    plain = p2p.cross_attention_window(STEPS, plain_targets, {"default_": 0.5, "dog": (0.0, 0.3), "big": 1.0}, tok)
    windows = p2p.cross_attention_window(STEPS, targets, {"default_": 0.5, "Dog,": (0.0, 0.3), "(BIG)": 1.0}, tok)
    default = p2p.cross_attention_window(STEPS, targets, 0.5, tok)
    for t, (plain_target, target) in enumerate(zip(plain_targets, targets)):
        source, to, punctuation = carry(plain_target, target, tok)
        assert torch.equal(windows[:, t, to], plain[:, t, source])
        assert torch.equal(windows[:, t, punctuation], default[:, t, punctuation])


def blend_weights(blend: LocalBlend, source: str, target: str, tok) -> torch.Tensor:
    """``LocalBlend``'s per-branch token weights for one image and one target (text side only)."""
    branches = [
        npi.Branch(0, source, source, True, "source", False),
        npi.Branch(0, source, target, False, "source", True),
    ]
    plan = npi.EditPlan(branches, None, [], STEPS, torch.zeros((), dtype=torch.long), None, tok, torch.device("cpu"))
    return blend.prepare(plan).weights


def test_blend_words_of_punctuated_prompts_weigh_the_same_tokens(tok):
    plain = blend_weights(LocalBlend(("cat", ["dog", "wall"])), CAT, DOG, tok)
    weights = blend_weights(LocalBlend(("Cat,", ["DOG", "wall."])), PUNCTUATED[CAT], PUNCTUATED[DOG], tok)
    for row, prompts in enumerate([(CAT, PUNCTUATED[CAT]), (DOG, PUNCTUATED[DOG])]):
        source, to, punctuation = carry(*prompts, tok)
        assert torch.equal(weights[row, to], plain[row, source])
        assert weights[row, punctuation].eq(0).all()
    assert plain.sum() == 3  # the test weighs something: "cat"; "dog" and "wall"


# --------------------------------------------------------------------------------------------------------------
# Words that are not in the prompt


@pytest.mark.parametrize(
    "control, message",
    [
        (
            PromptToPrompt(local_blend=LocalBlend(("dog", "dog"))),
            r"LocalBlend.words: 'dog' is not a word of the source prompt 'a photo of a cat, on the grass'",
        ),
        (
            PromptToPrompt(local_blend=LocalBlend(("cat", ","))),
            r"LocalBlend.words: ',' is not a word of the target prompt 'a photo of a dog, on the grass'",
        ),
        (
            PromptToPrompt(reweight={"cat": 2.0}),
            r"PromptToPrompt.reweight: 'cat' is not a word of the target prompt 'a photo of a dog, on the grass'",
        ),
        (
            PromptToPrompt(cross_replace_steps={"default_": 0.4, "tiger": 0.2}),
            r"PromptToPrompt.cross_replace_steps: 'tiger' is not a word of any target prompt \['a photo of a dog, on",
        ),
    ],
)
def test_a_missing_word_names_the_argument_the_word_and_the_prompt_before_any_unet_pass(
    pipe, pie_inversion, control, message
):
    before = dict(pipe.unet.attn_processors)
    with UNetCalls(pipe.unet) as calls, pytest.raises(ValueError, match=message):
        pipe(prompt=PIE_TARGET, inversion=pie_inversion, attention_control=control)
    assert calls.batches == [] and dict(pipe.unet.attn_processors) == before


# --------------------------------------------------------------------------------------------------------------
# End to end, on SD 1.x and SDXL


def edits_as_written_and_canonical(pipe, inversion):
    """One edit with the prompt and its words typed loosely, and the same edit typed canonically."""
    written = PromptToPrompt(
        cross_replace_steps={"default_": 0.8, "Dog!": (0.0, 0.4)},
        reweight={"(DOG)": 2.0},
        local_blend=LocalBlend((("Cat,",), ("dog.",)), start=0.0),
    )
    canonical = PromptToPrompt(
        cross_replace_steps={"default_": 0.8, "dog": (0.0, 0.4)},
        reweight={"dog": 2.0},
        edit_type="replace",
        local_blend=LocalBlend((("cat",), ("dog",)), start=0.0),
    )
    target = inversion.source_prompts[0].replace("cat", "dog")
    loose = "  " + target.replace("a photo", "A  Photo").replace("dog", "Dog").replace(" on", "\non\t") + "\n"
    out = [
        pipe(prompt=prompt, inversion=inversion, attention_control=control, output_type="latent").images
        for prompt, control in ((loose, written), (target, canonical))
    ]
    return out


def test_pie_bench_prompts_with_commas_edit_end_to_end(pipe, pie_inversion):
    written, canonical = edits_as_written_and_canonical(pipe, pie_inversion)
    assert torch.isfinite(canonical).all()
    assert torch.equal(written, canonical)


def test_sdxl_reads_words_as_written_with_both_tokenizers(sdxl_pipe):
    # tokenizer_2 pads with "!" and so reads a typed "!" as its padding token: the same piece at the same position
    source = "a photo of a cat, on the grass!"
    assert sdxl_pipe._token_ids(source) == sdxl_pipe.tokenizer(source, add_special_tokens=False).input_ids
    words = [p2p.word_token_indices(source, tokenizer) for tokenizer in (sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2)]
    assert words[0] == words[1]
    inversion = sdxl_pipe.invert(scene_image(0, 64), source, num_inference_steps=STEPS)
    written, canonical = edits_as_written_and_canonical(sdxl_pipe, inversion)
    assert torch.isfinite(canonical).all()
    assert torch.equal(written, canonical)
