"""Lines in, lines out: read ahead a window, sort it by length, batch by tokens, search, and hand
the results back in input order.

The line contract: exactly one result per input line, in input order; an empty line gives an
empty result without reaching the model; a line longer than the model's positions is cut to
fit (`batching.cut_source`) and flagged. Results are yielded window by window, so output can be
flushed as it comes and a huge input never sits in memory. Writing them (text or JSON lines)
is the CLI's job.

Scoring given pairs (`Translator.score`, `nmt score`) keeps the same contract over pairs: one
`Score` per pair, in order; a pair with both sides empty gives an empty result, a pair with
one side empty is an error naming the side and its line.

The search itself is an engine (`nmt.engines.Engine`): nmt's beam / greedy / sampling, the
naive reference, or a CTranslate2 export; all of them get exactly this contract and return the
one `Translation` type.

Around the search, per window and all batched: a forced target prefix per line (`prefixes`);
`split_sentences` (a line is cut into sentences, `nmt.sentences`, each searched as a unit in
the same length-sorted batches as every other line, and the translations joined with a space);
the loop guard (`guard`: a unit whose best output fails a check of `nmt.checks` is searched
again, all such units of the window in batches, with a no-repeat n-gram ban); and word
alignments (`alignment`, `nmt.alignment`) from the attention the engine returns.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from nmt import alignment as align
from nmt import engines
from nmt.batching import cut_source
from nmt.checks import failed_check
from nmt.config import DecodeConfig
from nmt.errors import NmtError
from nmt.runtime import Runtime
from nmt.search import Hypothesis, penalty_of
from nmt.textio import in_step, one_line
from nmt.tokenizer import Vocabs, decode_batch, encode_batch

log = logging.getLogger(__name__)

GUARD_NGRAM = 3  # the loop guard's retry bans repeating any 3 target tokens (fairseq's usual size)


@dataclass
class Segment:
    """One sentence of a line translated with `split_sentences`."""

    source: str
    translation: str
    retried: bool = False


@dataclass
class Translation:
    """One input line's result, whatever the engine: its n-best hypotheses (with their text),
    and the line contract's flags."""

    source: str
    hypotheses: list[Hypothesis] = field(default_factory=list)  # best first; empty for an empty line
    empty_input: bool = False
    truncated: bool = False
    retried: bool = False  # the loop guard decoded (a sentence of) it again
    segments: list[Segment] | None = None  # with split_sentences: the sentences and their translations

    @property
    def text(self) -> str:
        return self.hypotheses[0].text if self.hypotheses else ""

    @property
    def alignment(self) -> list[tuple[int, int]] | None:
        return self.hypotheses[0].alignment if self.hypotheses else None

    @property
    def hit_max_length(self) -> bool:
        return bool(self.hypotheses) and self.hypotheses[0].hit_max_length


@dataclass
class Score:
    """One pair's log-probability under the model (teacher forcing): per target token and EOS,
    summed (`logprob`), and normalised as beam search normalises the score it reports
    (`score`: logprob / the length penalty of the target's length with EOS; = logprob when
    scoring without normalisation or with α = 0)."""

    source: str
    target: str
    token_logprobs: list[float] = field(default_factory=list)  # target tokens, then EOS; empty for an empty pair
    logprob: float | None = None
    score: float | None = None
    empty_input: bool = False
    truncated: bool = False  # a side was cut to the source-length limit


@dataclass
class Stats:
    lines: int = 0
    empty: int = 0
    truncated: int = 0
    hit_max_length: int = 0
    retried: int = 0
    target_tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.lines / self.seconds if self.seconds else 0.0
        return (f"translated {self.lines:,} lines ({self.empty:,} empty, {self.truncated:,} truncated, "
                f"{self.hit_max_length:,} hit the length cap, {self.retried:,} retried by the loop guard) in "
                f"{self.seconds:.1f} s: {rate:.1f} sentences/s, "
                f"{self.target_tokens / max(self.seconds, 1e-9):,.0f} target tokens/s")


@dataclass
class _Unit:
    """What one search is about: a line, or one sentence of it (`split_sentences`)."""

    line: int  # index in the window
    source: str
    word_offset: int = 0  # words of the line before this sentence
    prefix_text: str = ""  # the forced target prefix (a line's first sentence only)
    prefix: list[int] = field(default_factory=list)  # its ids
    ids: list[int] = field(default_factory=list)
    offsets: list[tuple[int, int]] = field(default_factory=list)  # character spans of ids (alignment only)
    truncated: bool = False
    retried: bool = False
    hypotheses: list[Hypothesis] = field(default_factory=list)


def word_offsets(line: str, sentences: list[str]) -> list[int]:
    """For each sentence of `line` (in order), the index among the line's whitespace-split words of
    its own first word: its alignment links are shifted by it. A sentence that begins inside a word
    of the line (sentences not parted by a space, as in Chinese or Japanese) shares that word with
    the one before; one not found in the line as it is, is placed after the last one found."""
    offsets, pos = [], 0
    for sentence in sentences:
        start = line.find(sentence, pos)
        at = start if start >= 0 else pos
        inside = 0 < at < len(line) and not line[at - 1].isspace() and not line[at].isspace()
        offsets.append(len(line[:at].split()) - inside)
        if start >= 0:
            pos = start + len(sentence)
    return offsets


class Translator:
    """The line contract around one search engine (`engines.Engine`)."""

    def __init__(self, engine: engines.Engine, vocabs: Vocabs, config: DecodeConfig, src_language: str | None = None,
                 src_prefix: tuple[int, ...] = ()):
        self.engine, self.vocabs, self.config = engine, vocabs, config
        self.src_prefix = tuple(src_prefix)  # ids before every source: a target-language tag (`nmt.directions`)
        self.stats = Stats()
        self.split = None
        if config.split_sentences:
            from nmt.sentences import splitter

            self.split = splitter(src_language)

    @classmethod
    def from_model(cls, model, vocabs: Vocabs, runtime: Runtime, config: DecodeConfig,
                   src_prefix: tuple[int, ...] = ()) -> "Translator":
        """nmt's own search for `config` (beam, greedy or sampling) over a loaded model."""
        return cls(engines.for_model(model, runtime, config), vocabs, config, src_prefix=src_prefix)

    def translate(self, lines: Iterable[str], prefixes: Iterable[str] | None = None,
                  names: tuple[str, str] = ("input", "prefixes")) -> Iterator[Translation]:
        """One Translation per input line, in order; `prefixes`, in step with the lines, are
        forced at the start of their line's translation ("" for none); `names` name the two in
        a line-count error."""
        for window in self.translate_windows(lines, prefixes, names):
            yield from window

    def translate_windows(self, lines: Iterable[str], prefixes: Iterable[str] | None = None,
                          names: tuple[str, str] = ("input", "prefixes")) -> Iterator[list[Translation]]:
        """The translations of each window of input lines, in order: a caller can flush after each."""
        start = time.perf_counter()
        it = iter(lines) if prefixes is None else in_step(lines, prefixes, names)
        while window := list(itertools.islice(it, self.config.window)):
            if prefixes is None:
                results = self._window(window, [""] * len(window))
            else:
                results = self._window([line for line, _ in window], [p for _, p in window])
            self.stats.seconds = time.perf_counter() - start
            yield results

    def _window(self, lines: list[str], prefixes: list[str]) -> list[Translation]:
        """1. lines → units (sentences with split_sentences), 2. encode, 3. search in sorted
        batches, 4. the loop guard's retries, 5. detokenise (and align), 6. units → lines."""
        results = [Translation(line, empty_input=not line.strip()) for line in lines]
        units = self._units(lines, prefixes)
        self._encode(units)
        self._search(units)
        if self.config.guard:
            self._guard(units)
        for unit in units:
            self._finish(unit)
        self._assemble(results, units)
        self._count(results)
        return results

    def _units(self, lines: list[str], prefixes: list[str]) -> list[_Unit]:
        units = []
        for i, (line, prefix) in enumerate(zip(lines, prefixes)):
            if not line.strip():
                continue
            sentences = (self.split(line) if self.split else None) or [line]
            for k, (sentence, words) in enumerate(zip(sentences, word_offsets(line, sentences))):
                units.append(_Unit(i, sentence, words, prefix if k == 0 else ""))
        return units

    def _encode(self, units: list[_Unit]) -> None:
        sources = [u.source for u in units]
        if self.config.alignment:  # the slower call that also gives character offsets
            encodings = self.vocabs.src.encode_batch(sources, add_special_tokens=False)
            pairs = [(e.ids, e.offsets) for e in encodings]
        else:
            pairs = [(ids, []) for ids in encode_batch(self.vocabs.src, sources)]
        with_prefix = [u for u in units if u.prefix_text.strip()]
        for u, ids in zip(with_prefix, encode_batch(self.vocabs.tgt, [u.prefix_text for u in with_prefix])):
            u.prefix = ids
        tag = [(0, 0)] * len(self.src_prefix)  # a target-language tag is no source word (alignment)
        for u, (ids, offsets) in zip(units, pairs):
            u.ids, u.truncated = cut_source([*self.src_prefix, *ids], self.engine.max_positions)
            u.offsets = [*tag, *offsets][: len(u.ids)] if offsets else []

    def _search(self, units: list[_Unit], no_repeat_ngram: int | None = None) -> None:
        """Every unit searched, in batches of similar length; prefixes passed only where given."""
        order = sorted(range(len(units)), key=lambda j: len(units[j].ids))
        for batch in self._batches(order, [len(u.ids) for u in units]):
            prefixes = [units[j].prefix for j in batch]
            found = self.engine.search([units[j].ids for j in batch], prefixes if any(prefixes) else None,
                                       no_repeat_ngram, self.config.alignment)
            for j, hyps in zip(batch, found):
                units[j].hypotheses = hyps

    def _guard(self, units: list[_Unit]) -> None:
        """Units whose best output loops, blows up or hits the cap are searched again, together,
        with repeats of any GUARD_NGRAM tokens banned (one fewer than a --no-repeat-ngram that
        is already that small; with 1, nothing is left to ban)."""
        n = self.config.no_repeat_ngram
        ngram = min(GUARD_NGRAM, n - 1) if n else GUARD_NGRAM
        if ngram < 1:
            return
        best = [u.hypotheses[0] for u in units]
        for h, text in zip(best, decode_batch(self.vocabs.tgt, [h.tokens for h in best])):
            h.text = one_line(text)
        again = [u for u, h in zip(units, best) if failed_check(h.text, u.source, h.hit_max_length)]
        if again:
            self._search(again, ngram)
            for u in again:
                u.retried = True

    def _finish(self, unit: _Unit) -> None:
        """Text (and word alignment) of each hypothesis."""
        hyps = unit.hypotheses
        for h, text in zip(hyps, decode_batch(self.vocabs.tgt, [h.tokens for h in hyps])):
            h.text = one_line(text)
        if not self.config.alignment:
            return
        src_words = align.source_words(unit.source, unit.offsets)
        for h in hyps:
            prefixes = decode_batch(self.vocabs.tgt, [h.tokens[: k + 1] for k in range(len(h.tokens))])
            tgt_words = align.target_words([one_line(t) for t in prefixes])
            pairs = align.word_alignment(h.attention or [], src_words, tgt_words)
            h.alignment = [(i + unit.word_offset, j) for i, j in pairs]
            h.attention = None  # not needed any more

    def _assemble(self, results: list[Translation], units: list[_Unit]) -> None:
        """Each line's result from its units: a line's own hypotheses, or (split_sentences) its
        sentences' best translations joined with a space into one hypothesis."""
        by_line: dict[int, list[_Unit]] = {}
        for u in units:
            by_line.setdefault(u.line, []).append(u)
        for i, parts in by_line.items():
            r = results[i]
            r.truncated = any(u.truncated for u in parts)
            r.retried = any(u.retried for u in parts)
            if self.split:
                r.segments = [Segment(u.source, u.hypotheses[0].text, u.retried) for u in parts]
            r.hypotheses = parts[0].hypotheses if len(parts) == 1 else [_joined([u.hypotheses[0] for u in parts])]

    def score(self, pairs: Iterable[tuple[str, str]], normalize: bool = True,
              names: tuple[str, str] = ("source", "target")) -> Iterator[Score]:
        """One Score per (source, target) pair, in order; `names` name the two sides in errors."""
        for window in self.score_windows(pairs, normalize, names):
            yield from window

    def score_windows(self, pairs: Iterable[tuple[str, str]], normalize: bool = True,
                      names: tuple[str, str] = ("source", "target")) -> Iterator[list[Score]]:
        """The scores of each window of pairs, in order: a caller can flush after each."""
        start = time.perf_counter()
        it = iter(pairs)
        first_line = 1
        while window := list(itertools.islice(it, self.config.window)):
            results = self._score_window(window, first_line, normalize, names)
            first_line += len(window)
            self.stats.lines += len(window)
            self.stats.seconds = time.perf_counter() - start
            yield results

    def _score_window(self, pairs: list[tuple[str, str]], first_line: int, normalize: bool,
                      names: tuple[str, str]) -> list[Score]:
        results = [Score(s, t) for s, t in pairs]
        todo = []
        for i, (s, t) in enumerate(pairs):
            # an empty target of a source is a translation the search can end with (EOS first): scored as
            # EOS alone; an empty source translates to an empty line, never to a target
            if not s.strip() and t.strip():
                raise NmtError(f"{names[0]}: line {first_line + i} is empty but its pair in {names[1]} is not")
            results[i].empty_input = not s.strip()
            if s.strip():
                todo.append(i)
        self.stats.empty += len(pairs) - len(todo)
        src, tgt = [], []
        limit = self.engine.max_positions
        for i, s_ids, t_ids in zip(todo, encode_batch(self.vocabs.src, [pairs[i][0] for i in todo]),
                                   encode_batch(self.vocabs.tgt, [pairs[i][1] for i in todo])):
            (s_ids, cut_s), (t_ids, cut_t) = cut_source([*self.src_prefix, *s_ids], limit), cut_source(t_ids, limit)
            results[i].truncated = cut_s or cut_t
            self.stats.truncated += results[i].truncated
            src.append(s_ids)
            tgt.append(t_ids)
        lengths = [max(len(s_ids), len(t_ids)) for s_ids, t_ids in zip(src, tgt)]
        for batch in self._batches(sorted(range(len(todo)), key=lambda j: lengths[j]), lengths):
            for j, logps in zip(batch, self.engine.score([src[j] for j in batch], [tgt[j] for j in batch])):
                r = results[todo[j]]
                r.token_logprobs, r.logprob = logps, sum(logps)
                r.score = r.logprob / penalty_of(len(logps), self.config) if normalize else r.logprob
                self.stats.target_tokens += len(logps)
        return results

    def _batches(self, order: list[int], lengths: list[int]) -> Iterator[list[int]]:
        """Consecutive (length-sorted) sentences while (count × longest) stays within the token budget."""
        batch: list[int] = []
        for j in order:
            longest = lengths[j] + 1
            if batch and (len(batch) + 1) * longest > self.config.batch_tokens:
                yield batch
                batch = []
            batch.append(j)
        if batch:
            yield batch

    def _count(self, results: list[Translation]) -> None:
        s = self.stats
        s.lines += len(results)
        s.empty += sum(r.empty_input for r in results)
        s.truncated += sum(r.truncated for r in results)
        s.hit_max_length += sum(r.hit_max_length for r in results)
        s.retried += sum(r.retried for r in results)
        s.target_tokens += sum(len(r.hypotheses[0].tokens) + 1 for r in results if r.hypotheses)


def _joined(parts: list[Hypothesis]) -> Hypothesis:
    """Sentences' hypotheses as one: texts joined with a space (empty ones skipped), tokens
    concatenated, log-probabilities and scores summed, target word indices shifted."""
    alignment = None
    if all(h.alignment is not None for h in parts):
        alignment, words = [], 0
        for h in parts:
            alignment += [(i, j + words) for i, j in h.alignment or []]
            words += len(h.text.split())
    return Hypothesis([t for h in parts for t in h.tokens], sum(h.logprob for h in parts),
                      sum(h.score for h in parts), any(h.hit_max_length for h in parts),
                      " ".join(h.text for h in parts if h.text), alignment=alignment)


def to_json(t: Translation) -> dict:
    """A JSON line's record; `alignment` (Pharaoh) when alignments were asked for, `segments` with
    split_sentences."""
    record: dict = {
        "source": t.source,
        "translation": t.text,
        "hypotheses": [_hypothesis_json(h) for h in t.hypotheses],
        "flags": {"empty_input": t.empty_input, "truncated": t.truncated, "hit_max_length": t.hit_max_length},
        "retried": t.retried,
    }
    if t.hypotheses and t.hypotheses[0].alignment is not None:
        record["alignment"] = align.pharaoh(t.hypotheses[0].alignment)
    if t.segments is not None:
        record["segments"] = [{"source": s.source, "translation": s.translation, "retried": s.retried}
                              for s in t.segments]
    return record


def _hypothesis_json(h: Hypothesis) -> dict:
    out = {"text": h.text, "score": h.score, "logprob": h.logprob, "tokens": len(h.tokens) + 1}
    if h.alignment is not None:
        out["alignment"] = align.pharaoh(h.alignment)
    return out


def to_text(t: Translation, alignment: bool = False) -> str:
    """A text line: the translation, or `translation ||| 0-0 1-2` with alignments (an empty
    line stays empty)."""
    if not alignment or t.empty_input:
        return t.text
    return f"{t.text} ||| {align.pharaoh(t.alignment or [])}"


def score_text(s: Score) -> str:
    """A score's line in text format: the number, or nothing for an empty pair."""
    return "" if s.score is None else f"{s.score:.6f}"


def score_json(s: Score) -> dict:
    return {
        "source": s.source,
        "target": s.target,
        "score": s.score,
        "logprob": s.logprob,
        "tokens": len(s.token_logprobs),
        "token_logprobs": s.token_logprobs,
        "flags": {"empty_input": s.empty_input, "truncated": s.truncated},
    }
