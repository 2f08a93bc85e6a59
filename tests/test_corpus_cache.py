"""Unit tests of `nmt.corpus` (finding, reading, fingerprinting and sampling parallel text) and
`nmt.cache` (the token-id cache): every cached id is checked against the tokenizer's own
encoding of the text, every filter against pairs crafted with token lengths counted here, and
reuse/rebuild against file modification times, logs and monkeypatched encoders.

Corpora are slices of the Bible corpus written to temporary files.
"""

from __future__ import annotations

import errno
import gc
import gzip
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections import Counter
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import head_lines

import nmt.cache as cache_mod
from nmt.cache import FilterReport, Filters, cache_key, load_or_build, open_cache, verify
from nmt.config import TokenizerConfig
from nmt.corpus import ParallelCorpus, fingerprint, sample_chunks, sample_corpora
from nmt.errors import NmtError, UsageError
from nmt.tokenizer import Vocabs, train_vocabs

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "bible-es-en"
SRC, TGT = "es", "en"
PERMISSIVE = Filters(max_length=10**6, max_ratio=1e9, dedupe=False)


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bible():
    return head_lines("train.es", 2000), head_lines("train.en", 2000)


def write_side(path: Path, lines: list[str], gz: bool = False, final_newline: bool = True) -> Path:
    data = ("\n".join(lines) + ("\n" if final_newline and lines else "")).encode("utf-8")
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_corpus(directory: Path, name: str, src: list[str], tgt: list[str], gz: bool = False) -> ParallelCorpus:
    prefix = directory / name
    write_side(Path(f"{prefix}.{SRC}"), src, gz)
    write_side(Path(f"{prefix}.{TGT}"), tgt, gz)
    return ParallelCorpus.from_prefix(prefix, SRC, TGT)


def numbers_besides_paths(message: str, *paths: Path) -> list[int]:
    for p in paths:
        assert str(p) in message, (p, message)
        message = message.replace(str(p), "")
    return [int(x) for x in re.findall(r"\d+", message)]


def encode(tok, lines: list[str]) -> list[list[int]]:
    """The tokenizer's own encoding, one line at a time (independent of the cache's batching)."""
    return [tok.encode(line, add_special_tokens=False).ids for line in lines]


def cached_pairs(cache) -> list[tuple[list[int], list[int]]]:
    return [(s.tolist(), t.tolist()) for s, t in (cache.pair(i) for i in range(len(cache)))]


def snapshot(cache) -> dict[str, np.ndarray]:
    """Copies of every array (the cache itself is memory-mapped)."""
    return {name: np.array(getattr(cache, name)) for name in
            ("src", "tgt", "src_start", "src_len", "tgt_start", "tgt_len")}


def assert_same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --- ParallelCorpus.from_prefix and pairs ------------------------------------------------------


@pytest.mark.parametrize("src_gz, tgt_gz", [(False, False), (True, True), (False, True), (True, False)])
def test_from_prefix_finds_plain_and_gz(tmp_path, bible, src_gz, tgt_gz):
    src, tgt = bible[0][:50], bible[1][:50]
    s = write_side(tmp_path / f"c.{SRC}", src, src_gz)
    t = write_side(tmp_path / f"c.{TGT}", tgt, tgt_gz)
    corpus = ParallelCorpus.from_prefix(tmp_path / "c", SRC, TGT)
    assert (corpus.src_path, corpus.tgt_path) == (s, t)
    assert list(corpus.pairs()) == list(zip(src, tgt))
    assert corpus.check_line_counts() == 50


def test_from_prefix_prefers_plain_and_reports_missing(tmp_path):
    write_side(tmp_path / f"c.{SRC}", ["plain"])
    write_side(tmp_path / f"c.{SRC}", ["zipped"], gz=True)
    write_side(tmp_path / f"c.{TGT}", ["x"])
    assert ParallelCorpus.from_prefix(tmp_path / "c", SRC, TGT).src_path == tmp_path / f"c.{SRC}"
    with pytest.raises(NmtError) as err:
        ParallelCorpus.from_prefix(tmp_path / "c", SRC, "fr")
    assert str(tmp_path / "c.fr") in str(err.value)
    with pytest.raises(UsageError):
        ParallelCorpus.from_prefix(tmp_path / "c", SRC, SRC)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_from_prefix_names_a_side_that_is_not_a_regular_file(tmp_path, kind):
    """A directory or a FIFO at PREFIX.lang is named as what it is, not as a missing file."""
    write_side(tmp_path / f"c.{SRC}", ["hola"])
    if kind == "directory":
        (tmp_path / f"c.{TGT}").mkdir()
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(tmp_path / f"c.{TGT}")
    with pytest.raises(NmtError) as err:
        ParallelCorpus.from_prefix(tmp_path / "c", SRC, TGT)
    expected = {"directory": "is a directory, expected a text file",
                "fifo": "is not a regular file (a FIFO or a device?), expected a text file (a corpus is read more than once)"}
    assert str(err.value) == f"{tmp_path / f'c.{TGT}'}: {expected[kind]}"


@pytest.mark.parametrize("option", ["--train", "--dev", "--test"])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_prefix_whose_file_is_not_a_regular_file_is_named_by_nmt_train(tmp_path, option, kind):
    from conftest import error_line, run_nmt, without_paths, write_slice

    good = write_slice(tmp_path / "data", "ok", 40)
    bad = tmp_path / "data" / "bad"
    (tmp_path / "data" / "bad.es").write_bytes((tmp_path / "data" / "ok.es").read_bytes())
    if kind == "directory":
        Path(f"{bad}.en").mkdir()
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(f"{bad}.en")
    prefixes = {"--train": good, "--dev": good, "--test": None, option: bad}
    args = ["--train", str(prefixes["--train"]), "--dev", str(prefixes["--dev"]),
            *(["--test", str(prefixes["--test"])] if prefixes["--test"] else [])]
    r = run_nmt("train", *args, "--src", "es", "--tgt", "en", "--preset", "tiny", "--max-steps", "1",
                "--vocab-size", "600", "--out", str(tmp_path / "run"), timeout=120)
    what = "is a directory" if kind == "directory" else "is not a regular file"
    assert without_paths(error_line(r, 1)).startswith(f"nmt: error: <path>: {what}")
    assert f"{bad}.en" in error_line(r, 1)


def test_pairs_handles_crlf_and_missing_final_newline(tmp_path):
    (tmp_path / f"c.{SRC}").write_bytes(b"uno\r\ndos\r\n\r\ntres")
    (tmp_path / f"c.{TGT}").write_bytes(b"one\ntwo\n\nthree\n")
    corpus = ParallelCorpus.from_prefix(tmp_path / "c", SRC, TGT)
    assert list(corpus.pairs()) == [("uno", "one"), ("dos", "two"), ("", ""), ("tres", "three")]
    assert corpus.check_line_counts() == 4


@pytest.mark.parametrize("n_src, n_tgt", [(5, 4), (4, 5), (2000, 1999), (1999, 2000), (1, 0), (0, 3)])
@pytest.mark.parametrize("gz", [False, True])
def test_line_count_mismatch_names_both_files_and_counts(tmp_path, bible, n_src, n_tgt, gz):
    corpus = write_corpus(tmp_path, "c", bible[0][:n_src], bible[1][:n_tgt], gz)
    with pytest.raises(NmtError) as err:
        list(corpus.pairs())
    assert sorted(numbers_besides_paths(str(err.value), corpus.src_path, corpus.tgt_path)) == sorted([n_src, n_tgt])
    with pytest.raises(NmtError) as err:
        corpus.check_line_counts()
    assert sorted(numbers_besides_paths(str(err.value), corpus.src_path, corpus.tgt_path)) == sorted([n_src, n_tgt])


def test_a_line_count_mismatch_is_found_before_any_encoding(tmp_path, bible, vocabs, monkeypatch):
    """With a tokenizer already there (a resume, a fine-tune) no sample has counted the lines: the
    cache's own fingerprints do, before a line is encoded."""
    corpus = write_corpus(tmp_path, "c", bible[0][:1000], bible[1][:999])

    def encoding(*args):
        raise AssertionError("encoded before the line counts were compared")

    monkeypatch.setattr(cache_mod, "_encode_chunk", encoding)
    with pytest.raises(NmtError, match=r"line counts differ: .*c\.es has 1000 lines, .*c\.en has 999$"):
        load_or_build([corpus], vocabs, Filters(), tmp_path / "cache")


@pytest.mark.parametrize("extra_on", [SRC, TGT])
def test_one_extra_empty_line_at_the_end_is_a_mismatch(tmp_path, extra_on):
    lines = ["a", "b", "c"]
    corpus = write_corpus(tmp_path, "c", lines, lines)
    path = corpus.src_path if extra_on == SRC else corpus.tgt_path
    path.write_bytes(path.read_bytes() + b"\n")  # "a\nb\nc\n\n": four lines, the last one empty
    with pytest.raises(NmtError) as err:
        list(corpus.pairs())
    counts = numbers_besides_paths(str(err.value), corpus.src_path, corpus.tgt_path)
    assert sorted(counts) == [3, 4]
    # and the count belongs to the file that has it
    assert re.search(re.escape(str(path)) + r"\D*4\b", str(err.value))


@pytest.mark.parametrize("side", [SRC, TGT])
@pytest.mark.parametrize("gz", [False, True])
def test_invalid_utf8_names_file_and_line(tmp_path, bible, side, gz):
    src, tgt = bible[0][:20], bible[1][:20]
    prefix = tmp_path / "c"
    lines = {SRC: src, TGT: tgt}
    for lang in (SRC, TGT):
        data = "".join(line + "\n" for line in lines[lang]).encode()
        if lang == side:
            parts = data.split(b"\n")
            parts[6] = parts[6][:5] + b"\xc3\x28" + parts[6][5:]  # line 7: an invalid 2-byte sequence
            data = b"\n".join(parts)
        path = Path(f"{prefix}.{lang}" + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
    corpus = ParallelCorpus.from_prefix(prefix, SRC, TGT)
    bad = corpus.src_path if side == SRC else corpus.tgt_path
    seen = []
    with pytest.raises(NmtError) as err:
        for pair in corpus.pairs():
            seen.append(pair)
    assert str(bad) in str(err.value)
    assert re.search(r"\bline 7\b", str(err.value)), str(err.value)
    assert seen == list(zip(src, tgt))[:6]  # everything before the bad line came through


# --- streamed uniform sampling ---------------------------------------------------------------


def _chi2_threshold(df: int, z: float = 3.72) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at normal score z (3.72: p = 1e-4)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def _chunked(items: list, sizes: list[int]):
    """items as 1-column chunks of the given sizes, cycling through them."""
    i, j = 0, 0
    while i < len(items):
        m = sizes[j % len(sizes)]
        yield (items[i : i + m],)
        i, j = i + m, j + 1


def sample(items, k: int, seed: int, sizes=(7, 1, 30)) -> list:
    items = list(items)
    return [x for (column,) in sample_chunks(_chunked(items, list(sizes)), len(items), k, seed) for x in column]


def test_sampling_marginals_uniform():
    """Each of n items is in the sample with probability k/n. Over R runs with different seeds
    its count is Binomial(R, k/n): mean 300, sd 16.4 here. The sum of squared standardised
    deviations is ~chi-square(n-1) (the counts sum to R·k); the threshold has p = 1e-4 under a
    correct sampler, and no single item may be 5 sd off (p ~ 1e-4 over all 200 items)."""
    n, k, runs = 200, 20, 3000
    counts = np.zeros(n, dtype=np.int64)
    for seed in range(runs):
        drawn = sample(range(n), k, seed)
        assert len(drawn) == k and len(set(drawn)) == k
        counts[drawn] += 1
    p = k / n
    mean, var = runs * p, runs * p * (1 - p)
    chi2 = float(((counts - mean) ** 2 / var).sum())
    assert chi2 < _chi2_threshold(n - 1), chi2
    assert np.abs(counts - mean).max() < 5 * math.sqrt(var)
    # the first chunks are not favoured over the last
    assert abs(int(counts[:k].sum()) - int(counts[-k:].sum())) < 5 * math.sqrt(2 * k * var)


@pytest.mark.parametrize("sizes", [(1,), (2, 3, 1), (6,)])
def test_sampling_subsets_uniform(sizes):
    """Joint uniformity on a small stream: all C(6,2) = 15 subsets equally likely, however the
    stream is cut into chunks (an error in the share each chunk gets, invisible in the marginals
    above, shows here)."""
    n, k, runs = 6, 2, 15000
    subsets = list(combinations(range(n), k))
    counts = Counter(tuple(sample(range(n), k, seed, sizes)) for seed in range(runs))
    assert set(counts) == set(subsets)
    expected = runs / len(subsets)
    chi2 = sum((counts[s] - expected) ** 2 / expected for s in subsets)
    assert chi2 < _chi2_threshold(len(subsets) - 1), chi2


@pytest.mark.parametrize("n, k", [(1000, 10), (5, 10), (10, 10), (0, 3), (7, 0)])
def test_sampling_keeps_stream_order_and_takes_all_when_k_covers_it(n, k):
    items = [f"item-{i}" for i in reversed(range(n))]  # stream order is not sorted order
    drawn = sample(items, k, seed=3)
    assert len(drawn) == min(n, k)
    positions = [items.index(x) for x in drawn]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    if k >= n:
        assert drawn == items


def test_sampling_is_seeded_and_refuses_more_rows_than_announced():
    a = sample(range(500), 30, seed=7)
    assert a == sample(range(500), 30, seed=7) and a != sample(range(500), 30, seed=8)
    with pytest.raises(ValueError, match="more than the 5 rows"):
        list(sample_chunks(iter([(list(range(6)),)]), 5, 2, seed=1))


def test_sample_corpora_keeps_pairs_aligned(tmp_path, bible):
    a = write_corpus(tmp_path, "a", bible[0][:300], bible[1][:300])
    b = write_corpus(tmp_path, "b", bible[0][300:450], bible[1][300:450], gz=True)
    chunks = list(sample_corpora([a, b], 100, seed=1))
    src, tgt = [s for c in chunks for s in c[0]], [t for c in chunks for t in c[1]]
    real = list(zip(bible[0][:450], bible[1][:450]))
    assert len(src) == len(tgt) == 100
    positions = [real.index(p) for p in zip(src, tgt)]
    assert positions == sorted(positions)
    assert any(p >= 300 for p in positions)  # both corpora are sampled


# --- fingerprint ----------------------------------------------------------------------------


def _check_fingerprint(path: Path, text_lines: int) -> None:
    data = path.read_bytes()
    fp = fingerprint(path)
    assert fp.size == len(data) == path.stat().st_size
    assert fp.sha256 == hashlib.sha256(data).hexdigest()
    assert fp.lines == text_lines


@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("gz", [False, True])
def test_fingerprint(tmp_path, bible, final_newline, gz):
    lines = bible[0][:137]
    path = write_side(tmp_path / "f.es", lines, gz=gz, final_newline=final_newline)
    _check_fingerprint(path, 137)


def test_fingerprint_empty_and_single_line_files(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    _check_fingerprint(tmp_path / "empty", 0)
    (tmp_path / "one").write_bytes(b"x")
    _check_fingerprint(tmp_path / "one", 1)
    (tmp_path / "blank").write_bytes(b"\n\n")
    _check_fingerprint(tmp_path / "blank", 2)


@pytest.mark.parametrize("size, ends_with_newline", [(1 << 22, True), (1 << 22, False), ((1 << 22) + 1, False)])
def test_fingerprint_across_read_chunks(tmp_path, size, ends_with_newline):
    """Files at and just past the 4 MiB read size: the last-byte check must see the real end."""
    line = b"x" * 99 + b"\n"
    data = (line * (size // len(line) + 1))[:size]
    data = data[:-1] + (b"\n" if ends_with_newline else b"y")
    path = tmp_path / "big"
    path.write_bytes(data)
    _check_fingerprint(path, data.count(b"\n") + (not ends_with_newline))


def test_fingerprint_missing_file(tmp_path):
    with pytest.raises(NmtError) as err:
        fingerprint(tmp_path / "nope")
    assert str(err.value) == f"{tmp_path / 'nope'}: cannot read ({os.strerror(errno.ENOENT)})"


def test_the_fingerprint_memo_forgets_files_since_removed(tmp_path, monkeypatch):
    """A removed file's entry (a rebuilt cache's files) leaves the memo the next time it is
    written; the entries of files still there stay."""
    import nmt.corpus as corpus_mod

    fingerprints = corpus_mod.fingerprints
    monkeypatch.setattr(corpus_mod, "SETTLED_NS", -10**12)  # remember even just-written files
    memo, kept, gone = tmp_path / "memo.json", tmp_path / "kept.txt", tmp_path / "gone.txt"
    for path in (kept, gone):
        path.write_bytes(b"uno\n")
    fingerprints([kept, gone], memo)
    assert set(json.loads(memo.read_text())) == {str(kept.resolve()), str(gone.resolve())}
    gone.unlink()
    other = tmp_path / "other.txt"
    other.write_bytes(b"dos\n")
    fingerprints([other], memo)  # a new entry: the memo is written again
    assert set(json.loads(memo.read_text())) == {str(kept.resolve()), str(other.resolve())}


def test_fingerprint_memo_skips_only_settled_unchanged_files(tmp_path, monkeypatch):
    """A file whose size, mtime, ctime and inode match the memo is not read again; a changed or a
    just-written file is (also one rewritten with its mtime put back), and every answer equals a
    fresh hash of the bytes."""
    import nmt.corpus as corpus_mod

    memo = tmp_path / "memo.json"
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    now = [time.time_ns() + 3 * 10**9]  # the clock the memo reads: 3 s on, so what is written now has settled
    monkeypatch.setattr(corpus_mod, "time", SimpleNamespace(time_ns=lambda: now[0]))
    old.write_bytes(b"uno\ndos\n")
    os.utime(old, ns=(10**18, 10**18))  # modified long ago: its stamp can be trusted
    new.write_bytes(b"tres\n")
    os.utime(new, ns=(now[0], now[0]))  # modified just now: hashed on every run
    reads = Counter()
    real = corpus_mod.fingerprint

    def counting(path):
        reads[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(corpus_mod, "fingerprint", counting)

    def check():
        prints = corpus_mod.fingerprints([old, new], memo)
        for path, fp in zip((old, new), prints):
            assert (fp.sha256, fp.size, fp.lines) == (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                      path.stat().st_size, path.read_bytes().count(b"\n"))

    check()
    check()
    assert reads == {"old.txt": 1, "new.txt": 2}
    old.write_bytes(b"uno\ntres\n")  # changed content, a new mtime
    os.utime(old, ns=(2 * 10**18, 2 * 10**18))
    check()
    assert reads["old.txt"] == 2
    past = 15 * 10**17  # 2017: settled
    os.utime(old, ns=(past, past))
    check()
    check()
    assert reads["old.txt"] == 3
    time.sleep(0.05)  # past the file system's timestamp tick
    old.write_bytes(b"dos\ntres\n")  # rewritten in place, same size, its mtime put back (cp -p): a new ctime
    os.utime(old, ns=(past, past))
    check()
    assert reads["old.txt"] == 4
    memo.write_text("{not json")  # a broken memo only costs a re-hash
    check()
    assert reads["old.txt"] == 5
    key = str(old.resolve())
    for shape in ("[]", "null", json.dumps({key: 1}), json.dumps({key: {"stamp": None}})):  # JSON, not a memo
        memo.write_text(shape)
        check()
    assert reads["old.txt"] == 9  # each only costs a re-hash
    stamped = json.loads(memo.read_text())
    check()
    assert reads["old.txt"] == 9 and stamped[key]["lines"] == 2  # the memo written anew serves again
    del stamped[key]["lines"]  # a record cut down: re-hashed, not a KeyError
    memo.write_text(json.dumps(stamped))
    check()
    assert reads["old.txt"] == 10
    now[0] = time.time_ns()  # the real clock again
    old.write_bytes(b"uno\nuno\n")  # cp -p: an old mtime, a ctime of now: not remembered (a second rewrite
    os.utime(old, ns=(past, past))  # within the ctime's tick would keep the stamp)
    check()
    assert reads["old.txt"] == 11
    assert json.loads(memo.read_text())[key]["stamp"]["ctime_ns"] != old.stat().st_ctime_ns


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 22])
@pytest.mark.parametrize("gz", [False, True])
def test_block_reading_equals_line_reading(tmp_path, bible, block, gz, monkeypatch):
    """chunks() (whole blocks decoded at once, for the cache) yields exactly the pairs of
    pairs() (a line at a time), with a byte order mark, CRLF, blank lines, a missing final newline and any block
    size; invalid UTF-8 and mismatched counts raise the same one-line errors."""
    import nmt.textio as textio

    real = textio.read_line_blocks
    monkeypatch.setattr("nmt.corpus.read_line_blocks", lambda path: real(path, block_bytes=block))
    src = bible[0][:40] + ["", "  ", "último"]
    tgt = bible[1][:40] + ["x", "", "last"]
    raw_src = b"\xef\xbb\xbf" + ("\r\n".join(src) + "\r\n").encode()  # a byte order mark (not text), CRLF
    raw_tgt = "\n".join(tgt).encode()  # no final newline
    for name, data in (("c.es", raw_src), ("c.en", raw_tgt)):
        path = tmp_path / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
    corpus = ParallelCorpus.from_prefix(tmp_path / "c", SRC, TGT)
    for n in (1, 3, 1000):
        chunks = list(corpus.chunks(n))
        assert all(len(s) == len(t) == n for s, t in chunks[:-1])
        assert [p for s, t in chunks for p in zip(s, t)] == list(corpus.pairs()) == list(zip(src, tgt))

    bad = raw_src.replace("último".encode(), b"\xff" + "ltimo".encode())
    (tmp_path / "c.es").unlink(missing_ok=True)
    (tmp_path / "c.es.gz").unlink(missing_ok=True)
    (tmp_path / "c.es").write_bytes(bad)
    corpus = ParallelCorpus.from_prefix(tmp_path / "c", SRC, TGT)
    errors = []
    for read in (lambda: list(corpus.pairs()), lambda: list(corpus.chunks(5))):
        with pytest.raises(NmtError) as e:
            read()
        errors.append(str(e.value))
    assert errors[0] == errors[1] and f"line {len(src)}: invalid UTF-8 at byte 0" in errors[0]

    (tmp_path / "c.es").write_bytes(raw_src + b"one more\n")
    corpus = ParallelCorpus.from_prefix(tmp_path / "c", SRC, TGT)
    with pytest.raises(NmtError, match="line counts differ"):
        list(corpus.chunks(4))


def test_gather_reads_what_the_arrays_hold(tmp_path, bible, vocabs):
    """Training's pread path returns the same ids and lengths as the memory-mapped arrays."""
    corpus = write_corpus(tmp_path, "c", bible[0][:300], bible[1][:300])
    cache = load_or_build([corpus], vocabs, PERMISSIVE, tmp_path / "cache")
    indices = np.random.default_rng(0).permutation(len(cache))
    src, tgt = cache.gather(indices)
    for i, s, t in zip(indices, src, tgt):
        ms, mt = cache.pair(int(i))
        assert s.tolist() == ms.tolist() and t.tolist() == mt.tolist()
    assert cache.target_lengths(indices) == [int(cache.tgt_len[i]) for i in indices]
    assert cache.gather(np.zeros(0, np.int64)) == ([], [])


def test_reading_batches_does_not_keep_the_cache_resident(tmp_path):
    """Resident memory stays near one batch: after gathering batches from all over a 64 MiB
    cache, the process maps almost none of its pages (reading through the memory mapping, it
    mapped all 64 MiB)."""
    from nmt.batching import collate

    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs Linux /proc")

    def rss_file_kib() -> int:
        return int(re.search(r"RssFile:\s+(\d+)", status.read_text()).group(1))

    n, length = 1_000_000, 16  # ids per side: 2 × 32 MiB of uint16
    directory = tmp_path / "cache"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for side in ("src", "tgt"):
        rng.integers(4, 1000, n * length, dtype=np.uint16).tofile(directory / f"{side}.bin")
        np.save(directory / f"{side}_start.npy", np.arange(n, dtype=np.int64) * length)
        np.save(directory / f"{side}_len.npy", np.full(n, length, dtype=np.int32))
    (directory / "meta.json").write_text(json.dumps({"dtype": "uint16", "report": {}}))
    cache = open_cache(directory)
    before = rss_file_kib()
    every_page = rng.permutation(np.arange(0, n, 64))  # 64 pairs × 16 ids × 2 bytes = 2 KiB apart
    for indices in np.array_split(every_page, 32):
        batch = collate(cache, indices)
        assert batch.src.shape == (len(indices), 24)  # 16 ids + EOS, padded to a multiple of 8
    grown_mib = (rss_file_kib() - before) / 1024
    assert grown_mib < 8, f"{grown_mib:.0f} MiB of the cache still mapped"


# --- token cache: content ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocabs(bible):
    return train_vocabs(iter(bible[0]), iter(bible[1]), TokenizerConfig(vocab_size=600))


@pytest.fixture(scope="module")
def separate_vocabs(bible):
    return train_vocabs(iter(bible[0]), iter(bible[1]), TokenizerConfig(vocab_size=500, joint=False))


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_LINES", 128)  # several chunks and a partial last one


def _expected(vocabs: Vocabs, src: list[str], tgt: list[str]):
    return list(zip(encode(vocabs.src, src), encode(vocabs.tgt, tgt)))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("joint", [True, False])
def test_cache_equals_tokenizer_encoding(tmp_path, bible, vocabs, separate_vocabs, small_chunks, gz, joint):
    v = vocabs if joint else separate_vocabs
    src, tgt = bible[0][:600], bible[1][:600]
    corpus = write_corpus(tmp_path, "c", src, tgt, gz)
    cache = load_or_build([corpus], v, PERMISSIVE, tmp_path / "cache")
    assert cached_pairs(cache) == _expected(v, src, tgt)
    assert cache.report == FilterReport(read=600, kept=600)
    assert cache.src.dtype == np.uint16
    # the flat arrays hold nothing but the pairs, in order
    assert len(cache.src) == int(cache.src_len.sum()) and len(cache.tgt) == int(cache.tgt_len.sum())
    np.testing.assert_array_equal(cache.src_start[1:], np.cumsum(cache.src_len)[:-1])
    np.testing.assert_array_equal(cache.tgt_start[1:], np.cumsum(cache.tgt_len)[:-1])


def test_cache_of_several_corpora_concatenates_in_order(tmp_path, bible, vocabs, small_chunks):
    src, tgt = bible
    parts = [(0, 300, False), (300, 550, True), (550, 627, False)]
    corpora = [write_corpus(tmp_path, f"part{i}", src[a:b], tgt[a:b], gz) for i, (a, b, gz) in enumerate(parts)]
    cache = load_or_build(corpora, vocabs, PERMISSIVE, tmp_path / "cache")
    assert cached_pairs(cache) == _expected(vocabs, src[:627], tgt[:627])
    reversed_cache = load_or_build(corpora[::-1], vocabs, PERMISSIVE, tmp_path / "cache")
    assert reversed_cache.directory != cache.directory
    expected = _expected(vocabs, src[550:627] + src[300:550] + src[:300], tgt[550:627] + tgt[300:550] + tgt[:300])
    assert cached_pairs(reversed_cache) == expected


# --- token cache: reuse and rebuild ----------------------------------------------------------


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_unchanged_inputs_reuse_the_cache_without_encoding(tmp_path, bible, vocabs, monkeypatch, caplog):
    corpus = write_corpus(tmp_path, "c", bible[0][:200], bible[1][:200])
    root = tmp_path / "cache"
    first = load_or_build([corpus], vocabs, PERMISSIVE, root)
    before = _mtimes(first.directory)
    first_arrays = snapshot(first)

    def no_encoding(*args, **kwargs):
        raise AssertionError("a valid cache was re-encoded")

    monkeypatch.setattr(cache_mod, "_encode_chunk", no_encoding)
    os.utime(corpus.src_path, ns=(1, 1))  # a new mtime alone changes nothing: the key is the content
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nmt.cache"):
        again = load_or_build([corpus], vocabs, PERMISSIVE, root)
    assert again.directory == first.directory
    assert _mtimes(again.directory) == before
    assert "reused" in caplog.text and "building" not in caplog.text
    assert_same_arrays(snapshot(again), first_arrays)
    assert [p.name for p in root.iterdir() if p.is_dir()] == [first.directory.name]


def test_changed_data_tokenizer_or_filters_rebuild(tmp_path, bible, vocabs, separate_vocabs, caplog):
    src, tgt = bible[0][:200], bible[1][:200]
    corpus = write_corpus(tmp_path, "c", src, tgt)
    root = tmp_path / "cache"
    base = load_or_build([corpus], vocabs, PERMISSIVE, root)
    base_dir = base.directory

    # a changed training file, same size: one letter of line 100 of the target
    changed = list(tgt)
    changed[99] = changed[99].replace("e", "a", 1)
    assert changed[99] != tgt[99] and len(changed[99]) == len(tgt[99])
    write_side(corpus.tgt_path, changed)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nmt.cache"):
        rebuilt = load_or_build([corpus], vocabs, PERMISSIVE, root)
    assert rebuilt.directory != base_dir and "building" in caplog.text
    assert cached_pairs(rebuilt) == _expected(vocabs, src, changed)

    write_side(corpus.tgt_path, tgt)  # back to the original: the first cache is valid again
    assert load_or_build([corpus], vocabs, PERMISSIVE, root).directory == base_dir

    other_tok = load_or_build([corpus], separate_vocabs, PERMISSIVE, root)
    assert other_tok.directory != base_dir
    assert cached_pairs(other_tok) == _expected(separate_vocabs, src, tgt)

    other_filters = load_or_build([corpus], vocabs, Filters(max_length=10**6, max_ratio=1e9, dedupe=True), root)
    assert other_filters.directory != base_dir
    assert len({p.name for p in root.iterdir() if p.is_dir()}) == 4


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 2)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _remove(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage, name", [(_truncate, "src.bin"), (_flip_byte, "tgt.bin"), (_flip_byte, "src_len.npy"),
                                          (_truncate, "tgt_start.npy"), (_remove, "meta.json"), (_remove, "src.bin")])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, bible, vocabs, damage, name, caplog):
    corpus = write_corpus(tmp_path, "c", bible[0][:300], bible[1][:300])
    root = tmp_path / "cache"
    first = load_or_build([corpus], vocabs, PERMISSIVE, root)
    directory, original = first.directory, snapshot(first)
    del first
    key, _ = cache_key([corpus], vocabs, PERMISSIVE)
    assert directory.name == key and verify(directory, key) is None
    size = (directory / name).stat().st_size
    damage(directory / name)
    if damage is _flip_byte:
        assert (directory / name).stat().st_size == size
    problem = verify(directory, key)
    assert problem is not None
    if name != "meta.json":
        assert name in problem
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nmt.cache"):
        rebuilt = load_or_build([corpus], vocabs, PERMISSIVE, root)
    assert "rebuilding" in caplog.text
    assert rebuilt.directory == directory and verify(directory, key) is None
    assert_same_arrays(snapshot(rebuilt), original)
    assert cached_pairs(rebuilt) == _expected(vocabs, bible[0][:300], bible[1][:300])


def test_a_warm_start_hashes_no_unchanged_cache_file_and_a_changed_one_again(tmp_path, bible, vocabs, monkeypatch):
    import nmt.corpus as corpus_mod

    corpus = write_corpus(tmp_path, "c", bible[0][:300], bible[1][:300])
    root = tmp_path / "cache"
    directory = load_or_build([corpus], vocabs, PERMISSIVE, root).directory
    key, _ = cache_key([corpus], vocabs, PERMISSIVE)
    memo = root / cache_mod.MEMO_FILE
    monkeypatch.setattr(corpus_mod, "SETTLED_NS", 0)  # the files just written count as settled
    assert verify(directory, key, memo) is None  # hashed, and their stamps recorded
    hashed, real = [], corpus_mod.fingerprint
    monkeypatch.setattr(corpus_mod, "fingerprint", lambda path: hashed.append(Path(path).name) or real(path))
    assert verify(directory, key, memo) is None and hashed == []
    tgt = directory / "tgt.bin"
    before = tgt.stat()
    _flip_byte(tgt)
    os.utime(tgt, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a new stamp even within one clock tick
    assert tgt.stat().st_size == before.st_size
    assert verify(directory, key, memo) == "tgt.bin is corrupted (checksum differs)"
    assert hashed == ["tgt.bin"]


def test_build_pauses_the_garbage_collector_and_restores_it(tmp_path, bible, vocabs, monkeypatch):
    corpus = write_corpus(tmp_path, "c", bible[0][:120], bible[1][:120])
    monkeypatch.setattr(cache_mod, "CHUNK_LINES", 50)
    real, seen = cache_mod._encode_chunk, []

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_encode_chunk", spy)
    gc.disable()
    try:
        load_or_build([corpus], vocabs, PERMISSIVE, tmp_path / "off")
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()
    cache = load_or_build([corpus], vocabs, PERMISSIVE, tmp_path / "on")
    assert seen == [False] * 6 and gc.isenabled()
    assert cached_pairs(cache) == _expected(vocabs, bible[0][:120], bible[1][:120])


def test_failed_build_leaves_no_cache_directory(tmp_path, bible, vocabs, monkeypatch):
    corpus = write_corpus(tmp_path, "c", bible[0][:200], bible[1][:200])
    root = tmp_path / "cache"
    key, _ = cache_key([corpus], vocabs, PERMISSIVE)
    monkeypatch.setattr(cache_mod, "CHUNK_LINES", 50)
    real = cache_mod._encode_chunk
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full, say")
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_encode_chunk", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        load_or_build([corpus], vocabs, PERMISSIVE, root)
    assert len(calls) in (2, 3)  # the build stops there (with at most one chunk encoded ahead)
    assert not (root / key).exists()
    assert [p for p in root.iterdir() if p.name != cache_mod.MEMO_FILE] == []  # nor a half-written temporary directory
    assert gc.isenabled()  # the collector, paused while encoding, is back on after a failure
    monkeypatch.setattr(cache_mod, "_encode_chunk", real)
    cache = load_or_build([corpus], vocabs, PERMISSIVE, root)
    assert cache.directory == root / key
    assert cached_pairs(cache) == _expected(vocabs, bible[0][:200], bible[1][:200])


# --- token cache: filters ---------------------------------------------------------------------

MAX_LENGTH, MAX_RATIO = 40, 2.0


def _crafted_pairs(vocabs: Vocabs, bible) -> tuple[list[tuple[str, str]], list[str]]:
    """Pairs with the filter each one must fall to (or "kept"), built from token lengths counted
    here with the tokenizer. Every pair falls to exactly one filter, except ("", ""), which is
    empty before it is identical."""
    src, tgt = bible
    n_src = [len(x) + 1 for x in encode(vocabs.src, src)]  # + end of sentence
    n_tgt = [len(x) + 1 for x in encode(vocabs.tgt, tgt)]

    def in_ratio(a, b):
        return max(a, b) <= MAX_RATIO * min(a, b) and max(a - 1, b - 1) <= MAX_RATIO * min(a - 1, b - 1)

    def clearly_over_ratio(a, b):  # over the ratio with and without counting the end of sentence
        return max(a, b) > MAX_RATIO * min(a, b) and max(a - 1, b - 1) > MAX_RATIO * min(a - 1, b - 1)

    normal = [i for i in range(len(src)) if max(n_src[i], n_tgt[i]) < MAX_LENGTH and in_ratio(n_src[i], n_tgt[i])]
    at_limit = [i for i in range(len(src)) if max(n_src[i], n_tgt[i]) == MAX_LENGTH and in_ratio(n_src[i], n_tgt[i])]
    one_over = [i for i in range(len(src)) if max(n_src[i], n_tgt[i]) == MAX_LENGTH + 1 and in_ratio(n_src[i], n_tgt[i])]
    far_over = [i for i in range(len(src)) if min(n_src[i], n_tgt[i]) > 2 * MAX_LENGTH and in_ratio(n_src[i], n_tgt[i])]
    assert len(normal) > 60 and at_limit and one_over and far_over
    # ratio: a short source against a long target (and the reverse), both within the length limit
    i, j = next((i, j) for i in normal for j in normal
                if clearly_over_ratio(n_src[i], n_tgt[j]) and clearly_over_ratio(n_src[j], n_tgt[i]))

    pairs: list[tuple[tuple[str, str], str]] = []
    for k in normal[:30]:
        pairs.append(((src[k], tgt[k]), "kept"))
    pairs += [
        (("", tgt[normal[30]]), "empty"),
        ((src[normal[31]], ""), "empty"),
        (("  \t ", tgt[normal[32]]), "empty"),
        (("", ""), "empty"),
        ((src[at_limit[0]], tgt[at_limit[0]]), "kept"),
        ((src[one_over[0]], tgt[one_over[0]]), "too_long"),
        ((src[far_over[0]], tgt[far_over[0]]), "too_long"),
        ((src[i], tgt[j]), "ratio"),
        ((src[j], tgt[i]), "ratio"),
        (("Amén.", "Amén."), "identical"),
        ((tgt[normal[33]], tgt[normal[33]]), "identical"),
        ((src[normal[0]], tgt[normal[0]]), "duplicate"),  # a repeat of the first pair
        ((src[normal[34]], tgt[normal[34]]), "kept"),
        ((src[normal[34]], tgt[normal[35]]), "kept"),  # same source, other target: not a duplicate
        ((src[normal[36]], tgt[normal[34]]), "kept"),  # other source, same target: not a duplicate
        ((src[normal[34]], tgt[normal[34]]), "duplicate"),
        ((src[normal[34]], tgt[normal[34]]), "duplicate"),
        ((src[normal[5]] + " ", tgt[normal[5]]), "kept"),  # differs by a space: not exact duplicate
    ]
    for k in normal[40:60]:
        pairs.append(((src[k], tgt[k]), "kept"))
    pairs.append(((src[normal[45]], tgt[normal[45]]), "duplicate"))  # repeats across chunks
    pairs.append(((src[normal[29]], tgt[normal[29]]), "duplicate"))
    rng = random.Random(0)
    rng.shuffle(pairs)
    # a duplicate must come after the pair it repeats: relabel by first occurrence after shuffling
    seen, out, labels = set(), [], []
    for pair, label in pairs:
        if label in ("kept", "duplicate"):
            label = "duplicate" if pair in seen else "kept"
            seen.add(pair)
        out.append(pair)
        labels.append(label)
    return out, labels


def test_filters_drop_exactly_the_crafted_pairs(tmp_path, bible, vocabs, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_LINES", 7)  # duplicates across chunk boundaries too
    monkeypatch.setattr(cache_mod, "CHUNK_RECORDS", 5)  # and the index written in small chunks
    pairs, labels = _crafted_pairs(vocabs, bible)
    counts = Counter(labels)
    assert all(counts[c] >= 2 for c in ("empty", "too_long", "ratio", "identical", "duplicate"))
    corpus = write_corpus(tmp_path, "c", [s for s, _ in pairs], [t for _, t in pairs])
    cache = load_or_build([corpus], vocabs, Filters(MAX_LENGTH, MAX_RATIO, dedupe=True), tmp_path / "cache")
    kept = [p for p, label in zip(pairs, labels) if label == "kept"]
    assert cached_pairs(cache) == _expected(vocabs, [s for s, _ in kept], [t for _, t in kept])
    r = cache.report
    assert (r.read, r.kept, r.empty, r.too_long, r.ratio, r.identical, r.duplicate) == (
        len(pairs), counts["kept"], counts["empty"], counts["too_long"], counts["ratio"],
        counts["identical"], counts["duplicate"])
    assert r.read == r.kept + r.empty + r.too_long + r.ratio + r.identical + r.duplicate
    assert open_cache(cache.directory).report == r  # the report is stored with the cache


def test_dedupe_off_keeps_duplicates(tmp_path, bible, vocabs):
    src, tgt = bible[0][:20], bible[1][:20]
    corpus = write_corpus(tmp_path, "c", src + src[:5], tgt + tgt[:5])
    cache = load_or_build([corpus], vocabs, PERMISSIVE, tmp_path / "cache")
    assert cache.report == FilterReport(read=25, kept=25)
    assert cached_pairs(cache) == _expected(vocabs, src + src[:5], tgt + tgt[:5])


def test_dedupe_does_not_confuse_pairs_that_differ_by_where_a_tab_is(tmp_path, vocabs):
    src = ["uno dos\ttres", "uno dos", "cuatro"]
    tgt = ["one", "tres\tone", "four"]
    corpus = write_corpus(tmp_path, "c", src, tgt)
    cache = load_or_build([corpus], vocabs, Filters(max_length=10**6, max_ratio=1e9, dedupe=True), tmp_path / "cache")
    assert cache.report.duplicate == 0
    assert cached_pairs(cache) == _expected(vocabs, src, tgt)


def test_nothing_left_after_filtering_is_an_error_every_time(tmp_path, vocabs):
    corpus = write_corpus(tmp_path, "c", ["Amén.", "", "x"], ["Amén.", "y", ""])
    root = tmp_path / "cache"
    with pytest.raises(NmtError, match="no training pairs"):
        load_or_build([corpus], vocabs, PERMISSIVE, root)
    with pytest.raises(NmtError, match="no training pairs"):
        load_or_build([corpus], vocabs, PERMISSIVE, root)


def test_a_corpus_opening_with_a_byte_order_mark_has_a_cache_of_its_own(tmp_path, bible, vocabs):
    """Its first line is read without the mark now: a cache built when it was kept is not reused
    (the key says the mark was dropped; a corpus without one keeps its key)."""
    plain = write_corpus(tmp_path, "c", bible[0][:20], bible[1][:20])
    _, described = cache_key([plain], vocabs, PERMISSIVE)
    assert "byte_order_mark" not in described
    src = Path(plain.src_path)
    src.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    _, described = cache_key([plain], vocabs, PERMISSIVE)
    assert described["byte_order_mark"] == "dropped"


def test_the_cache_builds_and_verifies_without_python_3_11s_file_digest(tmp_path, bible, vocabs, monkeypatch):
    """nmt supports Python 3.10, which has no `hashlib.file_digest`: the cache's checksums are the
    SHA-256 of each file's bytes, computed without it."""
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    corpus = write_corpus(tmp_path, "c", bible[0][:300], bible[1][:300])
    cache = load_or_build([corpus], vocabs, PERMISSIVE, tmp_path / "cache")
    meta = json.loads((cache.directory / "meta.json").read_text())
    assert meta["files"]
    for name, info in meta["files"].items():
        assert info["sha256"] == hashlib.sha256((cache.directory / name).read_bytes()).hexdigest()
    assert verify(cache.directory, meta["key"]) is None
