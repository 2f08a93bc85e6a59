"""Corpus mixing: which corpora serve which translation direction, and how much of each goes
into every epoch.

`corpus_uses` reads each `--train PREFIX` for every pair of `--pairs` whose two files it has.
Pairs over the same two languages share one token cache, so es→en and en→es from the same
files are tokenised and cached once: en→es reads the es→en cache with its sides swapped (the
filters are symmetric: length, ratio, identical sides, duplicates). Every pair of a
multi-direction run gets its target-language tag in front of its source ids, here, as its batch
is gathered.

`Mixture` is what training reads: the concatenation of those parts behind the interface of a
`TokenCache` (lengths for planning, `gather` for batches), and `plan`, an epoch's batches. With
no weights an epoch is every pair once, planned by `batching.plan_epoch` as before. With
`--weights` an epoch holds the same number of pairs, N (all corpora together), and corpus i
contributes round(w_i · N) of them (largest remainders, so they sum to N): whole passes over it,
then a seeded sample without replacement for the rest (a small corpus is repeated, a large one
subsampled, a different sample each epoch). The plan stays a pure function of (lengths,
weights, seed, epoch), so a resume is exact as before, and one corpus of weight 1 gives exactly
the unweighted plan. A corpus serving several directions splits its weight equally among them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from nmt.cache import FilterReport, TokenCache
from nmt.corpus import ParallelCorpus
from nmt.directions import Directions
from nmt.errors import NmtError, UsageError

if TYPE_CHECKING:
    from nmt.batching import Plan

log = logging.getLogger(__name__)

SAMPLING_STREAM = 0x6D6978  # the weighted sample's own random stream, apart from plan_epoch's


@dataclass(frozen=True)
class CorpusUse:
    """One `--train` prefix serving one direction, read from the files of `corpus` (stored in the
    orientation of the first pair over these two languages; `swap` serves it target → source)."""

    index: int  # position among the --train prefixes: its weight
    prefix: str
    corpus: ParallelCorpus
    swap: bool
    src_lang: str
    tgt_lang: str


def corpus_uses(prefixes: list[str], directions: Directions) -> list[CorpusUse]:
    """Every (prefix, direction) with data. One direction: each prefix must have its two files
    (today's error names the missing one); several: a prefix serves the pairs whose files it has,
    and a prefix serving none, or a pair no prefix serves, is an error naming it."""
    if not prefixes:
        raise NmtError("no training data given (--train PREFIX)")
    stored: dict[frozenset, tuple[str, str]] = {}
    for s, t in directions.pairs:
        stored.setdefault(frozenset((s, t)), (s, t))
    uses = []
    for i, prefix in enumerate(prefixes):
        found = []
        for s, t in directions.pairs:
            a, b = stored[frozenset((s, t))]
            if not directions.multi:
                corpus = ParallelCorpus.from_prefix(prefix, a, b)
            elif all(Path(f"{prefix}.{x}").is_file() or Path(f"{prefix}.{x}.gz").is_file() for x in (a, b)):
                corpus = ParallelCorpus.from_prefix(prefix, a, b)
            else:
                continue
            found.append(CorpusUse(i, prefix, corpus, (s, t) != (a, b), s, t))
        if not found:
            raise NmtError(f"{prefix}: no files for any of the pairs {directions.text()} (expected "
                           f"{prefix}.SRC and {prefix}.TGT for one of them)")
        uses += found
    for s, t in directions.pairs:
        if not any((u.src_lang, u.tgt_lang) == (s, t) for u in uses):
            raise NmtError(f"no training data for {s}-{t}: no --train prefix has both .{s} and .{t} files")
    return uses


def cache_groups(uses: list[CorpusUse], weighted: bool) -> list[list[CorpusUse]]:
    """The uses that share one token cache: the same files (one cache per pair of languages,
    whatever the direction); with weights, one per prefix too, so that each corpus's share can be
    drawn (without, all prefixes of a language pair share one cache, as before)."""
    groups: dict[tuple, list[CorpusUse]] = {}
    for u in uses:
        key = (u.index if weighted else -1, frozenset((u.src_lang, u.tgt_lang)))
        groups.setdefault(key, []).append(u)
    return list(groups.values())


def group_corpora(group: list[CorpusUse]) -> list[ParallelCorpus]:
    """The distinct corpora of a group, in --train order (each once, whatever its directions)."""
    seen: list[ParallelCorpus] = []
    for u in group:
        if u.corpus not in seen:
            seen.append(u.corpus)
    return seen


def mixture(uses: list[CorpusUse], weights: list[float] | None, tag_ids: dict[str, int],
            load_cache: Callable[[list[ParallelCorpus]], TokenCache]) -> "Mixture":
    """The parts of these uses: one token cache per group (`cache_groups`, built or reused by
    `load_cache`), read once per direction of the group, tagged when `tag_ids` has tags."""
    parts = []
    for group in cache_groups(uses, weights is not None):
        cache = load_cache(group_corpora(group))
        directions = list({(u.src_lang, u.tgt_lang, u.swap): None for u in group})
        for s, t, swap in directions:
            name = f"{group[0].prefix if weights is not None else ', '.join(sorted({u.prefix for u in group}))} {s}→{t}"
            parts.append(Part(cache, swap, tag_ids.get(t), group[0].index if weights is not None else -1, name))
    return Mixture(parts, weights)


@dataclass
class Part:
    """One direction read from one cache: its pairs are a contiguous range of the mixture."""

    cache: TokenCache
    swap: bool
    tag_id: int | None
    weight_index: int  # the --weights entry it counts towards (-1: unweighted)
    name: str  # "PREFIX es→en", for the shares printed at the start

    @property
    def src_len(self) -> np.ndarray:
        return self.cache.tgt_len if self.swap else self.cache.src_len

    @property
    def tgt_len(self) -> np.ndarray:
        return self.cache.src_len if self.swap else self.cache.tgt_len

    def __len__(self) -> int:
        return len(self.cache)


class Mixture:
    """The training pairs of all parts, read like one `TokenCache`; `plan` gives an epoch."""

    def __init__(self, parts: list[Part], weights: list[float] | None = None):
        self.parts, self.weights = parts, weights
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.caches = list({id(p.cache): p.cache for p in parts}.values())
        if self._plain:  # exactly today's single cache: its memory-mapped arrays, nothing copied
            self.src_len, self.tgt_len = parts[0].cache.src_len, parts[0].cache.tgt_len
        else:  # the tag is one more source token
            self.src_len = np.concatenate([p.src_len.astype(np.int32) + (p.tag_id is not None) for p in parts])
            self.tgt_len = np.concatenate([p.tgt_len.astype(np.int32) for p in parts])

    @property
    def _plain(self) -> bool:
        return len(self.parts) == 1 and not self.parts[0].swap and self.parts[0].tag_id is None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def report(self) -> FilterReport:
        total = FilterReport()
        for c in self.caches:
            for name, value in vars(c.report).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def drop_pages(self) -> None:
        for c in self.caches:
            c.drop_pages()

    def gather(self, indices: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Source and target ids of these pairs (sides swapped and the tag put first where the
        pair's direction says so), in the order asked."""
        if self._plain:
            return self.parts[0].cache.gather(indices)
        indices = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        src: list = [None] * len(indices)
        tgt: list = [None] * len(indices)
        for k in np.unique(which).tolist():
            rows = np.flatnonzero(which == k)
            part = self.parts[k]
            s, t = part.cache.gather(indices[rows] - self.offsets[k])
            if part.swap:
                s, t = t, s
            if part.tag_id is not None:
                head = np.array([part.tag_id], dtype=np.int64)
                s = [np.concatenate((head, x.astype(np.int64))) for x in s]
            for j, r in enumerate(rows.tolist()):
                src[r], tgt[r] = s[j], t[j]
        return src, tgt

    def target_lengths(self, indices: np.ndarray) -> list[int]:
        if self._plain:
            return self.parts[0].cache.target_lengths(indices)
        return self.tgt_len[np.asarray(indices, dtype=np.int64)].tolist()

    # -- an epoch -------------------------------------------------------------------------------

    def plan(self, batch_tokens: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
             curriculum: float = 0.0) -> Plan:
        """The epoch's batches: `plan_epoch` over every pair, or with weights over the epoch's
        weighted selection (batch b is still `order[starts[b]:ends[b]]`, of mixture indices)."""
        from nmt.batching import Plan, plan_epoch  # torch: not needed to parse --weights

        if self.weights is None:
            return plan_epoch(self.src_len, self.tgt_len, batch_tokens, seed, epoch, rank, world_size, curriculum)
        chosen = self.selection(seed, epoch)
        p = plan_epoch(self.src_len[chosen], self.tgt_len[chosen], batch_tokens, seed, epoch, rank, world_size,
                       curriculum)
        return Plan(chosen[p.order], p.starts, p.ends)

    def counts(self) -> list[int]:
        """Pairs each part contributes to a weighted epoch of N pairs (largest remainders)."""
        n = len(self)
        share = self.part_weights()
        exact = [w * n for w in share]
        counts = [math.floor(x) for x in exact]
        for k in sorted(range(len(exact)), key=lambda k: (counts[k] - exact[k], k))[: n - sum(counts)]:
            counts[k] += 1
        return counts

    def part_weights(self) -> list[float]:
        """Each part's share of an epoch: its corpus's weight (normalised), split equally among
        the directions that corpus serves."""
        assert self.weights is not None
        total = sum(self.weights)
        ways = {k: sum(1 for p in self.parts if p.weight_index == k) for k in range(len(self.weights))}
        return [self.weights[p.weight_index] / total / ways[p.weight_index] for p in self.parts]

    def selection(self, seed: int, epoch: int) -> np.ndarray:
        """The mixture indices of a weighted epoch (a pair may appear several times), part by part."""
        rng = np.random.default_rng([seed, epoch, SAMPLING_STREAM])
        chosen = []
        for k, (part, count) in enumerate(zip(self.parts, self.counts())):
            size = len(part)
            passes, rest = divmod(count, size)
            local = [np.tile(np.arange(size, dtype=np.int64), passes)]
            if rest:
                local.append(np.sort(rng.choice(size, rest, replace=False)).astype(np.int64))
            chosen.append(np.concatenate(local) + self.offsets[k])
        return np.concatenate(chosen)

    def shares(self, plan: Plan) -> list[dict]:
        """The realised share of each part in `plan`'s batches: of the pairs and of the target tokens."""
        order = np.concatenate([plan[b] for b in range(len(plan))]) if len(plan) else np.zeros(0, np.int64)
        which = np.searchsorted(self.offsets, order, side="right") - 1
        tokens = self.tgt_len[order].astype(np.int64) + 1  # EOS included
        n, t = max(len(order), 1), max(int(tokens.sum()), 1)
        return [{"part": p.name, "weight": (self.part_weights()[k] if self.weights else None),
                 "pairs": float((which == k).sum() / n), "target_tokens": float(tokens[which == k].sum() / t)}
                for k, p in enumerate(self.parts)]


@dataclass(frozen=True)
class DevSet:
    """A dev set for one direction: its corpus and the ids put before each source (its tag)."""

    corpus: ParallelCorpus
    src_prefix: tuple[int, ...]
    name: str  # "es→en"


def dev_sets(prefix: str, directions: Directions, tag_ids: dict[str, int]) -> list[DevSet]:
    """PREFIX read for each direction that has its two files (one direction: they must exist, as
    before); with several directions and none found, an error naming the prefix."""
    found = []
    for s, t in directions.pairs:
        if directions.multi and not all(Path(f"{prefix}.{x}").is_file() or Path(f"{prefix}.{x}.gz").is_file()
                                        for x in (s, t)):
            continue
        tag = (tag_ids[t],) if t in tag_ids else ()
        found.append(DevSet(ParallelCorpus.from_prefix(prefix, s, t), tag, f"{s}→{t}"))
    if not found:
        raise NmtError(f"{prefix}: no dev files for any of the pairs {directions.text()} (or --dev none)")
    return found


def parse_weights(text: str, corpora: int) -> list[float]:
    """`0.7,0.3` → [0.7, 0.3]: one finite non-negative number per --train corpus, not all zero."""
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights: cannot read {text!r} (expected numbers, comma-separated: 0.7,0.3)") from None
    return check_weights(weights, corpora, "--weights", repr(text))


def check_weights(weights: list[float], corpora: int, what: str = "--weights", shown: str | None = None) -> list[float]:
    """The checks of `parse_weights` on numbers already read (a `--config` file's `weights`)."""
    shown = shown or str(weights)
    if len(weights) != corpora:
        raise UsageError(f"{what}: {len(weights)} weight(s) for {corpora} --train corpora (give one per corpus)")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise UsageError(f"{what}: {shown} has a negative or non-finite weight (each must be ≥ 0)")
    if sum(weights) <= 0:
        raise UsageError(f"{what}: {shown} sums to zero (at least one corpus needs a weight > 0)")
    return [float(w) for w in weights]
