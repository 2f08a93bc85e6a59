"""End-to-end tests of `nmt translate` as a user runs it (a subprocess on a real tiny model
directory): the line contract (one line out per line in, in order, empty lines kept, however the
input is windowed, sorted and batched), JSON lines, over-long lines, stdin/stdout/files, closed
pipes, streaming, invalid UTF-8, and one-line errors with the right exit codes.

The tiny model is near random, so no test looks at what a translation says; they compare runs
that must agree (a line alone vs. in a sorted, batched window) and check the contract."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA, ROOT, error_line, full_device, ok, run_nmt, without_paths

# The test machine is small and shared: one thread per subprocess is much faster than
# oversubscribed cores (the conftest model fixture runs its `nmt train` under this too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

SOURCES = (DATA / "test.es").read_text(encoding="utf-8").splitlines()
# Python buffers a piped stdout unless PYTHONUNBUFFERED is set (as it may be in CI); the tests of
# flushing and closed pipes run the tool as a user's shell would, buffered.
BUFFERED = {**os.environ, "PYTHONUNBUFFERED": ""}


# -- helpers ------------------------------------------------------------------------------------


def translate(model: Path, *args: str, input: bytes | str | None = None):
    return run_nmt("translate", "-m", str(model), *args, input=input)



def out_lines(r: subprocess.CompletedProcess) -> list[str]:
    """stdout split on '\\n' only (the line contract is about newline-terminated lines)."""
    text = ok(r)
    assert text == "" or text.endswith("\n"), "the last output line must be newline-terminated"
    return text.split("\n")[:-1] if text else []




def varied_lines(n: int) -> list[str]:
    """n test-set sentences of pairwise different lengths (so their outputs differ, even from a
    near-random model, whose output length follows the source length)."""
    seen, lines = set(), []
    for s in SOURCES:
        words = len(s.split())
        if words not in seen and 3 <= words <= 40:
            seen.add(words)
            lines.append(s)
        if len(lines) == n:
            return lines
    raise AssertionError("not enough test sentences of distinct lengths")


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model exported to CTranslate2: `nmt translate -m` serves it under the same contract."""
    pytest.importorskip("ctranslate2")
    from nmt.export import export_ctranslate2

    return export_ctranslate2(tiny_model_dir, tmp_path_factory.mktemp("ct2") / "tiny")


@pytest.fixture(params=["nmt", "ctranslate2"])
def any_model(request, model) -> Path:
    """The contract tests run on both kinds of directory -m accepts."""
    return model if request.param == "nmt" else request.getfixturevalue("exported")


def model_dir(kind: str, request) -> Path:
    return request.getfixturevalue("model" if kind == "nmt" else "exported")


# -- the line contract --------------------------------------------------------------------------


def _contract_input() -> list[str]:
    s = varied_lines(9)
    # shuffled lengths, blanks between, blanks at both ends, a whitespace-only line, a tab line
    return ["", s[4], s[0], "   ", s[7], "", "", s[2], "\t", s[8], s[1], " \t ", s[5], s[3], "", s[6], ""]


@pytest.mark.parametrize("kind, beam", [("nmt", "1"), ("nmt", "2"), ("ctranslate2", "2")])
def test_one_line_per_line_in_order_however_windowed_and_batched(request, tmp_path, kind, beam):
    model = model_dir(kind, request)
    lines = _contract_input()
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # The guard is off: this near-random model's capped lines would all be retried into much the
    # same text, and the check below needs distinct outputs to see a reordering (the guard keeps
    # the contract too: test_decode_options).
    # window 1: every line is translated alone (a batch of one, nothing to sort)
    alone = out_lines(translate(model, "-i", str(src), "--beam-size", beam, "--window", "1", "--no-guard"))
    # window 3 + a small token budget: each window is length-sorted and cut into several batches
    batched = out_lines(translate(model, "-i", str(src), "--beam-size", beam, "--window", "3",
                                  "--batch-tokens", "60", "--no-guard"))
    assert len(alone) == len(lines) and len(batched) == len(lines)
    for i, line in enumerate(lines):
        if not line.strip():
            assert alone[i] == "" and batched[i] == "", f"blank input line {i + 1} must give an empty line"
    assert batched == alone
    # the comparison can see a reordering: the non-empty outputs differ from each other
    non_empty = [o for o, line in zip(alone, lines) if line.strip()]
    assert len(set(non_empty)) >= 7, non_empty


def test_empty_input_gives_empty_output(model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    r = translate(model, "-i", str(empty), "--beam-size", "1")
    assert ok(r) == ""
    assert "translated 0 lines" in r.stderr.decode()


def test_blank_and_unusual_lines(model):
    """Blank lines never reach the model; non-ASCII text and characters that other tools treat as
    line breaks (U+2028, VT, FF) stay inside their line."""
    odd = ["¿Qué será? «Ñandú» — 漢字 😀", "línea\u2028con separador Unicode", "a\x0bb\x0cc", "fin\r"]
    lines = ["", "  ", odd[0], "\t", odd[1], odd[2], odd[3], ""]
    r = translate(model, "--beam-size", "1", "--format", "jsonl", input="\n".join(lines) + "\n")
    records = [json.loads(line) for line in out_lines(r)]
    assert [rec["source"] for rec in records] == [*lines[:6], "fin", ""]  # CR of a CRLF ending dropped
    assert len(ok(r).splitlines()) == len(lines)  # U+2028 escaped in JSON: a reader splitting at it too sees one record a line
    for rec, line in zip(records, lines):
        blank = not line.strip()
        assert rec["flags"]["empty_input"] is blank
        assert (rec["hypotheses"] == []) is blank
        if blank:
            assert rec["translation"] == ""
    assert "4 empty" in r.stderr.decode()


# -- JSON lines ---------------------------------------------------------------------------------


def test_jsonl_records(any_model):
    model = any_model
    lines = ["", varied_lines(2)[0], "  ", varied_lines(2)[1]]
    r = translate(model, "--format", "jsonl", "--nbest", "2", "--beam-size", "2", "--batch-tokens", "40",
                  input="\n".join(lines) + "\n")
    records = [json.loads(line) for line in out_lines(r)]
    assert len(records) == len(lines)
    for rec, line in zip(records, lines):
        assert set(rec) == {"source", "translation", "hypotheses", "flags", "retried"}
        assert rec["source"] == line
        assert set(rec["flags"]) == {"empty_input", "truncated", "hit_max_length"}
        assert rec["flags"]["truncated"] is False
        if not line.strip():
            assert rec["flags"]["empty_input"] is True
            assert rec["hypotheses"] == [] and rec["translation"] == ""
            assert rec["flags"]["hit_max_length"] is False
            continue
        assert rec["flags"]["empty_input"] is False
        hyps = rec["hypotheses"]
        assert len(hyps) == 2
        for h in hyps:
            assert set(h) == {"text", "score", "logprob", "tokens"}
            assert isinstance(h["tokens"], int) and h["tokens"] >= 1
            assert h["logprob"] <= 0
        assert hyps[0]["score"] >= hyps[1]["score"], "n-best must be sorted by score, best first"
        assert rec["translation"] == hyps[0]["text"]
    # jsonl and text formats agree on the 1-best
    text = out_lines(translate(model, "--nbest", "1", "--beam-size", "2", input="\n".join(lines) + "\n"))
    assert text == [rec["translation"] for rec in records]


def test_text_format_with_nbest_prints_the_best_translation_once_per_line(model):
    """--nbest is for --format jsonl: with --format text each input line still gives one output
    line, the best hypothesis (the one jsonl lists first), not all n of them."""
    lines = [varied_lines(3)[0], "", varied_lines(3)[1], "  ", varied_lines(3)[2]]
    source = "\n".join(lines) + "\n"
    options = ("--nbest", "2", "--beam-size", "2")
    records = [json.loads(x) for x in out_lines(translate(model, "--format", "jsonl", *options, input=source))]
    assert len(records) == len(lines)
    text = out_lines(translate(model, "--format", "text", *options, input=source))
    assert len(text) == len(lines)
    assert text == [rec["hypotheses"][0]["text"] if rec["hypotheses"] else "" for rec in records]
    assert text == [rec["translation"] for rec in records]
    # the second-best differs somewhere, so printing it (or both) instead would be caught
    assert any(len(rec["hypotheses"]) == 2 and rec["hypotheses"][1]["text"] != rec["hypotheses"][0]["text"]
               for rec in records)


# -- over-long lines ----------------------------------------------------------------------------


def test_line_longer_than_the_model_positions_is_truncated_and_flagged(model):
    words = " ".join(SOURCES[:400]).split()
    long_line = " ".join((words * 4)[:3000])  # ~3000 words: far beyond max_positions 1024
    short = varied_lines(1)[0]
    r = translate(model, "--beam-size", "1", "--format", "jsonl", "--max-length-a", "0", "--max-length-b", "20",
                  input=f"{long_line}\n{short}\n")
    records = [json.loads(line) for line in out_lines(r)]
    assert len(records) == 2
    assert records[0]["flags"]["truncated"] is True
    assert records[0]["source"] == long_line
    assert records[0]["hypotheses"], "a truncated line is still translated"
    assert records[1]["flags"]["truncated"] is False
    assert "1 truncated" in r.stderr.decode()


def test_long_line_in_text_format_with_default_length_cap(model):
    """The default cap (1.5·|src| + 10) is far beyond the model's positions for such a line:
    it must be clamped, not crash."""
    long_line = " ".join((" ".join(SOURCES[:100]).split() * 10)[:3000])
    r = translate(model, "--beam-size", "1", input=f"{long_line}\n")
    assert len(out_lines(r)) == 1
    assert "1 truncated" in r.stderr.decode()


# -- files, stdin, stdout -----------------------------------------------------------------------


def test_stdin_dash_no_input_and_files(model, tmp_path):
    """No -i, `-i -` and `-i FILE -o FILE` agree; the file's last line has no newline."""
    lines = varied_lines(4)
    text = "\n".join(lines) + "\n"
    src = tmp_path / "in.txt"
    src.write_text(text[:-1], encoding="utf-8")
    dst = tmp_path / "out.txt"
    r = translate(model, "--beam-size", "1", input=text.replace("\n", "\n\n", 1))  # one empty line
    from_stdin = out_lines(r)
    assert from_stdin[1] == "" and "translated 5 lines (1 empty" in r.stderr.decode()
    assert "translated" not in r.stdout.decode(), "stdout carries only translations"
    from_stdin = from_stdin[:1] + from_stdin[2:]
    from_dash = out_lines(translate(model, "-i", "-", "--beam-size", "1", input=text))
    r = translate(model, "-i", str(src), "-o", str(dst), "--beam-size", "1")
    assert ok(r) == "", "with -o nothing goes to stdout"
    assert "translated 4 lines" in r.stderr.decode(), "the summary goes to stderr"
    to_file = dst.read_text(encoding="utf-8").split("\n")
    assert to_file[-1] == ""
    assert len(from_stdin) == 4
    assert from_stdin == from_dash == to_file[:-1]


def test_closed_pipe_ends_quietly(model, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join((SOURCES * 2)[:200]) + "\n", encoding="utf-8")
    # a small window: output comes in several flushes, so writes go on after `head` has left
    cmd = (f"{sys.executable} -m nmt translate -m {model} -i {src} --beam-size 1 --window 10 "
           f"--max-length-a 0 --max-length-b 5 | head -1; echo \"status=${{PIPESTATUS[0]}}\" >&2")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, cwd=ROOT, timeout=300, env=BUFFERED)
    err = r.stderr.decode()
    assert len(r.stdout.decode().splitlines()) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err and "Broken pipe" not in err, err
    assert "nmt: error" not in err, err
    status = err.strip().splitlines()[-1]
    assert status in ("status=0", "status=141"), err


def test_head_of_a_big_file_streams(model, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("\n".join((SOURCES * 2)[:500]) + "\n", encoding="utf-8")
    cmd = f"head -n 3 {big} | {sys.executable} -m nmt translate -m {model} --beam-size 1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert len(r.stdout.decode().split("\n")[:-1]) == 3
    assert "translated 3 lines" in r.stderr.decode()


@contextlib.contextmanager
def translating_a_window(model: Path, n: int):
    """`nmt translate --window n` on an open pipe, n lines typed into it: yields the process and
    the lines that came back before the pipe closed (read from the raw pipe: a buffered reader
    would hide lines from select); the process is killed if a test leaves it running. Started as
    from a terminal, with SIGINT at its default: a shell without job control starts a background
    job (`pytest … &`, under nohup) with SIGINT ignored, the child inherits that, and Python then
    rightly leaves Ctrl-C ignored (how the Ctrl-C test below hung the suite for 7 minutes once)."""
    p = subprocess.Popen([sys.executable, "-m", "nmt", "translate", "-m", str(model), "--beam-size", "1",
                          "--window", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT, env=BUFFERED,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        p.stdin.write(("\n".join(varied_lines(n)) + "\n").encode())
        p.stdin.flush()
        fd, got, deadline = p.stdout.fileno(), b"", time.monotonic() + 60
        while got.count(b"\n") < n and time.monotonic() < deadline:
            if select.select([fd], [], [], 1.0)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                got += chunk
        yield p, got.split(b"\n")[:-1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_first_window_is_answered_before_stdin_ends(model):
    """Lazy reading: with --window 3, three lines typed into an open pipe come back translated
    while the pipe stays open (the tool must not wait for the end of input)."""
    with translating_a_window(model, 3) as (p, got):
        assert len(got) == 3, f"only {len(got)} of 3 lines came back while stdin was still open"
        assert p.poll() is None, "the process must still be waiting for more input"
        p.stdin.write(b"uno\n")
        p.stdin.close()
        rest = b"".join(iter(lambda: os.read(p.stdout.fileno(), 1 << 16), b""))
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()
        assert len(rest.split(b"\n")[:-1]) == 1


def test_ctrl_c_is_an_error_exit_that_keeps_the_lines_written(model):
    """SIGINT while waiting for more input: exit 130 with one error line (typer hands a Ctrl-C back
    as a return value, which once ended in exit 0), the translated lines already on stdout."""
    with translating_a_window(model, 2) as (p, got):
        assert len(got) == 2 and p.poll() is None  # answered, and waiting for more
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        rest = p.stdout.read()
        assert p.wait(timeout=60) == 130
        err = [line for line in p.stderr.read().decode().splitlines() if line.strip()]
        assert err[-1] == "nmt: error: interrupted" and "Traceback" not in "\n".join(err)
        assert rest == b""  # nothing half-written after the two lines


def test_nmt_alone_prints_its_help():
    r = run_nmt()
    assert r.returncode == 0 and r.stderr.decode().strip() == ""
    assert all(command in r.stdout.decode() for command in ("train", "translate", "evaluate"))


# -- invalid UTF-8 ------------------------------------------------------------------------------


def test_invalid_utf8_names_the_line_and_keeps_flushed_windows(model, tmp_path):
    good = varied_lines(6)
    data = ("\n".join(good[:4]) + "\n").encode() + b"caf\xe9 con leche\n" + ("\n".join(good[4:]) + "\n").encode()
    src = tmp_path / "bad.txt"
    src.write_bytes(data)
    r = translate(model, "-i", str(src), "--beam-size", "1", "--window", "2")
    msg = error_line(r, 1, only_line=False)
    assert str(src) in msg and "line 5" in msg and "UTF-8" in msg
    # windows [1, 2] and [3, 4] were translated and flushed before line 5 was read
    kept = r.stdout.decode().split("\n")[:-1]
    alone = out_lines(translate(model, "--beam-size", "1", "--window", "1", input="\n".join(good[:4]) + "\n"))
    assert kept == alone


def test_invalid_utf8_on_stdin(model):
    r = translate(model, "--beam-size", "1", input=b"hola\n\xff\xfe\n")
    msg = error_line(r, 1, only_line=False)
    assert "<stdin>" in msg and "line 2" in msg


# -- bad model directories and options ----------------------------------------------------------


@pytest.fixture
def damaged(model, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    return copy


@pytest.fixture
def one_line(tmp_path) -> Path:
    p = tmp_path / "one.txt"
    p.write_text("hola mundo\n", encoding="utf-8")
    return p


def test_missing_model_dir(tmp_path, one_line):
    missing = tmp_path / "no-such-model"
    msg = error_line(translate(missing, "-i", str(one_line), "--beam-size", "1"), 1)
    assert str(missing) in msg


def test_old_mac_line_endings_are_one_error_line_and_no_output(tiny_model_dir, tmp_path):
    """Three verses with CR-only endings would be one line, translated into one output line."""
    src = tmp_path / "old.es"
    src.write_bytes(b"hola\rmundo\radios\r")
    r = translate(tiny_model_dir, "-i", str(src), "--beam-size", "1")
    msg = error_line(r, 1)
    assert "has carriage returns but no line feeds" in msg and r.stdout == b""


def test_dir_without_config(tmp_path, one_line):
    (tmp_path / "empty").mkdir()
    msg = error_line(translate(tmp_path / "empty", "-i", str(one_line), "--beam-size", "1"), 1)
    assert "config.json" in msg


def test_config_not_json(damaged, one_line):
    (damaged / "config.json").write_text("{ this is not json", encoding="utf-8")
    msg = error_line(translate(damaged, "-i", str(one_line), "--beam-size", "1"), 1)
    assert msg.startswith(f"nmt: error: {damaged / 'config.json'}: not valid JSON (")


@pytest.mark.parametrize("change, problem", [
    ({"format": "fairseq"}, "not an nmt model config (format is not 'nmt-model')"),
    ({"version": 99}, "format version 99 is not supported (this nmt reads version 1)"),
])
def test_config_of_another_format_or_version(damaged, one_line, change, problem):
    config = json.loads((damaged / "config.json").read_text(encoding="utf-8"))
    config.update(change)
    (damaged / "config.json").write_text(json.dumps(config), encoding="utf-8")
    msg = error_line(translate(damaged, "-i", str(one_line), "--beam-size", "1"), 1)
    assert msg == f"nmt: error: {damaged / 'config.json'}: {problem}"


def test_config_with_unknown_model_key(damaged, one_line):
    config = json.loads((damaged / "config.json").read_text(encoding="utf-8"))
    config["model"]["n_experts"] = 8
    (damaged / "config.json").write_text(json.dumps(config), encoding="utf-8")
    msg = error_line(translate(damaged, "-i", str(one_line), "--beam-size", "1"), 1)
    assert "n_experts" in msg


def test_missing_weights(damaged, one_line):
    (damaged / "model.safetensors").unlink()
    msg = error_line(translate(damaged, "-i", str(one_line), "--beam-size", "1"), 1)
    assert msg == f"nmt: error: {damaged}: no model.safetensors (training has not saved a model yet?)"


@pytest.mark.parametrize("keep, header_whole", [(0.5, True), (0.001, False)])
def test_corrupt_weights(damaged, one_line, keep, header_whole):
    weights = damaged / "model.safetensors"
    data = weights.read_bytes()
    cut = max(int(len(data) * keep), 4)
    weights.write_bytes(data[:cut])
    msg = error_line(translate(damaged, "-i", str(one_line), "--beam-size", "1"), 1)
    (n,) = struct.unpack("<Q", data[:8])  # the safetensors header's length, read here from the whole file
    assert (cut >= 8 + n) == header_whole
    if not header_whole:  # the header itself is cut: it cannot be read
        assert msg == f"nmt: error: {weights}: not a safetensors file (header length {n})"
    else:  # the header is whole: a tensor it lists ends past the bytes that are left
        found = re.fullmatch(rf"nmt: error: {re.escape(str(weights))}: tensor (\S+) lies outside the file "
                             rf"\(cut short\?\)", msg)
        assert found, msg
        header = json.loads(data[8 : 8 + n])
        assert header[found[1]]["data_offsets"][1] > cut - 8 - n


def test_missing_tokenizer(damaged, one_line):
    (damaged / "tokenizer.json").unlink()
    msg = error_line(translate(damaged, "-i", str(one_line), "--beam-size", "1"), 1)
    assert "tokenizer" in without_paths(msg)


def test_missing_input_file(model, tmp_path):
    missing = tmp_path / "nope.txt"
    msg = error_line(translate(model, "-i", str(missing), "--beam-size", "1"), 1)
    assert without_paths(msg) == "nmt: error: <path>: no such file"
    assert str(missing) in msg


def test_input_is_a_directory(model, tmp_path):
    msg = error_line(translate(model, "-i", str(tmp_path), "--beam-size", "1"), 1)
    assert without_paths(msg) == "nmt: error: <path>: is a directory, expected a text file"
    assert str(tmp_path) in msg


# Each case gives the beam size it is about (a later --beam-size replaces the --beam-size 1 that
# the test puts first, as every other test does), so none depends on the default beam size.
@pytest.mark.parametrize("args, message", [
    (["--beam-size", "0"], "need beam size ≥ 1 and 1 ≤ nbest ≤ beam size (got 0, 1)"),
    (["--nbest", "3", "--beam-size", "2"], "need beam size ≥ 1 and 1 ≤ nbest ≤ beam size (got 2, 3)"),
    (["--nbest", "0"], "need beam size ≥ 1 and 1 ≤ nbest ≤ beam size (got 1, 0)"),
    (["--format", "xml"], "--format: unknown value 'xml' (choose from text, jsonl)"),
    (["--dtype", "int7"], "--dtype: unknown value 'int7' (choose from auto, float32, bfloat16, int8)"),
    (["--window", "0"], "--batch-tokens and --window must be ≥ 1"),
    (["--length-norm", "cubic"], "--length-norm: unknown value 'cubic' (choose from gnmt, average)"),
    (["--sampling-topk", "-1"], "--sampling-topk must be ≥ 0 (0: off; got -1)"),
    (["--sampling-topp", "1.5"], "--sampling-topp must be in [0, 1] (0: off; got 1.5)"),
    (["--temperature", "0"], "--temperature must be in (0, 1000] (1: no sampling; greedy search is --beam-size 1; got 0.0)"),
    (["--max-length-a", "0", "--max-length-b", "0"], "--max-length-a and --max-length-b must be ≥ 0 and not both 0: "
                                                     "the length cap is a × source length + b (got 0.0, 0)"),
    (["--min-length", "-1"], "--min-length must be ≥ 0 (got -1)"),
    (["--length-penalty", "nan"], "decoding options: length_penalty must be float, not NaN"),
    (["--beam-size", "2", "--nbest", "2", "--temperature", "0.8"],
     "--nbest 2 needs beam search; with --sampling-topk, --sampling-topp or --temperature one translation is drawn "
     "per line"),
])
def test_usage_errors_exit_2(model, one_line, args, message):
    msg = error_line(translate(model, "-i", str(one_line), "--beam-size", "1", *args), 2)
    assert msg == f"nmt: error: {message}"


@pytest.mark.parametrize("args, start", [
    (["--beam-size", "two"], "Invalid value for '--beam-size': "),
    (["--no-such-option"], "No such option: --no-such-option"),
])
def test_option_parser_errors_exit_2(model, one_line, args, start):
    """The option parser's own messages (click's words, which nmt does not write): the option is named."""
    msg = error_line(translate(model, "-i", str(one_line), "--beam-size", "1", *args), 2)
    assert msg.startswith(f"nmt: error: {start}")


def test_unwritable_output_file(model, tmp_path, one_line):
    target = tmp_path / "no-such-dir" / "out.txt"
    msg = error_line(translate(model, "-i", str(one_line), "-o", str(target), "--beam-size", "1"), 1)
    assert without_paths(msg) == f"nmt: error: <path>: cannot write ({os.strerror(errno.ENOENT)})"
    assert str(target) in msg


def test_missing_input_does_not_clobber_the_output_file(model, tmp_path):
    previous = tmp_path / "results.txt"
    previous.write_text("yesterday's translations\n", encoding="utf-8")
    error_line(translate(model, "-i", str(tmp_path / "typo.txt"), "-o", str(previous), "--beam-size", "1"), 1)
    assert previous.read_text(encoding="utf-8") == "yesterday's translations\n"


def test_int8_one_line_per_line(model):
    lines = ["", *varied_lines(3), "  "]
    r = translate(model, "--dtype", "int8", "--device", "cpu", "--beam-size", "1", input="\n".join(lines) + "\n")
    out = out_lines(r)
    assert len(out) == len(lines)
    assert out[0] == "" and out[-1] == ""
    assert "Warning" not in r.stderr.decode()  # torch's deprecation notice of its quantised tensors, on every run


# -- a model that writes newlines ---------------------------------------------------------------


def test_emitted_newline_bytes_do_not_break_the_line_contract(damaged):
    """Byte fallback puts all 256 bytes in the vocabulary, so a model can produce "\\n". Make one
    that always does (constant decoder output aligned with the <0x0A> embedding row)."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    newline_id = Tokenizer.from_file(str(damaged / "tokenizer.json")).token_to_id("<0x0A>")
    assert newline_id is not None
    weights = load_file(str(damaged / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(weights["decoder_norm.bias"].shape, generator=g)
    v = v / v.norm()
    weights["decoder_norm.weight"] = torch.zeros_like(weights["decoder_norm.weight"])
    weights["decoder_norm.bias"] = v
    weights["output.weight"][newline_id] = 30 * v  # the tied output matrix: logit 30 for "\n"
    save_file(weights, str(damaged / "model.safetensors"))
    lines = varied_lines(3)
    r = translate(damaged, "--beam-size", "1", "--max-length-a", "0", "--max-length-b", "4",
                  input="\n".join(lines) + "\n")
    records = out_lines(translate(damaged, "--beam-size", "1", "--max-length-a", "0", "--max-length-b", "4",
                                  "--format", "jsonl", input="\n".join(lines) + "\n"))
    for record in map(json.loads, records):  # the crafted model emits 3 tokens ("\n") and the forced EOS
        assert record["hypotheses"][0]["tokens"] == 4 and record["flags"]["hit_max_length"]
    assert len(out_lines(r)) == len(lines)


def test_a_full_disk_is_a_one_line_error(tiny_model_dir, tmp_path):
    src = tmp_path / "in.es"
    src.write_text("Hola.\nAdiós.\n", encoding="utf-8")
    r = run_nmt("translate", "-m", str(tiny_model_dir), "--beam-size", "1", "-i", str(src), "-o",
                str(full_device(tmp_path)))
    err = r.stderr.decode()
    assert r.returncode == 1
    assert err.strip().count("\n") == 0 and "write failed" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tiny_model_dir, tmp_path, how):
    src = tmp_path / "notes.es"
    src.write_text("Hola.\nAdiós.\n", encoding="utf-8")
    out = {"same path": src, "symlink": tmp_path / "link.es", "hard link": tmp_path / "hard.es"}[how]
    if how == "symlink":
        out.symlink_to(src)
    elif how == "hard link":
        os.link(src, out)
    msg = without_paths(error_line(run_nmt("translate", "-m", str(tiny_model_dir), "-i", str(src), "-o", str(out)), 2))
    assert "output file is the input file" in msg
    assert src.read_text(encoding="utf-8") == "Hola.\nAdiós.\n"


def test_a_failed_translation_keeps_the_previous_output(tiny_model_dir, tmp_path):
    out = tmp_path / "hyp.en"
    out.write_text("yesterday's translations\n", encoding="utf-8")
    bad = tmp_path / "bad.es"
    bad.write_bytes(b"Hola.\n\xff\xfe\n")  # invalid UTF-8 on line 2: the run fails after starting
    r = run_nmt("translate", "-m", str(tiny_model_dir), "--beam-size", "1", "-i", str(bad), "-o", str(out))
    assert r.returncode == 1
    assert out.read_text(encoding="utf-8") == "yesterday's translations\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.es", "hyp.en"]  # no temporary left


# -- where -o writes: through a symlink, keeping the mode; '-' is stdout --------------------------


def _output_run(command: str, model: Path, src: Path, *output: str, cwd: Path = ROOT):
    """`nmt translate` or `nmt score` of `src` (scored against itself), run in `cwd`."""
    args = ["translate", "-m", str(model), "--beam-size", "1", "-i", str(src)] if command == "translate" else \
        ["score", "-m", str(model), "--src", str(src), "--tgt", str(src)]
    return subprocess.run([sys.executable, "-m", "nmt", *args, *output], capture_output=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("command", ["translate", "score"])
def test_an_output_symlink_stays_a_link_and_its_target_gets_the_output(tiny_model_dir, tmp_path, command):
    src = tmp_path / "in.es"
    src.write_text("Hola.\nAdiós.\n", encoding="utf-8")
    (tmp_path / "results").mkdir()
    target = tmp_path / "results" / "out2.txt"
    target.write_text("OLD\n", encoding="utf-8")
    target.chmod(0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(Path("results") / "out2.txt")  # relative, as `ln -s` makes it
    expected = ok(_output_run(command, tiny_model_dir, src))
    assert ok(_output_run(command, tiny_model_dir, src, "-o", str(link))) == ""
    assert link.is_symlink() and os.readlink(link) == str(Path("results") / "out2.txt")
    assert target.read_text(encoding="utf-8") == expected and len(expected.splitlines()) == 2
    assert (target.stat().st_mode & 0o777) == 0o640, "the replaced file keeps its permission bits"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.es", "link.txt", "results"]
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["out2.txt"]  # no temporary left


@pytest.mark.parametrize("command", ["translate", "score"])
def test_a_dangling_output_symlink_gets_its_target_made(tiny_model_dir, tmp_path, command):
    src = tmp_path / "in.es"
    src.write_text("Hola.\n", encoding="utf-8")
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "new.txt")
    assert ok(_output_run(command, tiny_model_dir, src, "-o", str(link))) == ""
    assert link.is_symlink() and len((tmp_path / "new.txt").read_text(encoding="utf-8").splitlines()) == 1


@pytest.mark.parametrize("command", ["translate", "score"])
def test_output_dash_is_stdout(tiny_model_dir, tmp_path, command):
    """`-o -` is stdout, as `-i -` is stdin: no file named '-' appears."""
    src = tmp_path / "in.es"
    src.write_text("Hola.\nAdiós.\n", encoding="utf-8")
    expected = ok(_output_run(command, tiny_model_dir, src))
    assert ok(_output_run(command, tiny_model_dir, src, "-o", "-", cwd=tmp_path)) == expected
    assert len(expected.splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.es"], "no file named '-'"


@pytest.mark.parametrize("args, message", [
    (["plot", "RUN", "-o", "-"], "--out -: the curves are a PNG file and cannot go to stdout; give a path"),
    (["attention", "-m", "RUN", "hola", "-o", "-"],
     "--out -: the maps are three PNG files and cannot go to stdout; give a path"),
    (["export", "-m", "RUN", "-o", "-"], "--out -: an export is a directory and cannot go to stdout; give a path"),
    (["train-tokenizer", "--train", "RUN/x", "--src", "es", "--tgt", "en", "-o", "-"],
     "--out -: the tokenizer is a directory and cannot go to stdout; give a path"),
    (["train", "--train", "RUN/x", "--src", "es", "--tgt", "en", "-o", "-"],
     "--out -: a run is a directory and cannot go to stdout; give a path"),
    (["train", "--train", "RUN/x", "--src", "es", "--tgt", "en", "-o", "RUN/new", "--cache-dir", "-"],
     "--cache-dir -: the token cache is a directory and cannot go to stdout; give a path"),
])
def test_no_command_writes_a_file_named_dash(tiny_model_dir, tmp_path, args, message):
    args = [a.replace("RUN", str(tiny_model_dir)) for a in args]
    r = subprocess.run([sys.executable, "-m", "nmt", *args], capture_output=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert error_line(r, 2) == f"nmt: error: {message}"
    assert list(tmp_path.iterdir()) == []
