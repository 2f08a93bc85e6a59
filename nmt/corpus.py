"""Parallel text corpora on disk: find the two files of a prefix, read them in step, fingerprint
them, and draw a uniform sample of lines for tokenizer training.

Everything streams: a 50 GB corpus is read line by line, never whole. Line-count mismatches and
invalid UTF-8 are reported with file names and line numbers. Turning text into ids is `cache`'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

from nmt import atomic
from nmt.errors import NmtError, UsageError
from nmt.textio import count_lines, looks_cr_only, open_binary, read_line_blocks, read_lines

T = TypeVar("T")


@dataclass(frozen=True)
class ParallelCorpus:
    src_path: Path
    tgt_path: Path

    @staticmethod
    def from_prefix(prefix: str | Path, src: str, tgt: str) -> "ParallelCorpus":
        """`PREFIX.src` and `PREFIX.tgt` (or their `.gz`), the convention of fairseq, Marian and JoeyNMT."""
        if not src or not tgt or src == tgt:
            raise UsageError(f"--src and --tgt must be two different language codes (got {src!r}, {tgt!r})")
        return ParallelCorpus(_find(prefix, src), _find(prefix, tgt))

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Yield (source line, target line); a different number of lines is an error naming both."""
        src_lines, tgt_lines = read_lines(self.src_path), read_lines(self.tgt_path)
        for s in src_lines:
            t = next(tgt_lines, None)
            if t is None:
                raise NmtError(self.mismatch())
            yield s, t
        if next(tgt_lines, None) is not None:
            raise NmtError(self.mismatch())

    def chunks(self, n: int) -> Iterator[tuple[list[str], list[str]]]:
        """The pairs of `pairs()` as (sources, targets) lists of n (the last may be shorter),
        read a block at a time."""
        sides = (read_line_blocks(self.src_path), read_line_blocks(self.tgt_path))
        buffers: tuple[list[str], list[str]] = ([], [])
        open_sides = [True, True]
        while True:
            for k in (0, 1):
                while open_sides[k] and len(buffers[k]) < n:
                    block = next(sides[k], None)
                    if block is None:
                        open_sides[k] = False
                    else:
                        buffers[k].extend(block)
            m = min(n, len(buffers[0]), len(buffers[1]))
            if m == 0:
                break
            yield buffers[0][:m], buffers[1][:m]
            del buffers[0][:m], buffers[1][:m]
        if buffers[0] or buffers[1]:
            raise NmtError(self.mismatch())

    def mismatch(self, counts: tuple[int, int] | None = None) -> str:
        """The error for sides of different lengths, with both counts (counted here unless given)."""
        ns, nt = counts or (count_lines(self.src_path), count_lines(self.tgt_path))
        hint = next((f" ({path} has carriage returns but no line feeds: old Mac line endings, CR only?)"
                     for path, n in ((self.src_path, ns), (self.tgt_path, nt)) if n == 1 and looks_cr_only(path)), "")
        return f"line counts differ: {self.src_path} has {ns} lines, {self.tgt_path} has {nt}{hint}"

    def check_line_counts(self) -> int:
        ns, nt = count_lines(self.src_path), count_lines(self.tgt_path)
        if ns != nt:
            raise NmtError(self.mismatch())
        return ns


def _find(prefix: str | Path, lang: str) -> Path:
    """`PREFIX.lang`, else `PREFIX.lang.gz`: a regular file (a corpus is read more than once:
    counted, fingerprinted, tokenized), so a directory or a FIFO there is named as what it is."""
    plain = Path(f"{prefix}.{lang}")
    candidates = (plain, Path(f"{plain}.gz"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    for candidate in candidates:
        if candidate.is_dir():
            raise NmtError(f"{candidate}: is a directory, expected a text file")
        if candidate.exists():
            raise NmtError(f"{candidate}: is not a regular file (a FIFO or a device?), expected a text file "
                           "(a corpus is read more than once)")
    raise NmtError(f"{plain}: no such file (nor {plain}.gz)")


@dataclass(frozen=True)
class Fingerprint:
    path: str
    size: int
    lines: int
    sha256: str


def fingerprint(path: Path) -> Fingerprint:
    """Size, line count and SHA-256 of a file's bytes (as stored, compressed or not), in one pass."""
    h = hashlib.sha256()
    lines = 0
    size = 0
    last = b"\n"
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError as e:
        raise NmtError(f"{path}: cannot read ({e.strerror})") from None
    if str(path).endswith(".gz"):
        lines = count_lines(path)  # lines of the text, not of the compressed bytes
    else:
        lines += last != b"\n"
    return Fingerprint(str(path), size, lines, h.hexdigest())


def sha256_of(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB pieces (`hashlib.file_digest` needs Python 3.11;
    nmt supports 3.10)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    except OSError as e:
        raise NmtError(f"{path}: cannot read ({e.strerror})") from None
    return h.hexdigest()


# A file last modified this recently is hashed again on every run, whatever its stat says: a
# rewrite within the file system's timestamp granularity could otherwise keep size and mtime.
SETTLED_NS = 2_000_000_000


def fingerprints(paths: list[Path], memo_file: Path | None = None) -> list[Fingerprint]:
    """Fingerprints of these files. With `memo_file`, a file whose size, mtime, ctime and inode
    match what was recorded there is not read again (git's index does the same), so a warm start
    on a 50 GB corpus does not hash 50 GB; new fingerprints are recorded for the next run. (The
    ctime catches a rewrite in place that restored the mtime: `cp -p`, `rsync -t --inplace`.)"""
    memo: dict[str, dict] = {}
    if memo_file is not None:
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
        if not isinstance(memo, dict):  # not the memo's shape: it only costs a re-hash, as a broken one does
            memo = {}
    out, changed = [], False
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            raise NmtError(f"{path}: cannot read ({e.strerror})") from None
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
                 "device": st.st_dev}
        key = str(Path(path).resolve())
        record = memo.get(key)
        if isinstance(record, dict) and record.get("stamp") == stamp and \
                isinstance(record.get("lines"), int) and isinstance(record.get("sha256"), str):
            out.append(Fingerprint(str(path), st.st_size, record["lines"], record["sha256"]))
            continue
        fp = fingerprint(path)
        out.append(fp)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_NS:  # (a `cp -p`: old mtime, new ctime)
            memo[key] = {"stamp": stamp, "lines": fp.lines, "sha256": fp.sha256}
            changed = True
    if memo_file is not None and changed:
        memo = {k: v for k, v in memo.items() if os.path.exists(k)}  # not the files since removed (a rebuilt cache's)
        try:
            atomic.write_text(memo_file, json.dumps(memo, indent=1))
        except NmtError:  # only an optimisation: the next run hashes again (a full disk leaves no temporary)
            pass
    return out


SAMPLE_CHUNK = 10_000  # pairs read at a time while sampling


def sample_chunks(chunks: Iterable[tuple[Sequence[T], ...]], total: int, k: int, seed: int) -> Iterator[tuple[list[T], ...]]:
    """A uniform sample of k of the `total` rows that arrive in `chunks` (tuples of aligned
    columns), chosen as they stream by and handed on chunk by chunk, in stream order.

    A chunk of m rows, with r rows still to come (this chunk included) and j still wanted, gets
    a Hypergeometric(m, r − m, j) share of the sample, drawn uniformly within it: the number a
    uniform j-subset of the r rows puts into these m. So every k-subset is equally likely, as
    with a reservoir, but nothing is held beyond one chunk: the sample need never exist whole."""
    rng = np.random.default_rng(seed)
    remaining, wanted = total, min(k, total)
    for chunk in chunks:
        m = len(chunk[0])
        if m > remaining:
            raise ValueError(f"more than the {total} rows announced")
        if wanted <= 0:
            return
        if wanted >= remaining:
            take: Sequence[int] = range(m)
        else:
            share = int(rng.hypergeometric(m, remaining - m, wanted))
            take = np.sort(rng.choice(m, share, replace=False)).tolist()
        remaining -= m
        wanted -= len(take)
        yield tuple([column[i] for i in take] for column in chunk)


def sample_corpora(corpora: list[ParallelCorpus], k: int, seed: int) -> Iterator[tuple[list[str], list[str]]]:
    """A seeded uniform sample of k pairs over all corpora, as (sources, targets) chunks: the line
    counts first (a byte scan, which also checks that the sides line up), then one streaming pass."""
    total = sum(c.check_line_counts() for c in corpora)
    chunks = (chunk for c in corpora for chunk in c.chunks(SAMPLE_CHUNK))
    return sample_chunks(chunks, total, k, seed)  # type: ignore[return-value]
