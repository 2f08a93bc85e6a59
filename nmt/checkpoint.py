"""The model directory: what it contains, written atomically, loaded safely, versioned.

    DIR/config.json          format version, model/tokenizer/training configs, data fingerprints,
                             filter report, package versions
    DIR/tokenizer.json       (or tokenizer.src.json + tokenizer.tgt.json)
    DIR/tokenizer.options.json  what `nmt train` trained the tokenizer with, options and files (checked when reused)
    DIR/model.safetensors    the weights translation uses (best dev BLEU, or the average)
    DIR/training.json        steps, tokens, time, device, dev scores with signatures
    DIR/metrics.jsonl        one JSON object per log/eval event
    DIR/checkpoints/step-N/  resume state: model.safetensors + state.pt (optimizer, RNG, data position)

Every file is written through `nmt.atomic` (a temporary name, then a rename), so a crash or a
full disk never leaves a half-written file in place of a good one. Loading never unpickles arbitrary objects:
weights come from safetensors, resume state through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from nmt import atomic
from nmt.config import ModelConfig, check_model_config, from_dict
from nmt.errors import NmtError
from nmt.textio import read_small_file

log = logging.getLogger(__name__)

FORMAT = "nmt-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG_LIMIT = 16 << 20  # a config.json is a few kB; a larger one is not ours


# What `nmt.atomic` names its temporaries (`atomic.temporary_name`), and the previous version of a
# directory it moves aside while replacing it (`atomic.directory`).
TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")
MOVED_ASIDE = re.compile(r"^\.(.+)\.old-(\d+)$")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove what killed processes left in `directory` and its checkpoints/: temporaries
    `.NAME.tmp-PID` whose process is gone, and checkpoints/step-N/ that a pruning cut short (a
    finished checkpoint appears whole, by rename, so one without its weights or state is half
    deleted). A previous version `.NAME.old-PID` that a killed replacement moved aside goes back to
    NAME when NAME is missing (killed between its two renames), else it is removed. A temporary of
    a live process is kept. Returns what was removed."""
    removed = []
    for root in (Path(directory), Path(directory) / "checkpoints"):
        try:
            entries = list(root.iterdir())
        except OSError:
            continue
        for p in entries:
            aside = MOVED_ASIDE.match(p.name)
            if aside and not _process_alive(int(aside.group(2))) and not (root / aside.group(1)).exists():
                os.replace(p, root / aside.group(1))
                log.info("restored %s, which an interrupted replacement had moved aside", aside.group(1))
                continue
            leftover = TEMPORARY.match(p.name) or aside  # either way, its last group is the process id
            half_pruned = root.name == "checkpoints" and p.name.startswith("step-") and p.is_dir() and \
                not ((p / WEIGHTS).exists() and (p / "state.pt").exists())
            if (leftover and not _process_alive(int(leftover.groups()[-1]))) or half_pruned:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info("removed %d leftover(s) of interrupted runs in %s: %s", len(removed), directory,
                 ", ".join(p.name for p in removed[:3]))
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a name that only looks like ours): keep it
    return True


RUN_LOCK = ".train.lock"  # flock-ed by the `nmt train` writing a run directory (`lock_run`)


def lock_run(directory: Path) -> int | None:
    """Hold `directory`'s run lock for this process's life: a second `nmt train` on the same --out is
    refused at once, instead of both writing checkpoints, config and weights over each other. The
    kernel drops a flock when its process ends, killed or not, so no stale lock is ever left to
    clear. Returns the descriptor to close at the end; None where there is no flock (Windows, or
    a file system without it), where the run goes on unguarded as before."""
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(directory) / RUN_LOCK
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # another user's lock file: a flock needs only reading
            fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise NmtError(f"{directory}: cannot create the run's lock file {RUN_LOCK} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        raise NmtError(f"{directory}: another `nmt train`{f' (pid {holder})' if holder.isdigit() else ''} is "
                       f"writing this run: wait for it to end, or use another --out") from None
    except OSError:
        os.close(fd)
        return None
    try:  # the holder's pid, for the message above (the lock itself is the flock)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    return fd


def _as_os_error(write):
    """safetensors and torch report a failed write (a full disk) as SafetensorError or
    RuntimeError ("unexpected pos 576 vs 534"), not OSError: turn those into OSError, so that
    `atomic.write_file` removes the temporary and says in one line what happened."""
    def run(tmp: Path) -> None:
        try:
            write(tmp)
        except OSError:
            raise
        except Exception as e:
            if not (isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError"):
                raise
            full = "os error 28" in str(e) or shutil.disk_usage(Path(tmp).parent).free < (1 << 20)
            raise OSError(errno.ENOSPC if full else errno.EIO, str(e).splitlines()[0][:160]) from None
    return run


def save_weights(model, path: Path, staged: bool = False) -> None:
    """`staged`: `path` is in an `atomic.directory` being built (`atomic.write_file`)."""
    from safetensors.torch import save_model

    atomic.write_file(path, _as_os_error(lambda tmp: save_model(model, str(tmp))), staged)


def load_weights(model, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise _unloadable(path, e) from None
    if missing or unexpected:
        raise NmtError(f"{path}: weights do not match the config (missing {list(missing)[:3]}, "
                       f"unexpected {list(unexpected)[:3]})")
    import torch

    for name, tensor in model.state_dict().items():  # one pass over the weights: a diverged model would
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):  # translate into a crash
            raise NmtError(f"{path}: {name} holds NaN or infinite values (the training that wrote them diverged)")


def read_tensors(path: Path) -> dict[str, Any]:
    """The tensors of a weights file by name; a damaged or unreadable one is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise _unloadable(path, e) from None


def _unloadable(path: Path, e: Exception) -> NmtError:
    return NmtError(f"{path}: cannot load weights ({(str(e).splitlines() or [type(e).__name__])[0][:200]})")


def write_config(directory: Path, config: dict[str, Any]) -> None:
    atomic.write_text(directory / "config.json", json.dumps({"format": FORMAT, "version": FORMAT_VERSION,
                                                            **config}, indent=2))


def read_config(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.exists():
        raise NmtError(f"{directory}: no such model directory")
    if not directory.is_dir():
        raise NmtError(f"{directory}: not a directory (expected a model directory from `nmt train`)")
    path = directory / "config.json"
    try:
        data = json.loads(read_small_file(path, CONFIG_LIMIT, "a model config").decode("utf-8"))
    except FileNotFoundError:
        raise NmtError(f"{directory}: not a model directory (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NmtError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise NmtError(f"{path}: not an nmt model config (format is not {FORMAT!r})")
    if data.get("version") != FORMAT_VERSION:
        raise NmtError(f"{path}: format version {data.get('version')} is not supported (this nmt reads "
                       f"version {FORMAT_VERSION})")
    return data


def read_record(directory: Path, name: str) -> dict[str, Any] | None:
    """A JSON record of a model directory (`training.json`, `averaging.json`), read as untrusted as
    config.json (a FIFO or a link to /dev/zero must not hang or fill memory): None when there is
    none, a one-line error when it is not JSON. What it must hold is its reader's to check."""
    path = Path(directory) / name
    try:
        return json.loads(read_small_file(path, CONFIG_LIMIT, name))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NmtError(f"{path}: not valid JSON ({e})") from None


def config_section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A section of a config read by `read_config` (train, tokenizer…) as a dict: {} when it is
    missing or not a JSON object, for the readers that only look up optional facts in it."""
    section = config.get(name)
    return section if isinstance(section, dict) else {}


def load_for_inference(directory: Path, device=None):
    """(model in eval mode, vocabs, config dict) from a model directory, every part checked."""
    from nmt.model import Transformer
    from nmt.tokenizer import Vocabs

    directory = Path(directory)
    config = read_config(directory)
    if "model" not in config:
        raise NmtError(f"{directory / 'config.json'}: no model section")
    model_config = read_model_config(directory, config)
    vocabs = Vocabs.load(directory)
    if vocabs.src.get_vocab_size() != model_config.src_vocab_size or \
            vocabs.tgt.get_vocab_size() != model_config.tgt_vocab_size:
        raise NmtError(f"{directory}: tokenizer vocabulary sizes do not match the model config")
    weights = directory / WEIGHTS
    if not weights.exists():
        raise NmtError(f"{directory}: no {WEIGHTS} (training has not saved a model yet?)")
    check_weights(weights, model_config)
    model = Transformer(model_config)
    load_weights(model, weights)
    if device is not None:
        model.to(device)
    return model.eval(), vocabs, config


def read_model_config(directory: Path, config: dict[str, Any]) -> ModelConfig:
    """The model section of a config read by `read_config`, its keys, types and ranges checked
    (and its special ids those of nmt's tokenizers), so nothing impossible reaches the model."""
    from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID

    what = f"{Path(directory) / 'config.json'}: model"
    if not isinstance(config.get("model"), dict):
        raise NmtError(f"{what}: missing or not a JSON object")
    model_config = from_dict(ModelConfig, config["model"], what)
    check_model_config(model_config, what)
    ids = (model_config.pad_id, model_config.bos_id, model_config.eos_id)
    if ids != (PAD_ID, BOS_ID, EOS_ID):
        raise NmtError(f"{what}: pad_id, bos_id, eos_id are {ids}, nmt's tokenizers use {(PAD_ID, BOS_ID, EOS_ID)}")
    return model_config


HEADER_LIMIT = 100 << 20  # the safetensors library's own bound on a header
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def check_weights(path: Path, model_config: ModelConfig) -> None:
    """Compare a safetensors file's header (names, shapes, dtypes, byte ranges) with the tensors
    this config's model has, before the model is built: a forged or mismatched file is refused in
    one line instead of failing inside the constructor or the loader. The expected tensors come
    from the model built on the meta device, which allocates nothing."""
    import struct

    import torch

    from nmt.model import Transformer

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(HEADER_LIMIT, size - 8):
                raise NmtError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise NmtError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise NmtError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise NmtError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    with torch.device("meta"):
        model = Transformer(model_config)
    groups: dict[int, list[str]] = {}  # tied parameters: any one of the names may hold the tensor
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict(keep_vars=True).items()}
    unexpected = sorted(set(header) - set(shapes))
    missing = [names[0] for names in groups.values() if not any(n in header for n in names)]
    if missing or unexpected:
        raise NmtError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in FLOAT_DTYPES or info.get("shape") != shapes[name]:
            got = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else info
            raise NmtError(f"{path}: tensor {name} is {str(got)[:80]}, the config needs a float tensor of shape "
                           f"{shapes[name]}")
        begin, end = (info.get("data_offsets") or [None, None])[:2]
        count = math.prod(shapes[name]) * FLOAT_DTYPES[info["dtype"]]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin and end == begin + count
                and end <= data_bytes):
            raise NmtError(f"{path}: tensor {name} lies outside the file (cut short?)")


# -- resume state -------------------------------------------------------------------------------


def save_checkpoint(directory: Path, step: int, model, state: dict[str, Any], keep_last: int) -> Path:
    """checkpoints/step-N/ with weights and resume state, written to a temporary dir then renamed;
    then only the newest `keep_last` are kept."""
    import torch

    final = directory / "checkpoints" / f"step-{step:08d}"
    with atomic.directory(final) as tmp:
        save_weights(model, tmp / WEIGHTS, staged=True)
        atomic.write_file(tmp / "state.pt", _as_os_error(lambda p: torch.save(state, p)), staged=True)
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    root = Path(directory) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / "state.pt").exists() and (p / WEIGHTS).exists())


SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) can be made to run code before 2.6 (CVE-2025-32434)


def require_safe_torch_load() -> None:
    """Refuse to unpickle resume state with a torch whose weights_only loading is bypassable."""
    import re

    import torch

    found = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if found < SAFE_TORCH:
        raise NmtError(f"torch {torch.__version__} is too old to load resume state safely (weights_only "
                       f"loading is bypassable before 2.6, CVE-2025-32434): install torch>=2.6")


def load_state(checkpoint: Path) -> dict[str, Any]:
    import torch

    require_safe_torch_load()
    try:
        return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt pickle raises many types
        raise NmtError(f"{checkpoint / 'state.pt'}: cannot load resume state "
                       f"({(str(e).splitlines() or [type(e).__name__])[0][:160]})") from None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line per event; an append of one short line either lands whole or not at all in practice."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise atomic.write_error(path, e) from None
