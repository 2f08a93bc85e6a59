"""Lines in, lines out: read ahead a window, sort it by length, batch by tokens, search, and hand
the results back in input order.

The line contract: exactly one result per input line, in input order; an empty line gives an
empty result without reaching the model; a line longer than the model's positions is cut to
fit (`batching.cut_source`) and flagged. Results are yielded window by window, so output can be
flushed as it comes and a huge input never sits in memory. Writing them (text or JSON lines)
is the CLI's job.

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
from nmt.runtime import Runtime
from nmt.search import Hypothesis
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

    def __init__(self, engine: engines.Engine, vocabs: Vocabs, config: DecodeConfig):
        self.engine, self.vocabs, self.config = engine, vocabs, config
        self.stats = Stats()

    @classmethod
    def from_model(cls, model, vocabs: Vocabs, runtime: Runtime, config: DecodeConfig) -> "Translator":
        """nmt's own search for `config` (beam, greedy or sampling) over a loaded model."""
        return cls(engines.for_model(model, runtime, config), vocabs, config)

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
            seq, results[i].truncated = cut_source(seq, self.engine.max_positions)
            ids.append(seq)
        order = sorted(range(len(todo)), key=lambda j: len(ids[j]))
        for batch in self._batches(order, ids):
            for j, hyps in zip(batch, self.engine.search([ids[j] for j in batch])):
                for h, text in zip(hyps, decode_batch(self.vocabs.tgt, [h.tokens for h in hyps])):
                    h.text = one_line(text)
                results[todo[j]].hypotheses = hyps
        self._count(results)
        return results

    def _batches(self, order: list[int], ids: list[list[int]]) -> Iterator[list[int]]:
        """Consecutive (length-sorted) sentences while (count × longest) stays within the token budget."""
        batch: list[int] = []
        for j in order:
            longest = len(ids[j]) + 1
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
