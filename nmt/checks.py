"""Per-line checks of a translation for the usual failures of neural decoding: a repetition
loop, a length-ratio blow-up against the source, a hit of the length cap.

The one home of these definitions: `nmt evaluate` counts the lines that fail them
(`metrics.diagnostics`), and `nmt translate`'s loop guard decodes those lines again with an
n-gram ban (`translate.Translator`). Plain string functions: no torch, no sacreBLEU.
"""

from __future__ import annotations

LOOP_MAX_N = 4  # repetition loops: n-grams of 1..LOOP_MAX_N words …
LOOP_MIN_REPEATS = 3  # … repeated at least this many times in a row
BLOWUP_RATIO = 2.5  # an output longer than BLOWUP_RATIO × its source's characters …
BLOWUP_SLACK = 10  # … plus this many characters (a short source may have a longer translation)


def has_repetition_loop(line: str, max_n: int = LOOP_MAX_N, min_repeats: int = LOOP_MIN_REPEATS) -> bool:
    """True when some run of n whitespace-separated words (1 ≤ n ≤ `max_n`) occurs `min_repeats`
    times back to back, as in "the the the" or "of the of the of the". Case-sensitive, words
    compared with punctuation attached, so "Holy, holy, holy" is not a loop.
    """
    words = line.split()
    for n in range(1, max_n + 1):
        span = n * min_repeats
        for start in range(len(words) - span + 1):
            first = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == first for k in range(1, min_repeats)):
                return True
    return False


def is_length_blowup(output: str, source: str, ratio: float = BLOWUP_RATIO, slack: int = BLOWUP_SLACK) -> bool:
    """True when the output has more than ratio × the source's characters + slack (outer
    whitespace ignored): a translation that ran away from its source."""
    return len(output.strip()) > ratio * len(source.strip()) + slack


def failed_check(output: str, source: str, hit_max_length: bool) -> str | None:
    """The first check the output fails ("loop", "length ratio", "length cap"), or None."""
    if has_repetition_loop(output):
        return "loop"
    if is_length_blowup(output, source):
        return "length ratio"
    if hit_max_length:
        return "length cap"
    return None
