"""The line contract of what nmt writes, character by character: every code point that Python's
own `str.splitlines()` (the independent reference: universal newlines split at the same ones)
takes as a line break is kept off the line by `textio.one_line` (text output) and by
`textio.json_line` (--format jsonl), which must still round-trip through `json.loads`."""

from __future__ import annotations

import json

import pytest

from nmt.textio import json_line, one_line

# Every code point but the surrogates (not characters; a str holding one cannot be written as UTF-8)
# that splits "a?b" in two for str.splitlines(): built once for all the tests of this module.
BREAKS = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and len(f"a{chr(c)}b".splitlines()) == 2]


def test_the_reference_finds_the_line_breaks_a_reader_splits_at():
    # not a list copied from nmt: a sanity check that the reference found what it should
    assert {"\n", "\r", "\x85", "\u2028", "\u2029"} <= set(BREAKS)
    assert " " not in BREAKS and "a" not in BREAKS and len(BREAKS) < 20


@pytest.mark.parametrize("where", ["a{}b", "{}", "{}{}", "a{}", "{}b"])
def test_one_line_leaves_no_line_break_for_any_code_point(where):
    for c in BREAKS:
        text = where.format(c, c)
        out = one_line(text)
        assert len(out.splitlines()) <= 1 and len(out) == len(text), (hex(ord(c)), out)
        if where == "a{}b":
            assert out.splitlines() == [out] and out[0] == "a" and out[2] == "b", hex(ord(c))


def test_one_line_keeps_every_other_character():
    text = "".join(chr(c) for c in range(0x20, 0x3000) if chr(c) not in BREAKS and not 0xD800 <= c <= 0xDFFF)
    assert one_line(text) == text


def test_json_line_writes_one_line_that_round_trips_for_any_code_point():
    for c in BREAKS:
        record = {"source": f"a{c}b", "translation": f"{c}", "hypotheses": [{"text": f"x{c}{c}y"}]}
        line = json_line(record)
        assert line.splitlines() == [line], hex(ord(c))
        assert json.loads(line) == record, hex(ord(c))


def test_json_line_keeps_utf8_and_round_trips_other_text():
    record = {"translation": "Y dijo Dios: «Sea la luz» — 光 \t\x00\x7f", "score": -1.5, "n": [1, None, True]}
    line = json_line(record)
    assert line.splitlines() == [line] and json.loads(line) == record
    assert "«Sea la luz» — 光" in line  # not \u-escaped: UTF-8 stays readable
