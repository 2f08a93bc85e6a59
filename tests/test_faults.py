"""Failure paths end in one line, never a traceback, and leave nothing behind: a full disk under the
token cache or the weights, a corrupt .gz, a token cache with a meta.json of the wrong shape or
forged contents (rebuilt, not trained on), leftovers of killed processes (removed at start), and
closed or full stdin/stdout.

Most cases run in-process on a 300-pair corpus; the standard-stream cases run `nmt evaluate`
(which does not import torch) in a subprocess, because they are about file descriptors.
"""

from __future__ import annotations

import errno
import gc
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import full_device

import nmt.cache as cache_mod
from conftest import DATA, ROOT, error_line
from nmt import checkpoint
from nmt.cache import Filters, load_or_build
from nmt.config import TokenizerConfig
from nmt.corpus import ParallelCorpus, sha256_of
from nmt.errors import NmtError
from nmt.textio import count_lines, read_line_blocks, read_lines

N = 300


@pytest.fixture(scope="module")
def lines():
    read = lambda lang: (DATA / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:N]  # noqa: E731
    return read("es"), read("en")


@pytest.fixture(scope="module")
def vocabs(lines):
    from nmt.tokenizer import train_vocabs

    return train_vocabs(iter(lines[0]), iter(lines[1]), TokenizerConfig(vocab_size=400))


@pytest.fixture
def corpus(tmp_path, lines) -> ParallelCorpus:
    for lang, side in zip(("es", "en"), lines):
        (tmp_path / f"c.{lang}").write_text("\n".join(side) + "\n", encoding="utf-8")
    return ParallelCorpus.from_prefix(tmp_path / "c", "es", "en")


# --- a full disk ---------------------------------------------------------------------------------


def test_a_full_disk_while_building_the_cache_is_one_line_and_leaves_nothing(tmp_path, corpus, vocabs, monkeypatch):
    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod._Writer, "add", full)
    root = tmp_path / "cache"
    with pytest.raises(NmtError, match="disk full while building the token cache"):
        load_or_build([corpus], vocabs, Filters(), root)
    assert [p.name for p in root.iterdir() if p.name != "fingerprints.json"] == []


def test_a_full_disk_under_safetensors_is_a_disk_error(tmp_path, monkeypatch):
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    def full(model, path):
        Path(path).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    with pytest.raises(NmtError, match="disk full while writing"):
        checkpoint.save_weights(torch.nn.Linear(2, 2), tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("free, message", [(0, "disk full while writing"), (1 << 40, r"cannot write \(\[enforce fail.*unexpected pos")])
def test_torch_save_on_a_full_disk_is_a_disk_error(tmp_path, monkeypatch, free, message):
    import torch

    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 1 << 40, free))
    with pytest.raises(NmtError, match=message):
        checkpoint.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2), {"step": 1}, keep_last=3)
    assert list((tmp_path / "checkpoints").iterdir()) == []


# --- corrupt input -------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", [lambda p: list(read_lines(p)), lambda p: list(read_line_blocks(p)), count_lines])
def test_a_corrupt_gz_names_the_file(tmp_path, lines, reader):
    data = bytearray(gzip.compress(("\n".join(lines[0] * 20) + "\n").encode()))
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    path = tmp_path / "train.es.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(NmtError, match=f"{path}: read error"):
        reader(path)


def test_a_gz_input_is_closed_with_its_reader(tmp_path):
    path = tmp_path / "train.es.gz"
    path.write_bytes(gzip.compress(b"uno\ndos\n"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert list(read_lines(path)) == ["uno", "dos"] and [x for b in read_line_blocks(path) for x in b] == ["uno", "dos"]
        assert count_lines(path) == 2
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("reader", [lambda p: list(read_lines(p)), lambda p: [x for b in read_line_blocks(p) for x in b]])
def test_old_mac_line_endings_are_an_error_not_one_long_line(tmp_path, reader):
    """Carriage returns with no line feed in the whole file: CR-only line endings, refused with the way
    out; a CR that ends a CRLF line or stands inside a line of a file with line feeds is read as before."""
    path = tmp_path / "old.es"
    for data in (b"uno\rdos\rtres\r", b"uno\rdos", b"\xef\xbb\xbfuno\rdos\r"):
        path.write_bytes(data)
        with pytest.raises(NmtError, match=r"old.es: has carriage returns but no line feeds .*tr '\\r' '\\n'"):
            reader(path)
    for data, lines in ((b"uno\r\ndos\r\n", ["uno", "dos"]), (b"uno\r", ["uno"]), (b"u\rno\ndos", ["u\rno", "dos"])):
        path.write_bytes(data)
        assert reader(path) == lines


@pytest.mark.parametrize("reader", [lambda p: list(read_lines(p)), lambda p: [x for b in read_line_blocks(p) for x in b]])
def test_a_giant_old_mac_file_is_refused_from_its_start_not_read_whole_first(tmp_path, reader):
    """6 MiB of CR-only lines through a FIFO whose writer then holds it open: the error comes from
    the first MiB, before the end of the file, which a reader of the whole first line would wait for."""
    import threading

    fifo = tmp_path / "old.es"
    os.mkfifo(fifo)
    release, closed = threading.Event(), threading.Event()

    def write():
        try:
            with open(fifo, "wb") as f:
                f.write(b"uno\r" * (6 << 18))
                f.flush()
                release.wait(20)
                closed.set()  # then the end of the file: what a reader of the whole first line waits for
        except BrokenPipeError:  # the reader gave up first, as it should
            pass

    # the writer meets a closed pipe: an error to catch, not SIGPIPE, which a test that ran `cli.main`
    # in this process may have set back to its default (it ends the process: the worker crashed)
    previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        with pytest.raises(NmtError, match=r"old.es: has carriage returns but no line feeds"):
            reader(fifo)
        assert not closed.is_set()  # refused while the file was still being written
    finally:
        release.set()
        writer.join(10)
        signal.signal(signal.SIGPIPE, previous)


@pytest.mark.parametrize("reader", [lambda p: list(read_lines(p)), lambda p: [x for b in read_line_blocks(p) for x in b]])
def test_both_readers_judge_a_long_first_line_alike(tmp_path, reader):
    """A first line longer than the check's MiB, with a carriage return in it and no line feed there,
    is refused by both readers; a shorter one with a carriage return inside is a line like any other."""
    from nmt.textio import CR_CHECK_BYTES

    path = tmp_path / "long.es"
    path.write_bytes(b"a\rb" + b"x" * CR_CHECK_BYTES + b"\ndos\n")
    with pytest.raises(NmtError, match=r"long.es: has carriage returns but no line feeds"):
        reader(path)
    path.write_bytes(b"a\rb" + b"x" * 1000 + b"\ndos\n")
    assert reader(path) == ["a\rb" + "x" * 1000, "dos"]


def test_a_line_count_error_from_one_side_of_old_mac_line_endings_says_so(tmp_path):
    (tmp_path / "c.es").write_bytes(b"uno\rdos\rtres\r")
    (tmp_path / "c.en").write_bytes(b"one\ntwo\nthree\n")
    corpus = ParallelCorpus.from_prefix(tmp_path / "c", "es", "en")
    with pytest.raises(NmtError, match=r"c.es has 1 lines, .*c.en has 3 \(.*c.es has carriage returns but no line "
                                       r"feeds: old Mac line endings, CR only\?\)$"):
        corpus.check_line_counts()
    (tmp_path / "c.es").write_bytes(b"uno\n")  # one line, no carriage return: no hint
    with pytest.raises(NmtError, match=r"c.en has 3$"):
        corpus.check_line_counts()


# --- a token cache that is not what it claims ------------------------------------------------


def _built(corpus, vocabs, root) -> Path:
    cache = load_or_build([corpus], vocabs, Filters(), root)
    return cache.directory


def _meta(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())


@pytest.mark.parametrize("forge", [
    lambda m: [],
    lambda m: {**m, "files": []},
    lambda m: {**m, "files": {k: 3 for k in m["files"]}},
    lambda m: {k: v for k, v in m.items() if k != "files"},
    lambda m: {**m, "report": [1, 2]},
    lambda m: {**m, "report": {**m["report"], "kept": "many"}},
    lambda m: {**m, "dtype": "object"},
], ids=["list", "files-list", "files-ints", "no-files", "report-list", "report-str", "dtype"])
def test_a_meta_json_of_the_wrong_shape_is_rebuilt(tmp_path, corpus, vocabs, forge, caplog):
    directory = _built(corpus, vocabs, tmp_path)
    good = _meta(directory)
    (directory / "meta.json").write_text(json.dumps(forge(good)))
    cache = load_or_build([corpus], vocabs, Filters(), tmp_path)
    assert "rebuilding" in caplog.text
    assert len(cache) == good["report"]["kept"] and _meta(directory)["files"] == good["files"]


def _forge(directory: Path, name: str, edit) -> None:
    """Change one array file and re-sign it in meta.json, as a forger would."""
    path = directory / name
    if name.endswith(".npy"):
        array = np.load(path)
        changed = edit(array)  # in place, or a new array
        np.save(path, array if changed is None else changed)
    else:
        array = np.fromfile(path, dtype=_meta(directory)["dtype"])
        edit(array)
        array.tofile(path)
    meta = _meta(directory)
    meta["files"][name] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    (directory / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name, edit, problem", [
    ("src_len.npy", lambda a: a.__setitem__(0, 10**6), "source lengths outside"),
    ("tgt_len.npy", lambda a: a.__setitem__(-1, -5), "target lengths outside"),
    ("src_start.npy", lambda a: a.__setitem__(-1, 10**9), "source spans beyond the ids"),
    ("tgt.bin", lambda a: a.__setitem__(7, 65000), "target ids beyond the vocabulary"),
    ("src_start.npy", lambda a: a.astype(np.float64), "index arrays that are not integers"),
])
def test_a_cache_with_forged_contents_is_rebuilt(tmp_path, corpus, vocabs, name, edit, problem, caplog):
    directory = _built(corpus, vocabs, tmp_path)
    good = _meta(directory)
    _forge(directory, name, edit)
    cache = load_or_build([corpus], vocabs, Filters(), tmp_path)
    assert problem in caplog.text and "rebuilding" in caplog.text
    assert _meta(directory)["files"] == good["files"] and len(cache) == good["report"]["kept"]


# --- leftovers of killed processes ----------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_processes_are_removed_at_start(tmp_path, corpus, vocabs):
    dead, alive = _dead_pid(), os.getppid()
    root = tmp_path / "cache"
    (root / f".abc.tmp-{dead}").mkdir(parents=True)
    (root / f".abc.tmp-{dead}" / "src.bin").write_bytes(b"x" * 1000)
    (root / f".fingerprints.json.tmp-{dead}").write_text("{}")
    (root / f".def.tmp-{alive}").mkdir()
    load_or_build([corpus], vocabs, Filters(), root)
    names = sorted(p.name for p in root.iterdir())
    assert f".def.tmp-{alive}" in names and not [n for n in names if n.endswith(f".tmp-{dead}")]


def test_a_half_pruned_checkpoint_and_dead_temporaries_leave_the_model_directory(tmp_path):
    dead = _dead_pid()
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-00000010").mkdir(parents=True)
    (ckpts / "step-00000010" / "state.pt").write_bytes(b"x")  # weights already deleted by a pruning
    (ckpts / "step-00000020").mkdir()
    for name in ("state.pt", checkpoint.WEIGHTS):
        (ckpts / "step-00000020" / name).write_bytes(b"x")
    (ckpts / f".step-00000030.tmp-{dead}").mkdir()
    (tmp_path / f".config.json.tmp-{dead}").write_text("{")
    (tmp_path / "notes.tmp-1").write_text("a user's file, not a temporary of ours")
    removed = checkpoint.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [f".config.json.tmp-{dead}", f".step-00000030.tmp-{dead}",
                                                "step-00000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.tmp-1"]
    assert [p.name for p in ckpts.iterdir()] == ["step-00000020"]


def test_a_directory_moved_aside_by_a_killed_replacement_comes_back(tmp_path):
    """`atomic.directory` renames NAME to .NAME.old-PID, then the new version to NAME: killed between
    the two, NAME is missing and comes back from its previous version; killed after, the previous
    version is a leftover. One of a live process is kept."""
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".cache.old-{dead}").mkdir()
    (tmp_path / f".cache.old-{dead}" / "meta.json").write_text("previous")
    (tmp_path / "step").mkdir()
    (tmp_path / f".step.old-{dead}").mkdir()
    (tmp_path / f".busy.old-{alive}").mkdir()
    removed = checkpoint.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [f".step.old-{dead}"]
    assert (tmp_path / "cache" / "meta.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".busy.old-{alive}", "cache", "step"]


# --- closed and full standard streams -------------------------------------------------------


def _evaluate(redirect: str, tmp_path: Path) -> subprocess.CompletedProcess:
    ref = tmp_path / "ref.en"
    shutil.copy(DATA / "dev.en", ref)
    command = f"{sys.executable} -m nmt evaluate -r {ref} {'' if '<' in redirect else f'-i {ref}'} {redirect}"
    return subprocess.run(["bash", "-c", command], capture_output=True, cwd=ROOT, timeout=60)


def test_evaluate_with_stdin_closed_is_one_error(tmp_path):
    assert "stdin is closed" in error_line(_evaluate("<&-", tmp_path), 1)


def test_evaluate_with_stdout_closed_is_one_error_not_lost_scores(tmp_path):
    assert "stdout is closed" in error_line(_evaluate(">&-", tmp_path), 1)


_full_device = full_device


def test_evaluate_onto_a_full_disk_is_one_error(tmp_path):
    r = _evaluate(f"> {_full_device(tmp_path)}", tmp_path)
    assert "stdout: cannot write (No space left on device)" in error_line(r, 1)


def test_a_full_disk_under_the_fingerprint_memo_leaves_no_temporary(tmp_path, corpus, monkeypatch):
    from pathlib import Path as P

    from nmt import corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "SETTLED_NS", -10**12)  # remember even just-written files
    real = P.write_text

    def full(self, *args, **kwargs):
        if ".tmp-" in self.name:
            real(self, "{")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(P, "write_text", full)
    memo = tmp_path / "memo" / "fingerprints.json"
    corpus_mod.fingerprints([corpus.src_path], memo)
    assert list(memo.parent.iterdir()) == []


# --- atomic writes through a symlink ------------------------------------------------------------


def test_an_atomic_write_through_a_symlink_replaces_its_target_and_keeps_the_mode(tmp_path):
    """`follow_link` (a command's -o FILE): the link stays, its target gets the new version."""
    from nmt import atomic

    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "notes.txt"
    target.write_text("old\n", encoding="utf-8")
    target.chmod(0o600)
    link = tmp_path / "notes.txt"
    link.symlink_to(Path("real") / "notes.txt")
    atomic.write_file(link, lambda tmp: tmp.write_text("new\n", encoding="utf-8"), follow_link=True)
    assert link.is_symlink() and os.readlink(link) == str(Path("real") / "notes.txt")
    assert target.read_text(encoding="utf-8") == "new\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["notes.txt"]  # no temporary left


def test_a_runs_own_file_that_is_a_symlink_is_replaced_and_its_target_left_alone(tmp_path):
    """Without `follow_link` (every file nmt writes for itself): a model.safetensors linked to a
    shared file elsewhere is replaced by the new one; the shared file is not changed."""
    from nmt import atomic

    shared = tmp_path / "shared.bin"
    shared.write_bytes(b"shared")
    shared.chmod(0o640)
    link = tmp_path / "run" / "model.safetensors"
    link.parent.mkdir()
    link.symlink_to(shared)
    atomic.write_file(link, lambda tmp: tmp.write_bytes(b"new"))
    assert not link.is_symlink() and link.read_bytes() == b"new"
    assert shared.read_bytes() == b"shared"


def test_a_failed_atomic_write_through_a_symlink_keeps_the_target(tmp_path):
    from nmt import atomic

    target = tmp_path / "a.txt"
    target.write_text("kept\n", encoding="utf-8")
    link = tmp_path / "link.txt"
    link.symlink_to(target)

    def full(tmp: Path) -> None:
        tmp.write_text("half", encoding="utf-8")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(NmtError) as e:
        atomic.write_file(link, full, follow_link=True)
    assert str(e.value) == f"{link}: cannot write: disk full while writing (the previous version is kept)"
    assert link.is_symlink() and target.read_text(encoding="utf-8") == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "link.txt"]


def test_an_atomic_write_without_parents_is_an_error_for_a_missing_folder(tmp_path):
    """`parents=False` (a command's -o FILE): a missing folder is the write's error, not made."""
    from nmt import atomic

    path = tmp_path / "no-such-dir" / "a.txt"
    with pytest.raises(NmtError) as e:
        atomic.write_file(path, lambda tmp: tmp.write_text("x", encoding="utf-8"), parents=False)
    assert str(e.value) == f"{path}: cannot write ({os.strerror(errno.ENOENT)})"
    assert list(tmp_path.iterdir()) == []
    atomic.write_file(path, lambda tmp: tmp.write_text("x", encoding="utf-8"))  # the default makes it
    assert path.read_text(encoding="utf-8") == "x"
