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


def word_token_indices(prompt: str, tokenizer) -> list[list[int]]:
    """Token positions (BOS = 0) of each space-separated word of ``prompt``; multi-token words get all theirs.

    CLIP's pre-tokeniser never merges across spaces, so tokenising word by word reproduces the prompt's tokens;
    this is checked, so a tokenizer that breaks the assumption fails loudly instead of misplacing edits.
    """
    max_len = tokenizer.model_max_length
    words = prompt.split(" ")
    indices, position = [], 1
    for word in words:
        count = len(tokenizer(word, add_special_tokens=False).input_ids)
        indices.append([p for p in range(position, position + count) if p < max_len - 1])
        position += count
    expected = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    if position - 1 != expected:
        raise ValueError(
            f"Cannot map the words of {prompt!r} to tokens: word-by-word tokenisation gives {position - 1} tokens,"
            f" the whole prompt {expected}."
        )
    return indices


def find_word(prompt: str, word: str, tokenizer) -> list[int]:
    """Token positions of every occurrence of ``word`` (a space-free string) in ``prompt``; [] if absent.

    Raises if ``word`` occurs only past the text encoder's token limit: an edit of it would silently do nothing.
    """
    occurrences = [positions for w, positions in zip(prompt.split(" "), word_token_indices(prompt, tokenizer))
                   if w == word]
    if occurrences and not any(occurrences):
        raise ValueError(
            f"{word!r} lies past the text encoder's {tokenizer.model_max_length} tokens in {prompt!r}, so it cannot be"
            " edited; shorten the prompt."
        )
    return [p for positions in occurrences for p in positions]


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

    Unchanged words map token to token; a swapped word spreads each of its source tokens evenly over the target
    word's tokens (weight 1/len) when the token counts differ. Unlike the reference, the tail after the last swap
    (EOS and padding) stays aligned when a swap changed the token count.
    """
    source_words, target_words = source.split(" "), target.split(" ")
    if len(source_words) != len(target_words):
        raise ValueError(
            f"edit_type='replace' needs equal word counts, got {len(source_words)} words in {source!r} and"
            f" {len(target_words)} in {target!r}; use edit_type='refine' (or None) for added or removed words."
        )
    max_len = tokenizer.model_max_length
    matrix = torch.zeros(max_len, max_len)
    matrix[0, 0] = 1.0
    source_tokens = word_token_indices(source, tokenizer)
    target_tokens = word_token_indices(target, tokenizer)
    for src, tgt in zip(source_tokens, target_tokens):
        if len(src) == len(tgt):
            matrix[src, tgt] = 1.0
        elif src and tgt:
            matrix[torch.tensor(src)[:, None], torch.tensor(tgt)[None, :]] = 1.0 / len(tgt)
    i = 1 + sum(map(len, source_tokens))
    j = 1 + sum(map(len, target_tokens))
    while i < max_len and j < max_len:
        matrix[i, j] = 1.0
        i, j = i + 1, j + 1
    return TokenEdit(matrix, torch.zeros(max_len), torch.ones(max_len))


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
            raise ValueError(f"reweight word {word!r} is not in the target prompt {target!r}.")
        scale[positions] = float(factor)
    return TokenEdit(edit.matrix, edit.keep, scale)


# ---------------------------------------------------------------------------------------------------------------
# Time windows


def check_window(name: str, window) -> tuple[float, float]:
    is_number = lambda value: isinstance(value, numbers.Real) and not isinstance(value, bool)  # noqa: E731
    pair = (0.0, window) if is_number(window) else tuple(window) if isinstance(window, (tuple, list)) else ()
    if not (len(pair) == 2 and all(map(is_number, pair)) and 0.0 <= pair[0] <= pair[1] <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1] (a fraction of the steps, or a (start, end) pair), got {window!r}.")
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
            raise ValueError(f"cross_replace_steps word {word!r} is in none of the target prompts {targets!r}.")
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
