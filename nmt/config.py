"""Typed configs (tokenizer, model, training, decoding): one source of defaults, saved as plain JSON.

The CLI reads its defaults and allowed values (the `Literal` types) from these dataclasses, and
the model directory stores them. Loading checks the keys: an unknown or missing key is a
one-line error, never a silent default. Options are layered in one place (`layered`): the
preset, then a `--config` file, then the flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from nmt.errors import NmtError, UsageError

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "bible-es-en"


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 8000
    joint: bool = True  # one vocabulary for both languages (lets all embeddings be tied)
    sample_lines: int = 2_000_000  # tokenizer trained on a seeded uniform sample of this many lines
    min_frequency: int = 2
    lowercase: bool = False


@dataclass
class ModelConfig:
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 3
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pre_norm: bool = True  # pre-norm trains stably without long warm-up; post-norm is the paper's
    tie_embeddings: bool = True  # target and output embeddings share one matrix, and the source's too with joint_vocab
    joint_vocab: bool = True  # one vocabulary for both languages (filled in from the tokenizer)
    max_positions: int = 1024
    src_vocab_size: int = 0  # filled in from the tokenizer
    tgt_vocab_size: int = 0
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3


PRESETS: dict[str, dict[str, Any]] = {
    # tests: trains in seconds
    "tiny": dict(d_model=64, n_heads=4, d_ff=128, encoder_layers=2, decoder_layers=2, dropout=0.0),
    # a 2-core CPU and a ~30k-pair corpus
    "small": dict(d_model=256, n_heads=4, d_ff=1024, encoder_layers=3, decoder_layers=3, dropout=0.1),
    # Vaswani et al. 2017, Table 3
    "base": dict(d_model=512, n_heads=8, d_ff=2048, encoder_layers=6, decoder_layers=6, dropout=0.1),
    "big": dict(d_model=1024, n_heads=16, d_ff=4096, encoder_layers=6, decoder_layers=6, dropout=0.3),
}

PRESET_TOKENIZER: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1000),
    "small": dict(vocab_size=8000),
    "base": dict(vocab_size=32000),
    "big": dict(vocab_size=32000),
}

PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_tokens=1024, lr=2e-3, warmup_steps=100, eval_every=200, log_every=10),
    "small": dict(batch_tokens=3000, lr=1e-3, warmup_steps=400, eval_every=500, average_last=3),
    "base": dict(batch_tokens=25000, lr=7e-4, warmup_steps=4000, eval_every=2000),
    "big": dict(batch_tokens=25000, lr=5e-4, warmup_steps=4000, eval_every=2000),
}


@dataclass
class TrainConfig:
    preset: str = "small"  # or "auto": the recipe is chosen from the budget (nmt/recipe.py); "finetune"
    src: str = "es"
    tgt: str = "en"
    train: list[str] = field(default_factory=lambda: [str(DEFAULT_DATA / "train")])
    pairs: list[str] = field(default_factory=list)  # "es-en", "en-es": several directions, tagged (else src-tgt)
    weights: list[float] | None = None  # each --train corpus's share of every epoch (nmt/mixing.py)
    init_from: str | None = None  # fine-tune: start from this model directory (nmt/finetune.py)
    dev: str | None = str(DEFAULT_DATA / "dev")
    seed: int = 1
    batch_tokens: int | str = 3000  # target tokens per batch (per device), before --update-freq; or "auto"
    update_freq: int = 1  # gradient accumulation: batches per optimizer step
    lr: float = 1e-3
    lr_schedule: Literal["inverse-sqrt", "cosine", "linear"] = "inverse-sqrt"  # cosine/linear: to 0 at the budget's end
    warmup_steps: int = 400
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    curriculum: float = 0.0  # >0: the first epoch serves short batches first (batching.plan_epoch)
    max_steps: int | None = None
    max_time: float | None = None  # seconds
    max_epochs: int | None = None
    eval_every: int = 500  # steps between dev evaluations (and checkpoints)
    eval_max_sentences: int = 0  # 0: the whole dev set
    patience: int = 0  # stop after this many evaluations without a better dev BLEU (0: never)
    keep_last: int = 3  # periodic checkpoints kept for averaging
    average_last: int = 0  # average this many last checkpoints at the end (0: off)
    max_length: int = 250  # drop training pairs longer than this many tokens on either side
    max_ratio: float = 3.0  # drop pairs whose token-length ratio exceeds this
    dedupe: bool = True
    cache_dir: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0: all cores
    compile: bool = False
    log_every: int = 50
    fixed: list[str] = field(default_factory=list)  # "section.name" of options set by hand: a recipe keeps them


@dataclass
class DecodeConfig:
    beam_size: int = 5
    nbest: int = 1
    length_penalty: float = 1.0  # GNMT alpha; 0 disables length normalisation
    length_norm: Literal["gnmt", "average"] = "gnmt"
    min_length: int = 0
    max_length_a: float = 1.5
    max_length_b: int = 10
    batch_tokens: int = 4000  # source tokens per batch
    window: int = 256  # lines read ahead, sorted by length inside the window
    sampling_topk: int = 0
    sampling_topp: float = 0.0
    temperature: float = 1.0
    seed: int = 1
    no_repeat_ngram: int = 0  # ban repeating any n-gram of this many target tokens (0: off)
    guard: bool = True  # decode lines that loop, blow up or hit the cap again with an n-gram ban
    alignment: bool = False  # word alignments from the cross-attention
    split_sentences: bool = False  # translate a line sentence by sentence and join the results


C = TypeVar("C")


def from_dict(cls: type[C], data: dict[str, Any], what: str) -> C:
    """Build a config from JSON data, refusing unknown and missing keys with a one-line error."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    missing = sorted(names - set(data))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown keys {unknown}")
        if missing:
            parts.append(f"missing keys {missing}")
        raise NmtError(f"{what}: {'; '.join(parts)}")
    values = dict(data)
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return cls(**values)  # type: ignore[call-arg]


# Bounds for a model config read from a model directory, which is untrusted input: a field out of
# range must be refused before anything is allocated (d_model 10⁹ would ask for terabytes).
MODEL_LIMITS: dict[str, tuple[int, int]] = {
    "d_model": (2, 1 << 16), "n_heads": (1, 1 << 10), "d_ff": (1, 1 << 18),
    "encoder_layers": (1, 1 << 10), "decoder_layers": (1, 1 << 10), "max_positions": (1, 1 << 20),
    "src_vocab_size": (4, 1 << 22), "tgt_vocab_size": (4, 1 << 22),
}
MAX_POSITION_TABLE = 1 << 28  # max_positions × d_model floats (1 GiB), a buffer not in the weights file


def limit_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be the integer model option `name` (one of MODEL_LIMITS), or None."""
    low, high = MODEL_LIMITS[name]
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{name} must be int, not {json.dumps(value)[:40]}"
    if not low <= value <= high:
        return f"{name} = {value} is out of range [{low}, {high}]"
    return None


DROPOUTS = ("dropout", "attention_dropout")


def field_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be the model option `name` on its own (a bounded integer of MODEL_LIMITS, or
    a dropout probability), or None."""
    if name in MODEL_LIMITS:
        return limit_problem(name, value)
    if name in DROPOUTS and not 0.0 <= value < 1.0:
        return f"{name} = {value} is not in [0, 1)"
    return None


def shape_problem(d_model: int, n_heads: int | None) -> str | None:
    """Why this width (and number of heads, when given) cannot make a model, or None."""
    if d_model % 2:
        return f"d_model = {d_model} must be even (sinusoidal positions come in sin/cos pairs)"
    if n_heads is not None and d_model % n_heads:
        return f"d_model = {d_model} is not divisible by n_heads = {n_heads}"
    return None


def check_model_config(config: ModelConfig, what: str) -> None:
    """Refuse a model config whose fields have the wrong type or an impossible or unbounded value,
    with a one-line error naming the field (`what` says where the config came from)."""
    problem = model_config_problem(config)
    if problem:
        raise NmtError(f"{what}: {problem}")


def model_config_problem(c: ModelConfig) -> str | None:
    """The first field of a model config with the wrong type or an impossible or unbounded value,
    said in words (`check_model_config`), or None."""
    problem = type_problem(c)
    if problem:
        return problem
    for name in (*MODEL_LIMITS, *DROPOUTS):
        problem = field_problem(name, getattr(c, name))
        if problem:
            return problem
    problem = shape_problem(c.d_model, c.n_heads)
    if problem:
        return problem
    if c.max_positions * c.d_model > MAX_POSITION_TABLE:
        return (f"max_positions × d_model = {c.max_positions * c.d_model:,} exceeds {MAX_POSITION_TABLE:,} (the "
                f"position table alone would take {c.max_positions * c.d_model * 4 / 2**30:.0f} GiB)")
    vocab = min(c.src_vocab_size, c.tgt_vocab_size)
    for name in ("pad_id", "bos_id", "eos_id"):
        if not 0 <= getattr(c, name) < vocab:
            return f"{name} = {getattr(c, name)} is not a token id (vocabulary size {vocab})"
    if len({c.pad_id, c.bos_id, c.eos_id}) < 3:
        return f"pad_id, bos_id and eos_id must differ (got {c.pad_id}, {c.bos_id}, {c.eos_id})"
    return None


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` (read from JSON) has the type of a config field's hint; a `Literal`'s values
    are `check_choices`'s to check."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any or origin is Literal:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_fits, value, args))
    return True


def type_problem(config: Any) -> str | None:
    """The first field whose value has not its declared type, said in words (a config read from
    JSON can hold anything), or None."""
    hints = get_type_hints(type(config))
    for f in fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if not _fits(value, hint):
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            return f"{f.name} must be {kind}, not {json.dumps(value, default=str)[:40]}"
    return None


def check_types(config: Any, what: str) -> None:
    """A usage error naming the first field whose value has the wrong type (a `--config` file's
    JSON can hold anything; the flags are typed already)."""
    problem = type_problem(config)
    if problem:
        raise UsageError(f"{what}: {problem}")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_overrides(path: str | Path) -> dict[str, Any]:
    """Read a `--config FILE` (JSON) of option overrides: {"model": {...}, "train": {...}, "tokenizer": {...}}."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NmtError(f"{p}: no such config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NmtError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or set(data) - {"model", "train", "tokenizer"}:
        raise UsageError(f"{p}: expected a JSON object with sections model, train, tokenizer")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise UsageError(f"{p}: section {section} must be a JSON object of options (got {json.dumps(values)[:40]})")
    return data


def apply(config: C, overrides: dict[str, Any], what: str) -> C:
    names = {f.name for f in fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UsageError(f"{what}: unknown option(s) {unknown}")
    values = {k: (tuple(v) if k == "betas" else v) for k, v in overrides.items()}
    return dataclasses.replace(config, **values)  # type: ignore[type-var]


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The allowed values of a `Literal` field, e.g. choices(DecodeConfig, "length_norm")."""
    hint = get_type_hints(cls)[name]
    return tuple(get_args(hint)) if get_origin(hint) is Literal else ()


def check_choices(config: Any, what: str = "") -> None:
    """A usage error naming the option for any `Literal` field holding another value."""
    for f in fields(config):
        allowed = choices(type(config), f.name)
        value = getattr(config, f.name)
        if allowed and value not in allowed:
            name = what or f"--{f.name.replace('_', '-')}"
            raise UsageError(f"{name}: unknown value {value!r} (choose from {', '.join(allowed)})")


def from_options(cls: type[C], options: dict[str, Any]) -> C:
    """A config from the CLI's options named like its fields (others are ignored), choices checked."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    config = cls(**{k: v for k, v in options.items() if k in names})  # type: ignore[call-arg]
    check_choices(config)
    return config


def is_sampling(config: DecodeConfig) -> bool:
    """Whether any sampling option is set (then one translation is drawn per line, not searched)."""
    return bool(config.sampling_topk or config.sampling_topp or config.temperature != 1.0)


MAX_SEED = 2**63 - 1  # numpy refuses negative seeds, torch.manual_seed those of 2⁶⁴ and more
MAX_DECODE_SEED = 2**32 - 1  # CTranslate2 takes an unsigned 32-bit one


def max_threads() -> int:
    """The most CPU threads a command takes: 4 per core this process may run on (at least 8).
    More only slows a run down, and at tens of thousands the thread pools crash or hang."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(8, 4 * cores)


def check_threads(threads: int) -> None:
    """A usage error for a CPU thread count out of [0, `max_threads()`] (0: all cores)."""
    if not 0 <= threads <= max_threads():
        raise UsageError(f"--threads must be in [0, {max_threads()}] (0: all cores; at most 4 per core here; "
                         f"got {threads})")


def check_seed(seed: int, most: int = MAX_SEED) -> None:
    """A usage error for a seed that the random generators would refuse (as an internal error)."""
    if not 0 <= seed <= most:
        raise UsageError(f"--seed must be in [0, {most}] (got {seed})")


# Decoding options' upper bounds: far past any use, and below what would crash or exhaust memory
# (a beam of 10⁷ asks for 160 GB; a length penalty exponent of 1,000 overflows a float).
MAX_BEAM = 1024
MAX_BATCH_TOKENS = 1 << 24
MAX_WINDOW = 1 << 24
MAX_LENGTH_PENALTY = 10.0
MAX_TEMPERATURE = 1000.0  # far past it, sampling is uniform anyway (at 1e300 the logits underflow)


def check_decode(config: DecodeConfig) -> None:
    """Usage errors for decoding options of the wrong type, out of range or that cannot work
    together (the CLI's and the API's)."""
    check_types(config, "decoding options")
    check_choices(config)
    c = config
    check_seed(c.seed, MAX_DECODE_SEED)
    if c.beam_size < 1 or not 1 <= c.nbest <= c.beam_size:
        raise UsageError(f"need beam size ≥ 1 and 1 ≤ nbest ≤ beam size (got {c.beam_size}, {c.nbest})")
    problems = [
        (c.beam_size > MAX_BEAM, f"--beam-size must be at most {MAX_BEAM} (got {c.beam_size})"),
        (c.batch_tokens < 1 or c.window < 1, "--batch-tokens and --window must be ≥ 1"),
        (c.batch_tokens > MAX_BATCH_TOKENS or c.window > MAX_WINDOW,
         f"--batch-tokens must be at most {MAX_BATCH_TOKENS:,} and --window at most {MAX_WINDOW:,} lines (got "
         f"{c.batch_tokens}, {c.window})"),
        (not abs(c.length_penalty) <= MAX_LENGTH_PENALTY,
         f"--length-penalty must be in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}] (got {c.length_penalty})"),
        (c.no_repeat_ngram < 0, f"--no-repeat-ngram must be ≥ 0 (got {c.no_repeat_ngram})"),
        (c.min_length < 0, f"--min-length must be ≥ 0 (got {c.min_length})"),
        (c.max_length_a < 0 or c.max_length_b < 0 or c.max_length_a + c.max_length_b <= 0,
         f"--max-length-a and --max-length-b must be ≥ 0 and not both 0: the length cap is a × source length + b "
         f"(got {c.max_length_a}, {c.max_length_b})"),
        (c.sampling_topk < 0, f"--sampling-topk must be ≥ 0 (0: off; got {c.sampling_topk})"),
        (not 0 <= c.sampling_topp <= 1, f"--sampling-topp must be in [0, 1] (0: off; got {c.sampling_topp})"),
        (not 0 < c.temperature <= MAX_TEMPERATURE,
         f"--temperature must be in (0, {MAX_TEMPERATURE:g}] (1: no sampling; greedy search is --beam-size 1; got "
         f"{c.temperature})"),
        (is_sampling(c) and c.nbest > 1, f"--nbest {c.nbest} needs beam search; with --sampling-topk, "
                                         f"--sampling-topp or --temperature one translation is drawn per line"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


def given(**values: Any) -> dict[str, Any]:
    """The options the user actually gave (None means: keep the preset or config-file value)."""
    return {k: v for k, v in values.items() if v is not None}


def layered(preset_name: str, config_file: str | Path | None, model: dict[str, Any], tokenizer: dict[str, Any],
            train: dict[str, Any], whole_model: bool = True) -> tuple[ModelConfig, TokenizerConfig, TrainConfig]:
    """The run's configs: the preset's values, then the `--config` file's sections, then the
    command-line flags given (dicts of field → value, None-free). Not `whole_model`: the model's
    shape is decided later (the recipe, or a fine-tune's parent), so its fields are checked alone."""
    model_config, tok_config, train_preset = preset(preset_name)
    overrides = load_overrides(config_file) if config_file else {}
    model_config = apply(model_config, overrides.get("model", {}), "--config model")
    check_model_options(model_config, overrides.get("model", {}), whole_model)
    model_config = apply(model_config, model, "model")
    tok_config = apply(apply(tok_config, overrides.get("tokenizer", {}), "--config tokenizer"), tokenizer, "tokenizer")
    train_config = apply(TrainConfig(preset=preset_name, **train_preset), overrides.get("train", {}), "--config train")
    check_types(tok_config, "--config tokenizer")
    check_types(train_config, "--config train")
    train_config = apply(train_config, train, "train")
    check_choices(tok_config, "--tokenizer")  # its one choice, `kind`, is the --tokenizer flag
    check_choices(train_config)
    if tok_config.sample_lines < 1:
        raise UsageError(f"--tokenizer-sample must be ≥ 1 pair (got {tok_config.sample_lines})")
    if not 1 <= tok_config.vocab_size <= MODEL_LIMITS["src_vocab_size"][1]:  # (under MIN_VOCAB: raised to it, said)
        raise UsageError(f"--vocab-size must be in [1, {MODEL_LIMITS['src_vocab_size'][1]:,}] (got "
                         f"{tok_config.vocab_size}; the smallest vocabulary has {MIN_VOCAB} pieces: 256 byte tokens, "
                         f"{SPECIAL_TOKENS} special ones and 64 more)")
    if tok_config.min_frequency < 0:
        raise UsageError(f"--config tokenizer.min_frequency must be ≥ 0 (got {tok_config.min_frequency})")
    if not train_config.max_ratio >= 1:  # (NaN too: it would switch the filter off)
        raise UsageError(f"--max-ratio must be ≥ 1, a longer side at most that many times the shorter "
                         f"(got {train_config.max_ratio})")
    return model_config, tok_config, train_config


SPECIAL_TOKENS = 4  # <pad> <unk> <s> </s>: ids 0-3 (`tokenizer.SPECIALS`)
BYTE_PIECES = 256  # the byte-fallback tokens every vocabulary holds (`tokenizer.BYTE_TOKENS`)
LEAST_MERGES = 64  # the fewest learnt pieces a tokenizer is trained with


def smallest_vocabulary(tags: int = 0) -> int:
    """The fewest pieces a tokenizer has: bytes, specials, target-language tags and LEAST_MERGES;
    a smaller --vocab-size trains this one (`tokenizer.train_tokenizer` says so)."""
    return BYTE_PIECES + SPECIAL_TOKENS + tags + LEAST_MERGES


MIN_VOCAB = smallest_vocabulary()
# Model fields a run does not take from its options: the tokenizer fills them in
FROM_THE_TOKENIZER = {"src_vocab_size": "--vocab-size", "tgt_vocab_size": "--vocab-size",
                      "joint_vocab": "--separate-vocab", "pad_id": None, "bos_id": None, "eos_id": None}


def check_model_options(config: ModelConfig, given: dict[str, Any], whole: bool = True) -> None:
    """A usage error for a `--config` model section that sets what the tokenizer decides, or makes a
    model config that loading would refuse (the same checks: `model_config_problem`), before any work.
    Not `whole` (the recipe or a fine-tune's parent decides the rest of the shape, and checks it
    there): each field given alone."""
    for name in sorted(set(given) & set(FROM_THE_TOKENIZER)):
        flag = FROM_THE_TOKENIZER[name]
        raise UsageError(f"--config model.{name}: set by the tokenizer, not an option"
                         + (f" (use {flag})" if flag else " (nmt's tokenizers fix the special ids at 0, 2 and 3)"))
    if whole:
        problem = model_config_problem(dataclasses.replace(config, src_vocab_size=MIN_VOCAB, tgt_vocab_size=MIN_VOCAB))
    else:
        names = [*sorted(set(given) & set(MODEL_LIMITS)), *(name for name in DROPOUTS if name in given)]
        problem = type_problem(config) or next((p for name in names if (p := field_problem(name, given[name]))), None) \
            or (shape_problem(config.d_model, None) if "d_model" in given else None)
    if problem:
        raise UsageError(f"--config model: {problem}")


def preset(name: str) -> tuple[ModelConfig, TokenizerConfig, dict[str, Any]]:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return ModelConfig(**PRESETS[name]), TokenizerConfig(**PRESET_TOKENIZER[name]), PRESET_TRAINING[name]
