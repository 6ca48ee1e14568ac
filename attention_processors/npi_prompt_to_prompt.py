"""Prompt-to-prompt (Hertz et al. 2022) for real images: token maps, edits and attention rules.

Every prompt-to-prompt edit of a target's cross-attention map is one *linear map on token maps*: with ``base`` the
source's probabilities and ``own`` the target's (both ``(..., query, tokens)``),

    edited = (base @ matrix + own * keep) * scale            # ``TokenEdit``
    new    = alpha[step] * edited + (1 - alpha[step]) * own   # cross_replace_steps window

- word swap:   ``matrix`` maps each source token to its target token(s); ``keep`` = 0.
- refinement:  ``matrix`` gathers the aligned source token; ``keep`` = 1 for target tokens that have none.
- reweighting: ``scale`` multiplies chosen target tokens (applied to whatever the edit produced, as the reference).

So targets of different edit types share one batched computation, and the rule never branches on the edit type.
Text-side helpers run once per call on the CPU; the rules run inside the UNet and read only device tensors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------
# Words and tokens


def _pre_tokens(prompt: str, tokenizer) -> tuple[list[int], list[tuple[range, bool]]]:
    """The prompt's token ids (no BOS / EOS, untruncated) and its pre-tokens: each run of ids that BPE encodes on
    its own, as ``(range of indices into the ids, whether it is a word)``.

    CLIP's tokenizer normalises the text (it lower-cases and drops whitespace), splits it into letter runs, single
    digits, contractions ("'s") and runs of other symbols, and marks the last BPE piece of each with "</w>"; added
    tokens (textual inversion's, SDXL tokenizer_2's "!") stand alone. A pre-token with a letter or digit is a word;
    the others are punctuation, never part of a word. Each pre-token must tokenise alone to the ids it has in the
    prompt (checked), so words compare by token ids, exactly as case-insensitive as the tokenizer.
    """
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    added = set(tokenizer.get_added_vocab().values())
    standalone = [i in added for i in ids]
    ends = [k + 1 for k, piece in enumerate(pieces) if piece.endswith("</w>") or any(standalone[k : k + 2])]
    if ids and ends[-1:] != [len(ids)]:
        raise ValueError(
            f"prompt-to-prompt needs CLIP's BPE tokenizer, which ends each word's last token with '</w>';"
            f" {type(tokenizer).__name__} tokenises {prompt!r} as {pieces}."
        )
    spans = [range(start, end) for start, end in zip([0] + ends, ends)]
    # each pre-token's text from its pieces without the word-end marker (not `decode`, which in transformers 5's
    # CLIPTokenizer stops removing "</w>" once the tokenizer is deep-copied)
    texts = [tokenizer.convert_tokens_to_string([pieces[k].removesuffix("</w>") for k in span]) for span in spans]
    alone = tokenizer(texts, add_special_tokens=False).input_ids if texts else []
    if alone != [ids[span.start : span.stop] for span in spans]:
        raise ValueError(
            f"Cannot map the words of {prompt!r} to tokens: its pieces {texts} tokenised one by one give {alone},"
            f" the whole prompt {ids}."
        )
    return ids, [(span, any(c.isalnum() for c in text)) for span, text in zip(spans, texts)]


def _segments(prompt: str, tokenizer) -> list[list[int]]:
    """Token positions (BOS = 0; only those the text encoder reads) of the prompt's words and of the punctuation
    around them, alternating: ``[punctuation before word 1, word 1, punctuation between words 1 and 2, …, word n,
    punctuation after word n]``."""
    limit = tokenizer.model_max_length - 1
    segments = [[]]
    for span, is_word in _pre_tokens(prompt, tokenizer)[1]:
        positions = [k + 1 for k in span if k + 1 < limit]
        if is_word:
            segments += [positions, []]
        else:
            segments[-1] += positions
    return segments


def word_token_indices(prompt: str, tokenizer) -> list[list[int]]:
    """Token positions (BOS = 0) of each word of ``prompt`` as the tokenizer splits it; multi-token words get all
    theirs. Punctuation is not part of any word and any whitespace separates words."""
    return _segments(prompt, tokenizer)[1::2]


def find_word(prompt: str, word: str, tokenizer) -> list[int]:
    """Token positions of every occurrence of ``word`` in ``prompt``; [] if absent.

    ``word`` is matched by its words' token ids, so punctuation around it and letter case (CLIP lower-cases) do not
    matter; several words ("t-shirt" is "t" and "shirt") match where the prompt has them consecutively. Raises if
    ``word`` occurs only past the text encoder's token limit: an edit of it would silently do nothing.
    """
    query_ids, query = _pre_tokens(word, tokenizer)
    wanted = [tuple(query_ids[k] for k in span) for span, is_word in query if is_word]
    if not wanted:
        return []
    ids, pre_tokens = _pre_tokens(prompt, tokenizer)
    spans = [span for span, is_word in pre_tokens if is_word]
    words = [tuple(ids[k] for k in span) for span in spans]
    n = len(wanted)
    starts = [i for i in range(len(words) - n + 1) if words[i : i + n] == wanted]
    occurrences = [k + 1 for i in starts for span in spans[i : i + n] for k in span]
    positions = [p for p in occurrences if p < tokenizer.model_max_length - 1]
    if occurrences and not positions:
        raise ValueError(
            f"{word!r} lies past the text encoder's {tokenizer.model_max_length} tokens in {prompt!r}, so it cannot be"
            " edited; shorten the prompt."
        )
    return positions


# ---------------------------------------------------------------------------------------------------------------
# Edits: linear maps on token maps


@dataclass
class TokenEdit:
    """``edited = (base @ matrix + own * keep) * scale`` on ``(..., tokens)`` cross-attention maps."""

    matrix: torch.Tensor  # (tokens, tokens): column n = how target token n is made of source tokens
    keep: torch.Tensor  # (tokens,): fraction of the target's own map kept
    scale: torch.Tensor  # (tokens,): re-weighting factors

    def __call__(self, base: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        return (base @ self.matrix + own * self.keep) * self.scale

    def to(self, device) -> "TokenEdit":
        return TokenEdit(self.matrix.to(device), self.keep.to(device), self.scale.to(device))


def stack_edits(edits: list[TokenEdit]) -> TokenEdit:
    """One ``TokenEdit`` for several targets, shaped to broadcast over ``(targets, heads, query, tokens)`` maps."""
    return TokenEdit(
        torch.stack([e.matrix for e in edits])[:, None],
        torch.stack([e.keep for e in edits])[:, None, None],
        torch.stack([e.scale for e in edits])[:, None, None],
    )


def word_swap(source: str, target: str, tokenizer) -> TokenEdit:
    """Replacement edit for prompts with equal word counts (P2P §3.2, "word swap").

    Words pair up in order, and so does the punctuation before, between and after them. Unchanged words map token
    to token; a swapped word spreads each of its source tokens evenly over the target word's tokens (weight 1/len)
    when the token counts differ; target tokens the source lacks (punctuation, or words past its token limit) keep
    the target's own map. Unlike the reference, the tail after the last swap (EOS and padding) stays aligned when a
    swap changed the token count.
    """
    source_segments, target_segments = _segments(source, tokenizer), _segments(target, tokenizer)
    if len(source_segments) != len(target_segments):
        raise ValueError(
            f"edit_type='replace' needs equal word counts, got {len(source_segments) // 2} words in {source!r} and"
            f" {len(target_segments) // 2} in {target!r}; use edit_type='refine' (or None) for added or removed"
            " words."
        )
    max_len = tokenizer.model_max_length
    matrix = torch.zeros(max_len, max_len)
    keep = torch.zeros(max_len)
    matrix[0, 0] = 1.0
    for src, tgt in zip(source_segments, target_segments):
        if len(src) == len(tgt):
            matrix[src, tgt] = 1.0
        elif src and tgt:
            matrix[torch.tensor(src)[:, None], torch.tensor(tgt)[None, :]] = 1.0 / len(tgt)
        else:
            keep[tgt] = 1.0
    i = 1 + sum(map(len, source_segments))
    j = 1 + sum(map(len, target_segments))
    while i < max_len and j < max_len:
        matrix[i, j] = 1.0
        i, j = i + 1, j + 1
    return TokenEdit(matrix, keep, torch.ones(max_len))


def align_tokens(x: list[int], y: list[int]) -> list[int]:
    """Needleman–Wunsch global alignment (gap 0, match 1, mismatch −1) of token ids ``x`` to ``y``.

    Returns, for each position of ``y``, the aligned position in ``x`` or −1. Ties prefer a gap in ``x``, then a
    gap in ``y``, then the diagonal, as the reference implementation does.
    """
    gap, match, mismatch = 0, 1, -1
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]  # 1 = left (gap in x), 2 = up (gap in y), 3 = diagonal
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
        for j in range(1, m + 1):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diagonal = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i][j] = max(left, up, diagonal)
            move[i][j] = 1 if score[i][j] == left else 2 if score[i][j] == up else 3
    aligned = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            aligned[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return aligned


def refinement(source: str, target: str, tokenizer) -> TokenEdit:
    """Refinement edit for added or removed words (P2P §3.2): aligned tokens take the source's map."""
    max_len = tokenizer.model_max_length
    x = tokenizer(source, truncation=True, max_length=max_len).input_ids
    y = tokenizer(target, truncation=True, max_length=max_len).input_ids
    aligned = align_tokens(x, y) + list(range(len(y), max_len))  # padding maps to itself
    matrix = torch.zeros(max_len, max_len)
    keep = torch.zeros(max_len)
    for j, i in enumerate(aligned):
        if i >= 0:
            matrix[i, j] = 1.0
        else:
            keep[j] = 1.0
    return TokenEdit(matrix, keep, torch.ones(max_len))


def reweighting(edit: TokenEdit, target: str, weights: dict[str, float], tokenizer) -> TokenEdit:
    """Multiply the edited maps of ``target``'s words by ``weights`` (P2P §3.2, "attention re-weighting")."""
    scale = edit.scale.clone()
    for word, factor in weights.items():
        if not (isinstance(factor, numbers.Real) and math.isfinite(factor)):
            raise ValueError(f"reweight factor of {word!r} must be a finite number, got {factor!r}.")
        positions = find_word(target, word, tokenizer)
        if not positions:
            raise ValueError(f"PromptToPrompt.reweight: {word!r} is not a word of the target prompt {target!r}.")
        scale[positions] = float(factor)
    return TokenEdit(edit.matrix, edit.keep, scale)


# ---------------------------------------------------------------------------------------------------------------
# Time windows


def check_window(name: str, window) -> tuple[float, float]:
    is_number = lambda value: isinstance(value, numbers.Real) and not isinstance(value, bool)  # noqa: E731
    pair = (0.0, window) if is_number(window) else tuple(window) if isinstance(window, (tuple, list)) else ()
    if not (len(pair) == 2 and all(map(is_number, pair)) and 0.0 <= pair[0] <= pair[1] <= 1.0):
        raise ValueError(
            f"{name} must lie in [0, 1] (a fraction of the steps, or a (start, end) pair), got {window!r}."
        )
    return float(pair[0]), float(pair[1])


def cross_attention_window(num_steps: int, targets: list[str], cross_replace_steps, tokenizer) -> torch.Tensor:
    """Alpha table ``(num_steps + 1, targets, tokens)``: 1 where a target token takes the edited map.

    ``cross_replace_steps`` is a fraction f (window ``[0, int(f·(N+1)))``), a ``(start, end)`` pair, or a dict
    ``{"default_": f, "word": (a, b), ...}`` giving words of the target prompts their own windows.
    """
    windows = dict(cross_replace_steps) if isinstance(cross_replace_steps, dict) else {"default_": cross_replace_steps}
    default = windows.pop("default_", windows.pop("default", (0.0, 1.0)))
    rows = num_steps + 1
    alpha = torch.zeros(rows, len(targets), tokenizer.model_max_length)

    def fill(window, target_index, positions=slice(None)):
        start, end = check_window("cross_replace_steps", window)
        alpha[:, target_index, positions] = 0.0
        alpha[int(start * rows) : int(end * rows), target_index, positions] = 1.0

    for t in range(len(targets)):
        fill(default, t)
    for word, window in windows.items():
        found = [find_word(target, word, tokenizer) for target in targets]
        if not any(found):
            raise ValueError(
                f"PromptToPrompt.cross_replace_steps: {word!r} is not a word of any target prompt {targets!r}."
            )
        for t, positions in enumerate(found):
            if positions:
                fill(window, t, positions)
    return alpha


def self_attention_window(num_steps: int, self_replace_steps) -> torch.Tensor:
    """Boolean ``(num_steps,)``: steps ``[int(N·start), int(N·end))`` replace the target's self-attention."""
    start, end = check_window("self_replace_steps", self_replace_steps)
    on = torch.zeros(num_steps, dtype=torch.bool)
    on[int(num_steps * start) : int(num_steps * end)] = True
    return on


# ---------------------------------------------------------------------------------------------------------------
# Attention rule (see npi_controlled_attention.ControlledAttnProcessor; self-attention replacement is
# npi_mutual_self_attention.MutualSelfAttention with borrow=("query", "key"))


def at_step(table: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``table[step]`` for a 0-dim device tensor ``step`` without a host sync (plain indexing would call
    ``.item()``, which also breaks CUDA-graph capture)."""
    return table.index_select(0, step.view(1))[0]


class CrossAttentionControl:
    """Prompt-to-prompt cross-attention for the conditional ``rows``, with fused kernels only.

    Among ``rows``, ``targets[j]`` gets ``edits`` (a ``stack_edits`` result) applied against ``sources[j]`` inside
    its ``alpha[step]`` window (positions in ``rows``). The edited map ``α·(base @ M + own·keep)·scale + (1 − α)·own``
    is linear in the two softmax maps, and α, keep and scale act per token, so its output splits into two fused
    attentions and no probabilities are materialised:

        new @ V_t = softmax(Q_s K_sᵀ) @ (M·diag(α·scale) V_t)  +  softmax(Q_t K_tᵀ) @ (diag(α·keep·scale + 1 − α) V_t)

    Only at the map size ``store`` keeps are the edited maps of ``rows`` computed explicitly, for the store.
    """

    def __init__(self, step, rows, sources, targets, edits: TokenEdit | None = None, alpha=None, store=None):
        self.step, self.rows, self.sources, self.targets = step, rows, sources, targets
        self.edits, self.alpha, self.store = edits, alpha, store

    def structure(self) -> tuple:
        """Everything but the tensors' values that shapes the computation (a CUDA-graph key)."""
        store = None if self.store is None else (self.store.length, self.store.size)
        return (type(self).__name__, self.edits is not None, store)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the rule reads or writes (captured graphs use them in place)."""
        edits = [] if self.edits is None else [self.edits.matrix, self.edits.keep, self.edits.scale, self.alpha]
        store = [] if self.store is None else [self.store.sums]
        return [self.step, self.rows, self.sources, self.targets, *edits, *store]

    def __call__(self, query, key, value, attn_mask, scale):
        edited = len(self.targets) > 0
        if edited:
            source_rows, target_rows = self.rows[self.sources], self.rows[self.targets]
            alpha = at_step(self.alpha, self.step)[:, None, None, :]  # (targets, 1, 1, tokens)
            target_value = value[target_rows].float()
            borrowed = ((self.edits.matrix * (alpha * self.edits.scale)) @ target_value).to(value.dtype)
            own = (alpha * self.edits.keep * self.edits.scale + 1 - alpha).transpose(-1, -2) * target_value
            value = value.index_copy(0, target_rows, own.to(value.dtype))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
        if edited:
            mask = None if attn_mask is None else attn_mask[source_rows]
            from_source = F.scaled_dot_product_attention(
                query[source_rows], key[source_rows], borrowed, attn_mask=mask, scale=scale
            )
            out = out.index_add(0, target_rows, from_source)
        if self.store is not None and query.shape[2] == self.store.length:
            self.store.record(self.edited_probs(query, key, attn_mask, scale, alpha if edited else None))
        return out

    def edited_probs(self, query, key, attn_mask, scale, alpha):
        """The maps of ``rows`` (targets edited), explicitly: ``(rows, heads, query, tokens)`` in float32."""
        rows = self.rows
        scores = (query[rows].float() @ key[rows].float().transpose(-1, -2)) * scale
        if attn_mask is not None:
            scores = scores + attn_mask[rows].float()
        probs = scores.softmax(dim=-1)
        if alpha is None:
            return probs
        base, own = probs[self.sources], probs[self.targets]
        return probs.index_copy(0, self.targets, alpha * self.edits(base, own) + (1 - alpha) * own)
