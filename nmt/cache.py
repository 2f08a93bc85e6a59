"""Tokenise once: the training text as flat arrays of token ids on disk.

A cache directory holds `src.bin`/`tgt.bin` (ids, uint16 when the vocabulary fits, else uint32)
and per-pair arrays `src_start`, `src_len`, `tgt_start`, `tgt_len` (.npy) of the pairs kept by the
filters, plus `meta.json` with the key, the filter report and each file's size and SHA-256.
It is named by a key over the data fingerprints, the tokenizer and the filter settings, built
under a temporary name and renamed when complete, and verified before use: a cut-short or
corrupted cache is rebuilt, never trained on. Building holds one chunk of lines in memory,
whatever the corpus size (plus 1 byte per pair for the de-duplication mask, and one of 16 hash
buckets). Whole passes (batch planning) read the arrays memory-mapped; training gathers its
batches with pread (see `TokenCache.gather`), so resident memory stays near one batch.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import itertools
import json
import logging
import mmap
import os
import shutil
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from nmt import atomic
from nmt.checkpoint import remove_stale_temporaries
from nmt.corpus import ParallelCorpus, fingerprints, sha256_of
from nmt.errors import NmtError
from nmt.textio import BOM, READ_ERRORS, open_binary
from nmt.tokenizer import Vocabs, encode_batch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK_LINES = 10_000  # pairs encoded at a time (measured: 20,000 held 90 MiB more, no faster)
ARRAYS = ("src_start", "src_len", "tgt_start", "tgt_len")
HASH_BUCKET_BITS = 4
HASH_BUCKETS = 1 << HASH_BUCKET_BITS  # de-duplication works on 1/16 of the pair hashes at a time
CHUNK_RECORDS = 1 << 18  # per-pair records (32 bytes each) read back per chunk when writing the index
MEMO_FILE = "fingerprints.json"  # size, mtime and inode → SHA-256 of the training and cache files seen


@dataclass(frozen=True)
class Filters:
    max_length: int = 250  # tokens per side, end-of-sentence included
    max_ratio: float = 3.0
    dedupe: bool = True


@dataclass
class FilterReport:
    read: int = 0
    empty: int = 0
    too_long: int = 0
    ratio: int = 0
    identical: int = 0
    duplicate: int = 0
    kept: int = 0

    def summary(self) -> str:
        return (f"{self.read:,} pairs read, {self.kept:,} kept; dropped: {self.empty:,} empty, "
                f"{self.too_long:,} too long, {self.ratio:,} length ratio, {self.identical:,} source = target, "
                f"{self.duplicate:,} duplicates")


@dataclass
class TokenCache:
    """Memory-mapped ids of the kept pairs: pair i's source is src[src_start[i] : + src_len[i]]."""

    directory: Path
    src: np.ndarray
    tgt: np.ndarray
    src_start: np.ndarray
    src_len: np.ndarray
    tgt_start: np.ndarray
    tgt_len: np.ndarray
    report: FilterReport = field(default_factory=FilterReport)
    maps: list[mmap.mmap] = field(default_factory=list, repr=False)
    columns: dict[str, "_Column"] = field(default_factory=dict, repr=False)

    def drop_pages(self) -> None:
        """Unmap the pages read through the arrays so far (the kernel keeps them cached), e.g.
        after a pass over all lengths: resident memory does not keep them."""
        for mapped in self.maps:
            if hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_DONTNEED)

    def gather(self, indices: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The source and target ids of these pairs, read with pread into fresh memory.

        Training reads the cache this way rather than through the memory mapping: on current
        kernels a fault maps a whole large folio of the page cache (measured on Linux 6.18: 100
        random reads of single ids mapped 63 MB), so random access through the mapping made
        resident memory grow with the corpus. pread copies just the bytes asked for."""
        rows = [int(i) for i in indices]
        c = self.columns
        src = [c["src.bin"].slice(a, n) for a, n in zip(c["src_start"].take(rows), c["src_len"].take(rows))]
        tgt = [c["tgt.bin"].slice(a, n) for a, n in zip(c["tgt_start"].take(rows), c["tgt_len"].take(rows))]
        return src, tgt

    def target_lengths(self, indices: np.ndarray) -> list[int]:
        return self.columns["tgt_len"].take([int(i) for i in indices])

    def __len__(self) -> int:
        return len(self.src_len)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, t = int(self.src_start[i]), int(self.tgt_start[i])
        return self.src[s : s + int(self.src_len[i])], self.tgt[t : t + int(self.tgt_len[i])]


def cache_key(corpora: list[ParallelCorpus], vocabs: Vocabs, filters: Filters,
              memo_file: Path | None = None) -> tuple[str, dict]:
    paths = [p for c in corpora for p in (c.src_path, c.tgt_path)]
    prints = [asdict(fp) | {"path": str(p)} for p, fp in zip(paths, fingerprints(paths, memo_file))]
    described = {"format": FORMAT_VERSION, "data": [{k: v for k, v in fp.items() if k != "path"} for fp in prints],
                 "tokenizer": vocabs.fingerprint(), "filters": asdict(filters)}
    if any(map(_opens_with_bom, paths)):  # read with the mark kept before it was dropped: another cache
        described["byte_order_mark"] = "dropped"
    key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]
    return key, {"fingerprints": prints, **described}


def _opens_with_bom(path: Path) -> bool:
    try:
        with open_binary(path) as stream:
            return stream.read(len(BOM.encode())) == BOM.encode()
    except READ_ERRORS:  # a damaged .gz: reading it for the cache names the problem
        return False


def load_or_build(corpora: list[ParallelCorpus], vocabs: Vocabs, filters: Filters, root: Path) -> TokenCache:
    """The cache for these corpora, tokenizer and filters: reused when valid, else (re)built."""
    remove_stale_temporaries(root)
    key, described = cache_key(corpora, vocabs, filters, root / MEMO_FILE)
    lines = [fp["lines"] for fp in described["fingerprints"]]
    for corpus, (src_lines, tgt_lines) in zip(corpora, zip(lines[::2], lines[1::2])):
        if src_lines != tgt_lines:  # found before encoding, not when one side runs out
            raise NmtError(corpus.mismatch((src_lines, tgt_lines)))
    directory = root / key
    if directory.exists():
        problem = verify(directory, key, root / MEMO_FILE)
        if problem is None:
            cache = open_cache(directory)
            problem = check_contents(cache, vocabs, filters)
            if problem is None:
                log.info("token cache %s: reused (%s)", directory, "no re-encoding")
                return cache
            del cache
        log.warning("token cache %s: %s; rebuilding", directory, problem)
        shutil.rmtree(directory, ignore_errors=True)
    else:
        others = [p.name for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")] if root.exists() else []
        reason = "data, tokenizer or filters changed" if others else "first run"
        log.info("token cache %s: building (%s)", directory, reason)
    build(corpora, vocabs, filters, directory, described)
    return open_cache(directory)


def verify(directory: Path, key: str, memo_file: Path | None = None) -> str | None:
    """None when the cache is complete and intact, else what is wrong with it. With `memo_file`
    (the training files' memo), a file whose stat matches what the memo recorded when it last
    hashed is not hashed again, so a warm start on a large cache does not read all of it twice."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return "meta.json missing or unreadable (an interrupted build?)"
    problem = _meta_problem(meta)
    if problem is not None:
        return f"meta.json {problem}"
    if meta.get("key") != key or meta.get("format") != FORMAT_VERSION:
        return "key or format does not match"
    for name, expected in meta["files"].items():
        path = directory / name
        if not path.exists():
            return f"{name} missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} is {path.stat().st_size} bytes, expected {expected['size']} (cut short?)"
    names = list(meta["files"])
    for name, found in zip(names, fingerprints([directory / name for name in names], memo_file)):
        if found.sha256 != meta["files"][name]["sha256"]:
            return f"{name} is corrupted (checksum differs)"
    return None


def _meta_problem(meta: object) -> str | None:
    """What is wrong with the shape of a cache's meta.json (valid JSON, but not what `build` wrote)."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    files = meta.get("files")
    expected = {*(f"{name}.npy" for name in ARRAYS), "src.bin", "tgt.bin"}
    if not isinstance(files, dict) or set(files) != expected:
        return f"does not list the files {sorted(expected)}"
    for info in files.values():
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("sha256"), str)):
            return "has a file entry without size and sha256"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"has dtype {str(meta.get('dtype'))[:20]!r}, not uint16 or uint32"
    report = meta.get("report")
    names = {f.name for f in fields(FilterReport)}
    if not (isinstance(report, dict) and set(report) == names and all(isinstance(v, int) for v in report.values())):
        return "has no filter report of counts"
    return None


def check_contents(cache: TokenCache, vocabs: Vocabs, filters: Filters) -> str | None:
    """None when the arrays are consistent with each other, the filters and the vocabularies, else
    what is wrong. Checksums only show the files are the ones meta.json lists; a forged meta.json
    lists forged files, whose lengths or ids would fail deep inside training."""
    n = len(cache.src_len)
    try:
        if any(a.dtype.kind not in "iu" for a in (cache.src_start, cache.src_len, cache.tgt_start, cache.tgt_len)):
            return "index arrays that are not integers"
        if any(len(a) != n for a in (cache.src_start, cache.tgt_start, cache.tgt_len)) or n != cache.report.kept:
            return "index arrays of different lengths"
        for side, start, length, ids, tok in (("source", cache.src_start, cache.src_len, cache.src, vocabs.src),
                                              ("target", cache.tgt_start, cache.tgt_len, cache.tgt, vocabs.tgt)):
            for a in range(0, n, CHUNK_RECORDS):
                s, m = np.asarray(start[a : a + CHUNK_RECORDS]), np.asarray(length[a : a + CHUNK_RECORDS])
                if (m < 0).any() or (m + 1 > filters.max_length).any():
                    return f"{side} lengths outside [0, {filters.max_length - 1}]"
                if (s < 0).any() or (s + m > len(ids)).any():
                    return f"{side} spans beyond the ids"
            vocab = tok.get_vocab_size()
            for a in range(0, len(ids), CHUNK_RECORDS * 16):  # a < len(ids): no chunk is empty
                if int(ids[a : a + CHUNK_RECORDS * 16].max()) >= vocab:
                    return f"{side} ids beyond the vocabulary ({vocab})"
                cache.drop_pages()  # chunk by chunk: a pass over all ids never holds them all resident
        return None
    finally:
        cache.drop_pages()


def open_cache(directory: Path) -> TokenCache:
    meta = json.loads((directory / "meta.json").read_text())
    maps: list[mmap.mmap] = []
    columns: dict[str, _Column] = {}
    arrays = {name: _map_npy(directory / f"{name}.npy", maps, columns) for name in ARRAYS}
    dtype = np.dtype(meta["dtype"])
    src, tgt = (_map(directory / f"{side}.bin", dtype, 0, -1, maps, columns) for side in ("src", "tgt"))
    return TokenCache(directory, src, tgt, report=FilterReport(**meta["report"]), maps=maps, columns=columns,
                      **arrays)


class _Column:
    """One array file of the cache read with pread (values copied, nothing mapped)."""

    def __init__(self, path: Path, dtype: np.dtype, offset: int):
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        self.dtype, self.offset, self.size = dtype, offset, dtype.itemsize

    def take(self, rows: list[int]) -> list[int]:
        """The values at these rows."""
        data = b"".join(os.pread(self.fd, self.size, self.offset + r * self.size) for r in rows)
        return np.frombuffer(data, self.dtype).tolist()

    def slice(self, start: int, count: int) -> np.ndarray:
        return np.frombuffer(os.pread(self.fd, count * self.size, self.offset + start * self.size), self.dtype)


def _map(path: Path, dtype: np.dtype, offset: int, count: int, maps: list[mmap.mmap],
         columns: dict[str, _Column]) -> np.ndarray:
    """A read-only array over a file's bytes (for whole passes such as batch planning, and for
    inspection), and the same file as a pread column (for training's random access)."""
    columns[path.stem if path.suffix == ".npy" else path.name] = _Column(path, dtype, offset)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size <= offset:
            return np.zeros(0, dtype)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    maps.append(mapped)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset)


def _map_npy(path: Path, maps: list[mmap.mmap], columns: dict[str, _Column]) -> np.ndarray:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        offset = f.tell()
    return _map(path, dtype, offset, int(np.prod(shape)), maps, columns)


def build(corpora: list[ParallelCorpus], vocabs: Vocabs, filters: Filters, directory: Path, described: dict) -> None:
    """Encode every pair once, in chunks, into a temporary directory; rename it when complete."""
    vocab = max(vocabs.src.get_vocab_size(), vocabs.tgt.get_vocab_size())
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    report = FilterReport()

    def cache_error(e: OSError) -> NmtError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return NmtError(f"{directory.parent}: disk full while building the token cache (free space, or "
                            "give --cache-dir on another disk)")
        return NmtError(f"{e.filename or directory}: cannot write the token cache ({e.strerror or e})")

    with atomic.directory(directory, cache_error) as tmp:
        # A pipeline of two: while the tokenizer (which releases the GIL) encodes one chunk in a
        # worker thread, this thread reads the next chunk and writes the previous one.
        with _gc_paused(), _Writer(tmp, dtype) as writer, ThreadPoolExecutor(max_workers=1) as worker:
            pending: Future | None = None
            for src_chunk, tgt_chunk in _chunks(corpora):
                submitted = worker.submit(_encode_chunk, src_chunk, tgt_chunk, vocabs)
                if pending is not None:
                    _write_chunk(pending.result(), filters, writer, report)
                pending = submitted
            if pending is not None:
                _write_chunk(pending.result(), filters, writer, report)
        _finish_index(tmp, writer, filters, report)
        if report.kept == 0:
            names = ", ".join(f"{c.src_path}, {c.tgt_path}" for c in corpora)
            raise NmtError(f"{names}: no training pairs left after filtering ({report.summary()})")
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in sorted(tmp.iterdir())}
        meta = {"key": directory.name, "format": FORMAT_VERSION, "dtype": dtype.name,
                "report": asdict(report), "files": files, **described}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("token cache: %s", report.summary())


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while encoding: each chunk makes some 10⁵ lists and
    tuples that live until the chunk is written, so the collector ran often and traversed them all
    (measured: 55% of the time of turning 20,000 encodings into lists of ids). The build makes no
    reference cycles; reference counting frees everything as before."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _chunks(corpora: list[ParallelCorpus]) -> Iterator[tuple[list[str], list[str]]]:
    src: list[str] = []
    tgt: list[str] = []
    for corpus in corpora:
        for s, t in corpus.chunks(CHUNK_LINES):
            src.extend(s)
            tgt.extend(t)
            if len(src) >= CHUNK_LINES:
                yield src[:CHUNK_LINES], tgt[:CHUNK_LINES]
                del src[:CHUNK_LINES], tgt[:CHUNK_LINES]
    if src:
        yield src, tgt


class _Writer:
    """Appends ids and per-pair records to files, so nothing accumulates in memory."""

    def __init__(self, directory: Path, dtype: np.dtype):
        self.directory, self.dtype = directory, dtype
        self.files: dict[str, BinaryIO] = {}
        self.offsets = {"src": 0, "tgt": 0}
        self.count = 0

    def __enter__(self) -> "_Writer":
        for name in ("src.bin", "tgt.bin", "records.tmp", *(_bucket(b) for b in range(HASH_BUCKETS))):
            self.files[name] = open(self.directory / name, "wb")
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()

    def add(self, src_ids: list[list[int]], tgt_ids: list[list[int]], hashes: np.ndarray,
            src_lens: np.ndarray, tgt_lens: np.ndarray) -> None:
        records = np.zeros((len(src_ids), 4), dtype=np.int64)  # src_start, src_len, tgt_start, tgt_len
        for side, ids, lens, col in (("src", src_ids, src_lens, 0), ("tgt", tgt_ids, tgt_lens, 2)):
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lens.sum()))
            self.files[f"{side}.bin"].write(flat.tobytes())
            records[:, col] = self.offsets[side] + np.concatenate(([0], np.cumsum(lens)[:-1]))
            records[:, col + 1] = lens
            self.offsets[side] += int(lens.sum())
        self.files["records.tmp"].write(records.tobytes())
        # (hash, pair index) into one of HASH_BUCKETS files by the hash's top bits, so that
        # de-duplication later holds one bucket in memory at a time
        rows = np.zeros(len(hashes), dtype=[("hash", np.uint64), ("index", np.int64)])
        rows["hash"], rows["index"] = hashes, self.count + np.arange(len(hashes))
        bucket = (rows["hash"] >> np.uint64(64 - HASH_BUCKET_BITS)).astype(np.int64)
        for b in np.unique(bucket).tolist():
            self.files[_bucket(b)].write(rows[bucket == b].tobytes())
        self.count += len(src_ids)


@dataclass
class _Encoded:
    """One chunk after the text checks and the tokenizer: what `_write_chunk` needs."""

    src: list[str]
    tgt: list[str]
    keep: list[int]  # lines left after the empty and identical checks
    src_ids: list[list[int]]
    tgt_ids: list[list[int]]
    empty: int
    identical: int


def _encode_chunk(src: list[str], tgt: list[str], vocabs: Vocabs) -> _Encoded:
    stripped = [(s.strip(), t.strip()) for s, t in zip(src, tgt)]
    non_empty = [i for i, (s, t) in enumerate(stripped) if s and t]
    keep = [i for i in non_empty if stripped[i][0] != stripped[i][1]]
    return _Encoded(src, tgt, keep, encode_batch(vocabs.src, [src[i] for i in keep]),
                    encode_batch(vocabs.tgt, [tgt[i] for i in keep]), len(src) - len(non_empty),
                    len(non_empty) - len(keep))


def _write_chunk(enc: _Encoded, filters: Filters, writer: _Writer, report: FilterReport) -> None:
    """Apply the length filters, hash the pairs for de-duplication, append the rest."""
    report.read += len(enc.src)
    report.empty += enc.empty
    report.identical += enc.identical
    n = len(enc.keep)
    ls = np.fromiter(map(len, enc.src_ids), dtype=np.int64, count=n) + 1  # + end of sentence
    lt = np.fromiter(map(len, enc.tgt_ids), dtype=np.int64, count=n) + 1
    longer, shorter = np.maximum(ls, lt), np.minimum(ls, lt)
    too_long = longer > filters.max_length
    bad_ratio = ~too_long & (longer / shorter > filters.max_ratio)  # (max_ratio × shorter overflows at 1e308)
    report.too_long += int(too_long.sum())
    report.ratio += int(bad_ratio.sum())
    ok = ~(too_long | bad_ratio)
    rows = np.flatnonzero(ok).tolist()
    src, tgt, lines = enc.src, enc.tgt, [enc.keep[j] for j in rows]
    # Python's own 64-bit hash of the pair (SipHash, salted per process: only compared within
    # this build): 1 µs a pair cheaper than blake2b, as unlikely to collide
    hashes = np.array([hash((src[i], tgt[i])) for i in lines], dtype=np.int64).view(np.uint64)
    writer.add([enc.src_ids[j] for j in rows], [enc.tgt_ids[j] for j in rows], hashes, ls[ok] - 1, lt[ok] - 1)


def _finish_index(directory: Path, writer: _Writer, filters: Filters, report: FilterReport) -> None:
    """Drop exact duplicate pairs (all but the first) and write the per-pair index arrays, one
    hash bucket and one chunk of records at a time: memory stays near 1 byte per pair."""
    n = writer.count
    if filters.dedupe:
        keep = np.zeros(n, dtype=bool)
        for b in range(HASH_BUCKETS):
            rows = np.fromfile(directory / _bucket(b), dtype=[("hash", np.uint64), ("index", np.int64)])
            order = np.argsort(rows["hash"], kind="stable")  # indices ascend within a bucket: firsts first
            hashes = rows["hash"][order]
            first = np.concatenate(([True], hashes[1:] != hashes[:-1])) if len(rows) else np.zeros(0, bool)
            keep[rows["index"][order[first]]] = True
            del rows, order, hashes, first
    else:
        keep = np.ones(n, dtype=bool)
    report.duplicate = int(n - keep.sum())
    report.kept = int(keep.sum())
    dtypes = {name: np.dtype(np.int64 if name.endswith("start") else np.int32) for name in ARRAYS}
    outputs = {}
    try:
        for name in ARRAYS:
            f = outputs[name] = open(directory / f"{name}.npy", "wb")
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtypes[name]),
                                                     "fortran_order": False, "shape": (report.kept,)})
        with open(directory / "records.tmp", "rb") as records:
            for start in range(0, n, CHUNK_RECORDS):
                chunk = np.fromfile(records, dtype=np.int64, count=min(CHUNK_RECORDS, n - start) * 4).reshape(-1, 4)
                chunk = chunk[keep[start : start + len(chunk)]]
                for col, name in enumerate(ARRAYS):
                    outputs[name].write(chunk[:, col].astype(dtypes[name]).tobytes())
    finally:
        for f in outputs.values():
            f.close()
    for tmp in ("records.tmp", *(_bucket(b) for b in range(HASH_BUCKETS))):
        (directory / tmp).unlink()


def _bucket(b: int) -> str:
    return f"hashes-{b:02d}.tmp"

