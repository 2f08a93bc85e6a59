"""Sentence splitting for `--split-sentences`: a paragraph into its sentences, with Wikimedia's
`sentencex` (rule-based, about 300 languages with fallbacks, Spanish abbreviations such as
"Sr." kept; maintained: releases through 2026). An optional dependency (`pip install
'nmt[split]'`): without it, asking to split is a one-line error saying what to install.

The segments are the line's sentences, in order, with the spaces around them stripped and no
empty one kept; joining the translations back is `translate.Translator`'s job.
"""

from __future__ import annotations

from typing import Callable

from nmt.errors import UsageError

INSTALL_HINT = "--split-sentences needs the sentencex package: pip install 'nmt[split]' (or pip install sentencex)"


def splitter(language: str | None) -> Callable[[str], list[str]]:
    """line → its sentences (stripped, non-empty) for a language code (None: English rules)."""
    try:
        from sentencex import segment
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    code = language or "en"

    def split(line: str) -> list[str]:
        return [s.strip() for s in segment(code, line) if s.strip()]

    return split
