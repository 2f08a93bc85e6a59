"""Where and in what precision the arithmetic runs: device, dtype and CPU threads, decided here only.

On CPU, `--dtype auto` picks bfloat16 where the CPU lists AMX's bf16 unit (amx_bf16) and float32
where an x86 CPU lists no bf16 units (bf16 is emulated there, slowly); where it lists only AVX-512's
bf16 instructions (avx512_bf16), or its flags can't be read (no /proc/cpuinfo, other architectures),
a short matmul race decides, and a run keeps the race's first answer (`setup`'s `raced_before`), so
that its resume trains in the same dtype.
Denormal floats are flushed to zero: on x86 they slow the backward pass by an order of magnitude.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

from nmt.config import check_threads
from nmt.errors import UsageError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp32": torch.float32, "bf16": torch.bfloat16}
RACE_ANSWERS = ("float32", "bfloat16")  # what the bf16/fp32 race answers, by the names a run's config.json keeps


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype for matrix products (float32: no autocast)
    raced: bool = False  # `--dtype auto` decided by the bf16/fp32 race (or its earlier answer), not by flags

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def kernels(self):
        """The attention kernel for this device: on CPU the plain math path, which measured ~10%
        faster than the fused flash kernel for sentence-length sequences (small preset, bf16,
        2 cores: 3,300 vs 3,000 target tokens/s in training)."""
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else _cpu_name()
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        return f"{self.device.type} ({name}{threads}), {dtype_name(self.dtype)}"


def setup(device: str = "auto", dtype: str = "auto", threads: int = 0, raced_before: str | None = None) -> Runtime:
    """`raced_before`: the dtype an earlier race chose for this run (its config.json), taken where
    `--dtype auto` would race again: the race is noisy, and a run's dtype should not change on resume."""
    torch.set_flush_denormal(True)
    check_threads(threads)
    if threads:
        torch.set_num_threads(threads)
    dev = _device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, *_dtype(dtype, dev, raced_before))


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' or 'bfloat16' (RACE_ANSWERS): the name `setup` takes back."""
    return str(dtype).removeprefix("torch.")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r} (auto, cpu or cuda)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def _dtype(name: str, device: torch.device, raced_before: str | None) -> tuple[torch.dtype, bool]:
    """The dtype, and whether the bf16/fp32 race chose it."""
    if name != "auto":
        if name not in DTYPES:
            raise UsageError(f"unknown dtype {name!r} (auto, float32 or bfloat16)")
        return DTYPES[name], False
    if device.type == "cuda":
        # bf16 units only: an older GPU (T4, V100) emulates bf16, slowly
        return (torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32), False
    return _cpu_dtype(raced_before)


def _cpu_dtype(raced_before: str | None) -> tuple[torch.dtype, bool]:
    """bf16 autocast where the CPU has AMX, float32 where it has no bf16 units, a race elsewhere.

    AMX's flag decides because the race alone misread the machine it was written for: on a 2-core
    Intel Xeon with AMX, bf16 trained `small` twice as fast as float32 (4,761 against 2,397 target
    tokens/s), yet 12 races in 12 processes read speed-ups from 1.29 to 4.37, since that VM's AMX
    unit ran whole processes at about 40% of its speed, and one race in an earlier session fell
    under the 1.2 bar and chose float32. avx512_bf16 alone does not decide: on a 2-core AMD EPYC
    Zen 4 that lists it, bf16 trained `small` 1.8 times as fast as float32 (3,347 against 1,816),
    but on a 2-core Intel Xeon KVM guest that lists it and hides AMX (family 6 model 207), bf16
    products ran at half the float32 rate (0.19 against 0.41 TFLOP/s) and `small` trained at 0.65
    times float32's speed (2,342 against 3,605); races there read 0.57-0.65, on the Zen 4 the
    products' rates 0.37-0.44 against 0.14-0.20 TFLOP/s, far on either side of the 1.2 bar.
    Returns the dtype and whether a race chose it (this one, or the earlier one `raced_before` names)."""
    if not os.environ.get("NMT_CPU_BF16_SPEEDUP"):  # tests and benchmarks pin the race's outcome with it
        units = cpu_bf16_units()
        if units == "none":
            log.debug("float32: this CPU lists no bf16 units")
            return torch.float32, False
        if "amx_bf16" in units.split(", "):
            log.debug("bfloat16 autocast: this CPU has %s", units)
            return torch.bfloat16, False
    if raced_before in RACE_ANSWERS:
        log.debug("%s: the run's first bf16/fp32 race chose it", raced_before)
        return DTYPES[raced_before], True
    return (torch.bfloat16 if cpu_bf16_speedup() > 1.2 else torch.float32), True


@functools.cache
def cpu_bf16_speedup() -> float:
    """How much faster a bf16 matmul runs than a float32 one here (best of a few short trials)."""
    env = os.environ.get("NMT_CPU_BF16_SPEEDUP")  # lets tests and benchmarks pin the decision
    if env:
        return float(env)
    # Alternate the two dtypes and keep each one's best time, so a burst of load from another
    # process slows both alike instead of deciding the race.
    mats = {dt: (torch.randn(768, 768, dtype=dt), torch.randn(768, 768, dtype=dt)) for dt in (torch.float32, torch.bfloat16)}
    times = {dt: float("inf") for dt in mats}
    for _ in range(7):
        for dt, (a, b) in mats.items():
            t0 = time.perf_counter()
            for _ in range(3):
                a @ b
            times[dt] = min(times[dt], time.perf_counter() - t0)
    speedup = times[torch.float32] / times[torch.bfloat16]
    log.debug("bf16 matmul speed-up on this CPU: %.2f×", speedup)
    return speedup


@functools.cache
def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo (None where there is no such line or file)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), None)
    except OSError:
        return None


def _cpu_name() -> str:
    import platform

    return _cpuinfo("model name") or platform.processor() or "CPU"


def cpu_bf16_units() -> str:
    """The CPU's bf16 matrix and vector units as /proc/cpuinfo names them ('none' without either,
    'unknown' where its flags can't be read): benchmarks print it beside every figure, because
    the same command trains twice as fast with them."""
    flags = _cpuinfo("flags")
    if flags is None:
        return "unknown"
    return ", ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags.split()) or "none"


def cpu_description() -> str:
    """The CPU as benchmarks name it beside their figures: model and bf16 units."""
    return f"{_cpu_name()} (bf16 units: {cpu_bf16_units()})"


def trim_heap() -> None:
    """Give freed heap memory back to the operating system (glibc only; elsewhere nothing).
    glibc keeps large freed blocks once its allocation threshold has risen, so the temporaries
    of an epoch's batch plan (about 90 MB at 5 million pairs) would otherwise stay resident."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc reuse freed memory for the next allocation instead of returning it (True when
    set; glibc only). Blocks under `mmap_threshold` come from the heap, and the heap is trimmed
    only when `trim_threshold` bytes are free at its top. A training step allocates and frees
    the same large temporaries every time; with glibc's adaptive defaults many came back as fresh
    pages each step, and the kernel's zeroing of those pages showed up as slow copies (a bf16 →
    fp32 copy of [256, 8000]: 3.6 ms in a training step, 0.1 ms alone). Measured, small preset,
    bf16, 2 cores: 3,664–4,128 → 4,533–4,540 target tokens/s, the same peak RSS (1.64–1.69 GB)."""
    libc = _glibc()
    if not libc:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))


def _glibc():
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim, _libc.mallopt  # noqa: B018 - absent outside glibc
        except (OSError, AttributeError):
            _libc = False
    return _libc


_libc = None

