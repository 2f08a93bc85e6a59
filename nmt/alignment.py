"""Word alignments from cross-attention: which source word each output word was translated from,
in Pharaoh format ("i-j": source word i, target word j, both 0-based).

Words are the whitespace-separated tokens of the source line and of the output line. A source
subword belongs to the word its first non-space character falls in (the tokenizer's character
offsets); a target subword to the word the output has reached once it is decoded (the decoded
prefix of the hypothesis), so the words are exactly those of the printed line. Subwords that
are only whitespace belong to no word. The attention weights of a target word's subwords are
summed per source word, and each target word is aligned to the source word with the most
weight: one link per target word, as the attention gives.

Which layer and heads the weights come from is `attention_maps`' choice (the engines read
them); this module only maps subwords to words. No torch.
"""

from __future__ import annotations

import bisect
import re
from typing import Sequence

_WORD = re.compile(r"\S+")


def source_words(line: str, offsets: Sequence[tuple[int, int]]) -> list[int | None]:
    """The word index of each source subword (character `offsets` into `line`), None for a
    subword that is only whitespace."""
    spans = [(m.start(), m.end()) for m in _WORD.finditer(line)]
    starts = [a for a, _ in spans]
    out: list[int | None] = []
    for a, b in offsets:
        piece = line[a:b]
        first = a + (len(piece) - len(piece.lstrip()))
        if first >= b:
            out.append(None)
            continue
        w = bisect.bisect_right(starts, first) - 1
        out.append(w if w >= 0 and first < spans[w][1] else None)
    return out


def target_words(prefix_texts: Sequence[str]) -> list[int | None]:
    """The word index of each target subword, from the decoded text of each prefix of the
    hypothesis (`prefix_texts[k]` = the first k + 1 subwords decoded): the last word once that
    subword is added, None when it only added whitespace. The texts are as printed (line breaks
    already made spaces)."""
    out: list[int | None] = []
    for text in prefix_texts:
        out.append(len(text.split()) - 1 if text and not text[-1].isspace() else None)
    return out


def word_alignment(weights: Sequence[Sequence[float]], src_words: Sequence[int | None],
                   tgt_words: Sequence[int | None]) -> list[tuple[int, int]]:
    """(source word, target word) pairs, sorted: each target word to the source word that its
    subwords' attention `weights` [target subword][source subword] put the most weight on."""
    mass: dict[int, dict[int, float]] = {}
    for row, j in zip(weights, tgt_words):
        if j is None:
            continue
        per_word = mass.setdefault(j, {})
        for w, i in zip(row, src_words):
            if i is not None:
                per_word[i] = per_word.get(i, 0.0) + w
    pairs = [(max(per_word, key=lambda i: (per_word[i], -i)), j) for j, per_word in mass.items() if per_word]
    return sorted(pairs)


def pharaoh(pairs: Sequence[tuple[int, int]]) -> str:
    return " ".join(f"{i}-{j}" for i, j in pairs)
