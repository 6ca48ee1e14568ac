"""A CLIP-style byte-level BPE tokenizer in which every toy-world word is one token.

Why: the toy text encoder should see one embedding per word (so prompt-to-prompt
word indices are token indices minus one) while the folder stays a standard
``transformers.CLIPTokenizer`` that ``StableDiffusionPipeline`` loads unchanged.

The vocabulary follows CLIP's layout exactly: the 256 byte-level characters, the
same 256 with ``</w>``, one entry per BPE merge, then ``<|startoftext|>`` and
``<|endoftext|>`` (also unk and pad). The merges are learned by a tiny
deterministic BPE trainer on the grammar words, run until every word is a single
symbol, so BPE encoding reproduces one token per word; any other text still
tokenises through the single-character fallback entries.

API: ``vocab_and_merges()``, ``word_ids()`` (word -> id), ``special_ids()``
(bos, eos), ``save_tokenizer(folder)`` (writes and verifies the folder, returns the
loaded ``CLIPTokenizer``). Only ``save_tokenizer`` imports transformers.
"""
from __future__ import annotations

import functools
import json
import os

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


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
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out
    return merges


@functools.lru_cache(maxsize=None)
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from .scenes import WORDS  # lazy: scenes imports this module

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
    from .scenes import WORDS

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

    vocab, merges = vocab_and_merges()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = dict(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="CLIPTokenizer", model_max_length=MAX_LENGTH,
                       do_lower_case=True, errors="replace", add_prefix_space=False, **specials), f, indent=2)
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
