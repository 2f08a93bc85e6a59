"""What the benchmarks say of the machine: the CPU's bf16 units, read here from lscpu (an
independent reader of the same CPU flags)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from nmt.runtime import cpu_bf16_units


def test_the_bf16_units_named_are_the_ones_lscpu_lists():
    if not shutil.which("lscpu"):
        pytest.skip("no lscpu on this machine")
    flags = next((line.split(":", 1)[1].split() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if line.startswith("Flags:")), None)
    if flags is None:
        pytest.skip("lscpu lists no flags here")
    expected = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    assert cpu_bf16_units() == (", ".join(expected) or "none")
