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
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from nmt import engines
from nmt.batching import cut_source
from nmt.config import DecodeConfig
from nmt.errors import NmtError
from nmt.runtime import Runtime
from nmt.search import Hypothesis, penalty_of
from nmt.tokenizer import Vocabs, decode_batch, encode_batch

log = logging.getLogger(__name__)


@dataclass
class Translation:
    """One input line's result, whatever the engine: its n-best hypotheses (with their text),
    and the line contract's flags."""

    source: str
    hypotheses: list[Hypothesis] = field(default_factory=list)  # best first; empty for an empty line
    empty_input: bool = False
    truncated: bool = False

    @property
    def text(self) -> str:
        return self.hypotheses[0].text if self.hypotheses else ""

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
    target_tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.lines / self.seconds if self.seconds else 0.0
        return (f"translated {self.lines:,} lines ({self.empty:,} empty, {self.truncated:,} truncated, "
                f"{self.hit_max_length:,} hit the length cap) in {self.seconds:.1f} s: {rate:.1f} sentences/s, "
                f"{self.target_tokens / max(self.seconds, 1e-9):,.0f} target tokens/s")


class Translator:
    """The line contract around one search engine (`engines.Engine`)."""

    def __init__(self, engine: engines.Engine, vocabs: Vocabs, config: DecodeConfig, src_prefix: tuple[int, ...] = ()):
        self.engine, self.vocabs, self.config = engine, vocabs, config
        self.src_prefix = tuple(src_prefix)  # ids before every source: a target-language tag (`nmt.directions`)
        self.stats = Stats()

    @classmethod
    def from_model(cls, model, vocabs: Vocabs, runtime: Runtime, config: DecodeConfig,
                   src_prefix: tuple[int, ...] = ()) -> "Translator":
        """nmt's own search for `config` (beam, greedy or sampling) over a loaded model."""
        return cls(engines.for_model(model, runtime, config), vocabs, config, src_prefix)

    def translate(self, lines: Iterable[str]) -> Iterator[Translation]:
        """One Translation per input line, in order."""
        for window in self.translate_windows(lines):
            yield from window

    def translate_windows(self, lines: Iterable[str]) -> Iterator[list[Translation]]:
        """The translations of each window of input lines, in order: a caller can flush after each."""
        start = time.perf_counter()
        it = iter(lines)
        while window := list(itertools.islice(it, self.config.window)):
            results = self._window(window)
            self.stats.seconds = time.perf_counter() - start
            yield results

    def _window(self, lines: list[str]) -> list[Translation]:
        results = [Translation(line) for line in lines]
        todo = [i for i, line in enumerate(lines) if line.strip()]
        for i in set(range(len(lines))) - set(todo):
            results[i].empty_input = True
        ids = []
        for i, seq in zip(todo, encode_batch(self.vocabs.src, [lines[i] for i in todo])):
            seq, results[i].truncated = cut_source([*self.src_prefix, *seq], self.engine.max_positions)
            ids.append(seq)
        order = sorted(range(len(todo)), key=lambda j: len(ids[j]))
        for batch in self._batches(order, [len(seq) for seq in ids]):
            for j, hyps in zip(batch, self.engine.search([ids[j] for j in batch])):
                for h, text in zip(hyps, decode_batch(self.vocabs.tgt, [h.tokens for h in hyps])):
                    h.text = one_line(text)
                results[todo[j]].hypotheses = hyps
        self._count(results)
        return results

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
            if bool(s.strip()) != bool(t.strip()):
                empty, other = (0, 1) if not s.strip() else (1, 0)
                raise NmtError(f"{names[empty]}: line {first_line + i} is empty but its pair in {names[other]} is not")
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
        s.target_tokens += sum(len(r.hypotheses[0].tokens) + 1 for r in results if r.hypotheses)


_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def one_line(text: str) -> str:
    """A model can emit the byte tokens of a line break; the line contract needs one line out."""
    return text.translate(_LINE_BREAKS)


def to_json(t: Translation) -> dict:
    return {
        "source": t.source,
        "translation": t.text,
        "hypotheses": [{"text": h.text, "score": h.score, "logprob": h.logprob, "tokens": len(h.tokens) + 1}
                       for h in t.hypotheses],
        "flags": {"empty_input": t.empty_input, "truncated": t.truncated, "hit_max_length": t.hit_max_length},
    }


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
