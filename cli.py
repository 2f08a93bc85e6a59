#!/usr/bin/env python3
"""Run `nmt` from a checkout without installing it: `python cli.py train …`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nmt.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
