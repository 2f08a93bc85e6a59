"""Translation directions and their target-language tags: which pairs a model was trained on,
and which tag tells it the language to produce.

A model trained on several directions (`nmt train --pairs es-en,en-es`) has one target-language
tag per target language, `<2en>`, `<2es>`…, put first on the source side (Johnson et al. 2017;
Marian's `>>xx<<`). A tag is a special token of the tokenizer: one id, trained as a special
(never split, never merged), dropped when ids are decoded to text, and never produced from
text (nmt's tokenizers encode a literal "<2en>" in a user's line as plain characters), so it
enters a sequence only as an id, here. A one-direction model has no tag and its tokenizer is
exactly what it was before tags existed.

This module parses `--pairs`, names the tags, and resolves `--tgt-lang` to the ids prepended to
each source (`source_prefix`); the corpora behind each pair are `mixing`'s business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from nmt.errors import NmtError, UsageError

LANGUAGE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")  # a file suffix: es, en, pt_BR, zh


def tag(lang: str) -> str:
    """The target-language tag of `lang`: `<2en>`."""
    return f"<2{lang}>"


@dataclass(frozen=True)
class Directions:
    """The (source, target) language pairs of a run or a model, in the order given."""

    pairs: tuple[tuple[str, str], ...]
    tagged: bool | None = None  # sources carry the target tag: None → when there are several pairs

    def __post_init__(self):
        if self.tagged is None:
            object.__setattr__(self, "tagged", len(self.pairs) > 1)

    @property
    def multi(self) -> bool:
        """Several directions (every source then carries its target language's tag)."""
        return len(self.pairs) > 1

    @property
    def targets(self) -> list[str]:
        return sorted({t for _, t in self.pairs})

    @property
    def tags(self) -> list[str]:
        """The special tokens the tokenizer needs (none for an untagged, one-direction model)."""
        return [tag(t) for t in self.targets] if self.tagged else []

    def text(self) -> str:
        return ",".join(f"{s}-{t}" for s, t in self.pairs)

    def languages(self) -> list[str]:
        return sorted({x for pair in self.pairs for x in pair})


def parse_pairs(text: str) -> Directions:
    """`es-en,en-es` → Directions; a malformed or repeated pair is a usage error naming it."""
    pairs: list[tuple[str, str]] = []
    for item in text.split(","):
        parts = item.strip().split("-")
        if len(parts) != 2 or not all(LANGUAGE.match(p) for p in parts) or parts[0] == parts[1]:
            raise UsageError(f"--pairs: cannot read {item.strip()!r} (expected SRC-TGT pairs of two different "
                             f"language codes, comma-separated: es-en,en-es)")
        pair = (parts[0], parts[1])
        if pair in pairs:
            raise UsageError(f"--pairs: {pair[0]}-{pair[1]} is given twice")
        pairs.append(pair)
    return Directions(tuple(pairs))


def of_run(src: str, tgt: str, pairs: list[str]) -> Directions:
    """A run's directions: `--pairs` if given, else the one pair --src → --tgt."""
    return parse_pairs(",".join(pairs)) if pairs else Directions(((src, tgt),))


def of_model(config: dict[str, Any], what: str) -> Directions:
    """The directions a model directory's config.json records (untrusted: checked); a model from
    before directions were recorded has the one pair src → tgt."""
    pairs, tagged = config.get("directions"), config.get("tagged")
    if tagged is not None and not isinstance(tagged, bool):
        raise NmtError(f"{what}: tagged must be true or false")
    if pairs is None:
        src, tgt = config.get("src"), config.get("tgt")
        if not (isinstance(src, str) and isinstance(tgt, str)):
            return Directions(())
        return Directions(((src, tgt),))
    if not (isinstance(pairs, list) and pairs and all(isinstance(p, str) for p in pairs)):
        raise NmtError(f"{what}: directions must be a list of SRC-TGT strings")
    try:
        return Directions(parse_pairs(",".join(pairs)).pairs, tagged)
    except UsageError as e:
        raise NmtError(f"{what}: {e}") from None


def tag_ids(tokenizer, directions: Directions, what: str) -> dict[str, int]:
    """Target language → its tag's id in `tokenizer` (the source side's); a tag missing, or not
    a special token (so it could be split, or appear in output text), is an error naming it."""
    specials = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    ids = {}
    for lang in directions.targets if directions.tagged else []:
        i = tokenizer.token_to_id(tag(lang))
        if i is None or i not in specials:
            raise NmtError(f"{what}: the tokenizer has no special token {tag(lang)} for target language {lang} "
                           f"(its vocabulary cannot change: train a model on these directions from the start)")
        ids[lang] = i
    return ids


def source_prefix(directions: Directions, ids: dict[str, int], tgt_lang: str | None) -> tuple[int, ...]:
    """The ids to put before every source for `--tgt-lang`: the tag on a tagged model (a usage
    error naming the choices when none is given and it has several), nothing on an untagged
    one-direction model (whose target language, if named, must be its own)."""
    if not directions.tagged:
        own = directions.pairs[0][1] if directions.pairs else None
        if tgt_lang is not None and own is not None and tgt_lang != own:
            raise UsageError(f"--tgt-lang {tgt_lang}: this model translates {directions.text()} only "
                             f"(it can produce {own})")
        return ()
    if tgt_lang is None and len(directions.targets) == 1:
        tgt_lang = directions.targets[0]
    if tgt_lang is None:
        raise UsageError(f"this model translates several directions ({directions.text()}): choose the output "
                         f"language with --tgt-lang ({', '.join(directions.targets)})")
    if tgt_lang not in ids:
        raise UsageError(f"--tgt-lang {tgt_lang}: this model produces {', '.join(directions.targets)} "
                         f"(directions {directions.text()})")
    return (ids[tgt_lang],)
