"""Reading UTF-8 text one line at a time, from files (plain or `.gz`) or stdin.

Every line is checked as UTF-8 where it is read, so an error names the file and line
number. Nothing here holds a whole file in memory. Writing results and models is left to
`translate` and `checkpoint`.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import sys
import zlib
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from nmt.errors import NmtError, UsageError

STDIN = "-"
BOM = "\ufeff"  # a byte order mark, which some editors put at the start of a UTF-8 file: not text
# What splits a line for a reader of our output: Python's str.splitlines() and universal newlines
# split at all of these, not only at "\n".
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})
_JSON_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})  # json.dumps leaves them raw
# What reading a file can raise: a damaged .gz raises zlib.error (not an OSError) mid-stream,
# a cut-short one EOFError, one that is not gzip at all BadGzipFile (an OSError).
READ_ERRORS = (OSError, EOFError, zlib.error)


def one_line(text: str) -> str:
    """The line contract for text written out: each line break a reader could split at becomes a
    space (a model can emit the byte tokens of one)."""
    return text.translate(_LINE_BREAKS)


def json_line(record: dict) -> str:
    """A JSON Lines record on one line for every reader: UTF-8 kept, and the three line breaks
    that `json.dumps` leaves raw (U+0085, U+2028, U+2029) escaped."""
    import json

    return json.dumps(record, ensure_ascii=False).translate(_JSON_BREAKS)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Two paths that name one file (`a.txt` and `./a.txt`, a symlink, a hard link); stdin (`-`)
    only as itself; a missing file by where its path resolves to."""
    if STDIN in (a, b):
        return a == b
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is missing: reading it will say so
        return os.path.realpath(a) == os.path.realpath(b)


def display_name(path: str | os.PathLike | None) -> str:
    """A path as messages and output name it: a file name's bytes that are not UTF-8 (which Python
    keeps as lone surrogates, unprintable) written as \\xNN."""
    if path in (None, STDIN):
        return "<stdin>"
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def open_binary(path: str | os.PathLike | None) -> BinaryIO:
    """Open a file (transparently gunzipped when it ends in `.gz`) or stdin for reading bytes."""
    if path in (None, STDIN):
        if sys.stdin is None:  # `nmt … <&-`: file descriptor 0 closed
            raise NmtError("stdin is closed (give the input as a file, or pipe it in)")
        return sys.stdin.buffer
    p = Path(path)
    if not p.exists():
        raise NmtError(f"{p}: no such file")
    if p.is_dir():
        raise NmtError(f"{p}: is a directory, expected a text file")
    try:  # gzip.open on the name, not on an open file: closing it then closes the file too
        return gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")  # type: ignore[return-value]
    except OSError as e:
        raise NmtError(f"{p}: cannot open ({e.strerror})") from None


def decode_line(raw: bytes, name: str, lineno: int) -> str:
    """One line of bytes → str without its line ending (nor, on line 1, a byte order mark);
    invalid UTF-8 names file and line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NmtError(f"{name}: line {lineno}: invalid UTF-8 at byte {e.start}") from None
    if lineno == 1:
        text = text.removeprefix(BOM)
        _check_line_feeds(raw, name)
    return text.rstrip("\r\n")


def _cr_only(data: bytes) -> bool:
    """Carriage returns inside `data` and no line feed before its end: old Mac line endings."""
    inside = data.rstrip(b"\r\n")
    return b"\r" in inside and b"\n" not in inside


CR_CHECK_BYTES = 1 << 20  # a first line this long with carriage returns and no line feed is taken as CR-only


def _check_line_feeds(first_line: bytes, name: str) -> None:
    """A file whose first line is the whole file (no line feed) yet holds carriage returns inside it
    has old Mac line endings (CR only), which are not line breaks here: an error, not one long line.
    Also given the first `CR_CHECK_BYTES` of a first line not yet ended, so a giant CR-only file is
    refused from its first MiB instead of read whole into memory first (a real first line that long
    holding a carriage return is refused too: no training or translation keeps such a line)."""
    if not first_line.endswith(b"\n") and _cr_only(first_line):
        raise NmtError(f"{name}: has carriage returns but no line feeds (old Mac line endings, CR only), so it "
                       f"would read as one line; convert it first, e.g. tr '\\r' '\\n' < FILE > FILE.unix")


def looks_cr_only(path: str | os.PathLike) -> bool:
    """Whether a file's first MiB holds carriage returns inside it and no line feed before its end:
    old Mac line endings, for the hint of a line-count error (a side read as one line)."""
    try:
        with open_binary(path) as stream:
            return _cr_only(stream.read(1 << 20))
    except (NmtError, *READ_ERRORS):
        return False


def refuse_terminal_stdin(option: str, paths: Iterable[str | None], what: str | None = None) -> None:
    """A command about to read stdin (`-` among `paths`) that is a terminal refuses at once, naming
    `option`, rather than wait for text typed by hand (`nmt evaluate`, `nmt score`). `nmt translate`
    reads a terminal line by line on purpose and does not call this."""
    if STDIN in paths and sys.stdin is not None and sys.stdin.isatty():
        raise UsageError(f"{what or option + ' -'}: stdin is a terminal: pipe the text in or give {option} FILE")


def read_lines(path: str | os.PathLike | None) -> Iterator[str]:
    """Yield the lines of a file or stdin (`-`/None), without line endings, checked as UTF-8."""
    name = display_name(path)
    stream = open_binary(path)
    try:
        for lineno, raw in enumerate(_iter_raw_lines(stream, name), start=1):
            yield decode_line(raw, name, lineno)
    finally:
        if stream is not getattr(sys.stdin, "buffer", None):
            stream.close()


def read_line_blocks(path: str | os.PathLike, block_bytes: int = 1 << 22) -> Iterator[list[str]]:
    """The lines of a file as lists, decoded a few MB at a time: the same lines and the same
    errors as `read_lines`, for bulk reading (the token cache) where a Python call per line
    would cost more than the reading itself."""
    name = display_name(path)
    stream = open_binary(path)
    lineno, pending = 0, []  # the reads since the last newline: a long line is joined once, not per read
    head = b""  # the file's first CR_CHECK_BYTES: checked for CR-only endings once there are that many
    try:
        while True:
            try:
                data = stream.read(block_bytes)
            except READ_ERRORS as e:
                raise NmtError(f"{name}: read error ({e})") from None
            if not data:
                break
            if len(head) < CR_CHECK_BYTES:  # as `read_lines` checks a first line that long: the same error
                head += data[:CR_CHECK_BYTES - len(head)]
                if len(head) == CR_CHECK_BYTES:
                    _check_line_feeds(head, name)  # a line feed in it, or at its end, passes
            cut = data.rfind(b"\n") + 1
            if not cut:
                pending.append(data)
                continue
            block = b"".join([*pending, data[:cut]])
            pending = [data[cut:]]
            yield _decode_block(block[:-1], name, lineno)
            lineno += block.count(b"\n")
        rest = b"".join(pending)
        if rest:
            if lineno == 0:
                _check_line_feeds(rest, name)
            yield _decode_block(rest, name, lineno)
    finally:
        if stream is not getattr(sys.stdin, "buffer", None):
            stream.close()


def _decode_block(block: bytes, name: str, lines_before: int) -> list[str]:
    """Whole lines (the last newline removed) → their texts without line endings (nor the byte
    order mark that may open a file)."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = block.rfind(b"\n", 0, e.start) + 1
        lineno = lines_before + block.count(b"\n", 0, e.start) + 1
        raise NmtError(f"{name}: line {lineno}: invalid UTF-8 at byte {e.start - line_start}") from None
    if lines_before == 0:
        text = text.removeprefix(BOM)
    lines = text.split("\n")
    return [line.rstrip("\r") for line in lines] if "\r" in text else lines


def _iter_raw_lines(stream: BinaryIO, name: str) -> Iterator[bytes]:
    try:
        # readline (not iteration over a buffered reader) so stdin lines are handed on as
        # soon as they arrive: `head -3 file | nmt translate` must not wait for more.
        first = stream.readline(CR_CHECK_BYTES)
        if first and not first.endswith(b"\n") and len(first) == CR_CHECK_BYTES:
            _check_line_feeds(first, name)  # before the rest of a first line that may be the whole file
            first += stream.readline()
        line = first
        while line:
            yield line
            line = stream.readline()
    except READ_ERRORS as e:
        raise NmtError(f"{name}: read error ({e})") from None


def in_step(a: Iterable[str], b: Iterable[str], names: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """Pairs of lines read in step (lines and prefixes, sources and targets), lazily; a different
    number of lines is an error naming both, raised once the shorter one ends."""
    first, second = iter(a), iter(b)
    n = 0
    for x in first:
        y = next(second, None)
        if y is None:
            raise NmtError(f"line counts differ: {names[1]} has {n} lines, {names[0]} has more")
        n += 1
        yield x, y
    if next(second, None) is not None:
        raise NmtError(f"line counts differ: {names[0]} has {n} lines, {names[1]} has more")


def count_lines(path: str | os.PathLike) -> int:
    """Number of lines, a final line without a newline included."""
    n = 0
    last = b"\n"
    with open_binary(path) as f:
        try:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
        except READ_ERRORS as e:
            raise NmtError(f"{display_name(path)}: read error ({e})") from None
    return n + (last != b"\n")


def read_small_file(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of a small regular file (a config, a tokenizer), at most `limit` of them.

    A model directory is untrusted input: its config.json may be a link to /dev/zero (endless),
    a FIFO (open would wait forever for a writer) or a huge file. Opened without blocking, only a
    regular file is read, and never more than `limit` bytes."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise NmtError(f"{p}: cannot open ({e.strerror})") from None
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NmtError(f"{p}: not a regular file (a device, pipe or directory cannot be {what})")
        if st.st_size > limit:
            raise NmtError(f"{p}: {st.st_size:,} bytes is too large for {what} (at most {limit:,})")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise NmtError(f"{p}: read error ({e.strerror})") from None
    if len(data) > limit:
        raise NmtError(f"{p}: too large for {what} (more than {limit:,} bytes)")
    return data


class _ClosedStdout(io.TextIOBase):
    """sys.stdout when file descriptor 1 was closed (`nmt … >&-`): Python sets it to None and
    print() then drops everything silently, so a command would exit 0 with its results lost."""

    encoding = "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise NmtError("stdout is closed: the results cannot be written (redirect it instead of closing it)")


def guard_closed_stdio() -> None:
    """Give closed standard descriptors (0, 1, 2) /dev/null, so that no file nmt opens later takes
    their number (a library writing to fd 1 would write into it), and make a closed stdout an error."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:
            try:
                os.fstat(fd)
            except OSError:
                null = os.open(os.devnull, os.O_RDWR)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()


def flush_stdout() -> None:
    """Flush stdout now, so a failed write (a full disk) is one error line instead of Python's
    "Exception ignored" at exit (and exit code 120)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise NmtError(output_error(e)) from None


def output_error(e: OSError) -> str:
    """The message for a write error that reached the top: a named file, or else stdout. For
    stdout, what is still buffered is dropped (fd 1 → /dev/null): it cannot be written anyway."""
    if e.filename:
        return f"{e.filename}: {e.strerror or e}"
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass
    return f"stdout: cannot write ({e.strerror or e})"


def utf8_stdio() -> None:
    """Make stdout UTF-8 and line-oriented whatever the locale (pipes default to ASCII in C locale)."""
    guard_closed_stdio()
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(encoding="utf-8", errors="strict", newline="\n")
