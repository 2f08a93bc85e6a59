"""What the runtime says of the machine: the CPU's bf16 units, read here from lscpu (an
independent reader of the same CPU flags), and the dtype `--dtype auto` makes of them."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from nmt import runtime
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


@pytest.mark.parametrize("units, race, expected", [
    ("amx_bf16, avx512_bf16", 1.0, torch.bfloat16),  # a slow race does not outvote the CPU's AMX unit
    ("amx_bf16", 0.9, torch.bfloat16),
    ("none", 3.0, torch.float32),                    # nor a fast one the absence of bf16 units
    ("avx512_bf16", 0.6, torch.float32),             # AVX-512 BF16 alone: the race decides (a Xeon guest
    ("avx512_bf16", 1.8, torch.bfloat16),            # with AMX hidden read 0.6, a Zen 4 about 2)
    ("unknown", 1.5, torch.bfloat16),                # where the flags can't be read, the race decides
    ("unknown", 1.1, torch.float32),
])
def test_dtype_auto_follows_the_amx_and_no_bf16_flags_and_races_elsewhere(monkeypatch, units, race, expected):
    monkeypatch.delenv("NMT_CPU_BF16_SPEEDUP", raising=False)
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: units)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: race)
    assert runtime.setup(device="cpu", dtype="auto").dtype == expected


def test_a_pinned_speedup_still_overrides_the_flags(monkeypatch):
    monkeypatch.setenv("NMT_CPU_BF16_SPEEDUP", "1.0")
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: "amx_bf16")
    assert runtime.setup(device="cpu", dtype="auto").dtype == torch.float32


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx2 fma", "none"),
    ("avx512f avx512_bf16 amx_tile amx_bf16", "amx_bf16, avx512_bf16"),
    ("avx512_bf16x amx_bf16_y", "none"),  # whole flags only
    (None, "unknown"),                    # no flags line, or no /proc/cpuinfo
])
def test_the_bf16_units_come_from_whole_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "_cpuinfo", lambda field: flags if field == "flags" else None)
    assert cpu_bf16_units() == expected


@pytest.mark.parametrize("units, raced_before, expected, raced", [
    ("unknown", "bfloat16", torch.bfloat16, True),  # the run's first race answered bf16: no new race (it says fp32)
    ("unknown", "float32", torch.float32, True),
    ("unknown", "int8", torch.float32, True),       # not a dtype a race answers: race again
    ("avx512_bf16", "float32", torch.float32, True),   # AVX-512 BF16 alone races, so it keeps the first answer too
    ("avx512_bf16", "bfloat16", torch.bfloat16, True),
    ("amx_bf16, avx512_bf16", "float32", torch.bfloat16, False),  # the flags, where they decide, decide as before
    ("none", "bfloat16", torch.float32, False),
])
def test_a_runs_earlier_race_answer_replaces_a_new_race_only(monkeypatch, units, raced_before, expected, raced):
    monkeypatch.delenv("NMT_CPU_BF16_SPEEDUP", raising=False)
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: units)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 1.0)
    rt = runtime.setup(device="cpu", dtype="auto", raced_before=raced_before)
    assert (rt.dtype, rt.raced) == (expected, raced)
    assert runtime.setup(device="cpu", dtype="float32", raced_before="bfloat16").dtype == torch.float32
