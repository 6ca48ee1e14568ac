"""CLIP-style byte-level BPE tokenizers in which chosen words are single tokens.

Why: the toy text encoder should see one embedding per word (so prompt-to-prompt
word indices are token indices minus one) while the folder stays a standard
``transformers.CLIPTokenizer`` that ``StableDiffusionPipeline`` loads unchanged.
Tests and benchmarks need the same kind of tokenizer for their own word lists.

The vocabulary follows CLIP's layout exactly: the 256 byte-level characters, the
same 256 with ``</w>``, one entry per BPE merge, then ``<|startoftext|>`` and
``<|endoftext|>`` (also unk and pad). Any other text still tokenises through the
single-character fallback entries.

* ``write_word_tokenizer(folder, words, split_words={})``: any word list. Each
  word's characters are merged left to right (merges shared between words are
  listed once), so it encodes as one token; each ``split_words`` entry
  (word -> its pieces) encodes as one token per piece, unless an earlier word's
  merge fires first inside a later word (checked unless ``strict=False``). Writes
  the folder without importing transformers.
* The toy world's tokenizer, over the grammar words (``vocabulary.WORDS``): its
  merges are learned by a tiny deterministic BPE trainer, run until every word is a
  single symbol. API: ``vocab_and_merges()``, ``word_ids()`` (word -> id),
  ``special_ids()`` (bos, eos), ``save_tokenizer(folder)`` (writes and verifies the
  folder, returns the loaded ``CLIPTokenizer``). Only ``save_tokenizer`` imports
  transformers.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from .vocabulary import WORDS


MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _symbols(piece: str, final: bool) -> list[str]:
    """A piece's byte-level characters, the last marked as a word end when ``final``."""
    byte_chr = bytes_to_unicode()
    chars = [byte_chr[b] for b in piece.encode("utf-8")]
    return chars[:-1] + [chars[-1] + "</w>"] if final else chars


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: merge the best-ranked adjacent pair (every occurrence) until none has a rank."""
    while len(symbols) > 1:
        pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        symbols = merge_pair(symbols, pair)
    return symbols


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """``symbols`` with every occurrence of the adjacent ``pair`` merged into one symbol, left to right."""
    merged, j = [], 0
    while j < len(symbols):
        if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == pair:
            merged.append(symbols[j] + symbols[j + 1])
            j += 2
        else:
            merged.append(symbols[j])
            j += 1
    return merged


def word_vocab_and_merges(words, split_words: dict[str, tuple[str, ...]] = {}):
    """Vocabulary and merges in which each of ``words`` is one token and each ``split_words`` entry is one token
    per piece (merges left to right through each word, then each piece; each merge listed once)."""
    base = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for t in base + [c + "</w>" for c in base]:
        vocab.setdefault(t, len(vocab))
    merges: list[tuple[str, str]] = []
    pieces = [(word, True) for word in words]
    for word, parts in split_words.items():
        if "".join(parts) != word or not parts:
            raise ValueError(f"split_words[{word!r}] must be pieces that spell the word, got {parts!r}.")
        pieces += [(part, k == len(parts) - 1) for k, part in enumerate(parts)]
    for piece, final in pieces:
        if not (piece.isalpha() and piece == piece.lower()):
            raise ValueError(f"words must be lower-case letters (CLIP splits and lower-cases text), got {piece!r}.")
        symbols = _symbols(piece, final)
        while len(symbols) > 1:
            if (symbols[0], symbols[1]) not in merges:
                merges.append((symbols[0], symbols[1]))
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def word_pieces(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """The BPE pieces ``word`` encodes as under ``merges`` (what ``CLIPTokenizer`` makes of it)."""
    return _bpe(_symbols(word, final=True), {pair: rank for rank, pair in enumerate(merges)})


def _write_folder(folder, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json, merges.txt and the special-token and tokenizer configs of a ``CLIPTokenizer`` folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = dict(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            dict(
                tokenizer_class="CLIPTokenizer",
                model_max_length=MAX_LENGTH,
                do_lower_case=True,
                errors="replace",
                add_prefix_space=False,
                **specials,
            ),
            f,
            indent=2,
        )


def write_word_tokenizer(folder, words, split_words: dict[str, tuple[str, ...]] = {}, strict: bool = True) -> Path:
    """Write a ``CLIPTokenizer.from_pretrained``-loadable folder in which each of ``words`` (lower-case letters) is
    one token and each ``split_words`` entry (``{"hippopotamus": ("hippo", "potamus")}``) one token per piece.
    Returns the folder.

    A merge listed for an earlier word can fire first inside a later one (``red``'s ``r e`` inside ``green``) and
    leave it in several tokens; ``strict`` raises then, naming the words (reorder them, or split them explicitly).
    ``strict=False`` writes the folder anyway (the test suite's pinned outputs were made with such a vocabulary).
    """
    vocab, merges = word_vocab_and_merges(words, split_words)
    if strict:
        wanted = {word: [word] for word in words} | {word: list(parts) for word, parts in split_words.items()}
        wrong = {}
        for word, parts in wanted.items():
            got = word_pieces(word, merges)
            if got != parts[:-1] + [parts[-1] + "</w>"]:
                wrong[word] = got
        if wrong:
            raise ValueError(f"these words do not encode as asked: {wrong}; reorder the words or split them.")
    _write_folder(folder, vocab, merges)
    return Path(folder)


# -----------------------------------------------------------------------------------------------------------------
# The toy world's tokenizer


def _train_bpe(words) -> list[tuple[str, str]]:
    """Greedy BPE on the word set (each word once; ties broken lexicographically)
    until every word is a single symbol."""
    byte_chr = bytes_to_unicode()
    seqs = []
    for w in words:
        chars = [byte_chr[b] for b in w.encode("utf-8")]
        seqs.append(chars[:-1] + [chars[-1] + "</w>"])
    merges = []
    while any(len(s) > 1 for s in seqs):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        seqs = [merge_pair(s, best) for s in seqs]
    return merges


@functools.lru_cache(maxsize=None)
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = _train_bpe(WORDS)
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


@functools.lru_cache(maxsize=None)
def word_ids() -> dict[str, int]:
    """Token id of each grammar word (its ``word</w>`` entry)."""
    vocab, _ = vocab_and_merges()
    return {w: vocab[w + "</w>"] for w in WORDS}


def special_ids() -> tuple[int, int]:
    vocab, _ = vocab_and_merges()
    return vocab[BOS], vocab[EOS]


def vocab_size() -> int:
    return len(vocab_and_merges()[0])


def save_tokenizer(folder: str):
    """Write a ``CLIPTokenizer.from_pretrained``-loadable folder, verify that every
    grammar word is one token, and return the loaded tokenizer."""
    from transformers import CLIPTokenizer

    _write_folder(folder, *vocab_and_merges())
    tok = CLIPTokenizer.from_pretrained(folder)
    # Re-save through transformers so the folder also carries tokenizer.json.
    tok.save_pretrained(folder)
    tok = CLIPTokenizer.from_pretrained(folder)
    bos, eos = special_ids()
    for w, i in word_ids().items():
        got = tok(w).input_ids
        if got != [bos, i, eos]:
            raise RuntimeError(f"tokenizer check failed for {w!r}: {got}")
    if tok.model_max_length != MAX_LENGTH or tok.pad_token_id != eos:
        raise RuntimeError("tokenizer config check failed")
    return tok
