"""The `nmt` command: Typer commands that parse options, build configs and call one library function.

Errors a user can fix (`NmtError`) become one line on stderr and exit code 1 (2 for usage); any
other exception is a bug: one line saying "internal error" and exit code 3, so a script can tell
a bug from bad input. No traceback unless `--verbose`. Defaults and allowed values come from the
config dataclasses (`nmt.config`), which also layer preset → `--config` file → flags. Logs go to stderr, data to stdout. Heavy imports (torch)
happen inside the commands that need them, so `nmt --help` and `nmt evaluate` stay quick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from nmt import __version__
from nmt.config import DecodeConfig, check_seed, choices
from nmt.errors import NmtError, UsageError

INTERNAL_ERROR = 3  # a bug, not bad input: distinct from user errors (1) and usage errors (2)

log = logging.getLogger("nmt")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, translate with and evaluate Transformer translation models on plain parallel text.",
)

_state = {"verbose": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nmt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs and full tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["verbose"] = verbose
    _setup_logging(verbose)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from nmt.progress import stderr_console

    console = stderr_console()
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, log_time_format="%H:%M:%S")
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger("nmt")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


# ---------------------------------------------------------------------------------------------
# evaluate (no torch)
# ---------------------------------------------------------------------------------------------

from nmt.evaluate import evaluate as _evaluate_command  # noqa: E402  (import after app exists)

app.command("evaluate", help="Score hypotheses against references with sacreBLEU (BLEU, chrF, TER).")(
    _evaluate_command
)


# ---------------------------------------------------------------------------------------------
# shared option parsing
# ---------------------------------------------------------------------------------------------


def parse_duration(text: str | None) -> float | None:
    """'30m', '1h30m', '90s', '2h' or plain seconds → seconds."""
    if text is None:
        return None
    import re

    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise UsageError(f"--max-time: cannot read {text!r} (examples: 30m, 1h30m, 90s, 600)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _choice(value: str | None, name: str, allowed: tuple[str, ...]) -> str | None:
    if value is not None and value not in allowed:
        raise UsageError(f"{name}: unknown value {value!r} (choose from {', '.join(allowed)})")
    return value


def _given(**values) -> dict:
    from nmt.config import given

    return given(**values)


# ---------------------------------------------------------------------------------------------
# train-tokenizer, train
# ---------------------------------------------------------------------------------------------

TrainOpt = Annotated[Optional[List[str]], typer.Option("--train", help="Training data prefix: reads PREFIX.SRC and PREFIX.TGT (.gz accepted). Repeat for several corpora. [default: the embedded Bible corpus]")]
SrcOpt = Annotated[Optional[str], typer.Option("--src", help="Source language suffix. [default: es]")]
TgtOpt = Annotated[Optional[str], typer.Option("--tgt", help="Target language suffix. [default: en]")]


PairsOpt = Annotated[Optional[str], typer.Option("--pairs", "--lang-pairs", help="Several directions in one model, e.g. es-en,en-es: each --train PREFIX is read for every pair it has files for; sources get a target-language tag <2xx> (translate with --tgt-lang). Replaces --src/--tgt.")]


def _pair_list(pairs: str | None, src: str | None, tgt: str | None) -> list[str] | None:
    """--pairs as "SRC-TGT" strings (None when not given); with --src/--tgt too it is a usage error."""
    from nmt import directions

    if pairs is None:
        return None
    if src is not None or tgt is not None:
        raise UsageError("give --pairs or --src/--tgt, not both (--pairs es-en names both sides)")
    return [f"{a}-{b}" for a, b in directions.parse_pairs(pairs).pairs]


def _first_pair(train_config, pair_list: list[str] | None):
    """--src/--tgt of a --pairs run: its first pair's (what config.json's src and tgt then say)."""
    from nmt import config as cfg

    if not pair_list:
        return train_config
    first = pair_list[0].split("-")
    return cfg.apply(train_config, {"src": first[0], "tgt": first[1]}, "train")


def _tokenizer_flags(vocab_size, kind, separate_vocab, sample) -> dict:
    return _given(vocab_size=vocab_size, kind=kind, joint=None if separate_vocab is None else not separate_vocab,
                  sample_lines=sample)


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write tokenizer.json into.")],
    train: TrainOpt = None,
    src: SrcOpt = None,
    tgt: TgtOpt = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Subword vocabulary size (256 byte tokens included).")] = None,
    kind: Annotated[Optional[str], typer.Option("--tokenizer", help="bpe or unigram.")] = None,
    separate_vocab: Annotated[Optional[bool], typer.Option("--separate-vocab", help="One vocabulary per language instead of a joint one.")] = None,
    sample: Annotated[Optional[int], typer.Option("--tokenizer-sample", help="Train on a uniform sample of this many pairs.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the sample.")] = None,
    preset: Annotated[str, typer.Option(help="Preset whose vocabulary size is the default.")] = "small",
    config_file: Annotated[Optional[Path], typer.Option("--config", help="JSON file with a tokenizer section; command-line options override it.")] = None,
    pairs: PairsOpt = None,
) -> None:
    """Train the subword tokenizer(s) alone (nmt train does this itself when needed)."""
    from nmt import checkpoint
    from nmt import config as cfg
    from nmt.train import check_joint, run_directions, train_tokenizer

    _not_stdout(out, "--out", "the tokenizer is a directory and")
    found = [name for name in ("config.json", checkpoint.WEIGHTS) if (out / name).exists()]
    if found or checkpoint.list_checkpoints(out):  # its ids are what the model was trained on
        raise NmtError(f"{out}: holds an nmt run ({', '.join(found or ['checkpoints'])}), whose model is trained or "
                       f"being trained on the ids of the tokenizer there; write a new tokenizer to another --out")

    pair_list = _pair_list(pairs, src, tgt)
    _, tok_config, train_config = cfg.layered(preset, config_file, {}, _tokenizer_flags(vocab_size, kind, separate_vocab, sample),
                                              _given(train=train, src=src, tgt=tgt, seed=seed, pairs=pair_list),
                                              whole_model=False)  # (no model here: its fields checked alone)
    train_config = _first_pair(train_config, pair_list)
    check_seed(train_config.seed)
    run = run_directions(train_config)
    check_joint(run, tok_config)
    vocabs = train_tokenizer(train_config, tok_config, run.tags)  # the very function `nmt train` uses
    vocabs.save(out)
    log.info("tokenizer (%s, %d pieces) written to %s", tok_config.kind, vocabs.src.get_vocab_size(), out)


@app.command()
def train(
    train: TrainOpt = None,
    dev: Annotated[Optional[str], typer.Option("--dev", help="Dev data prefix for validation (dev BLEU, best model). 'none' to skip.")] = None,
    src: SrcOpt = None,
    tgt: TgtOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (model, logs, checkpoints). [default: runs/bible-es-en]")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Model size: tiny, small, base or big; or auto: chosen from the machine's measured speed and --max-time/--max-steps. [default: auto with a budget (a resume: the preset the run was trained with), else small]")] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="JSON file with model/train/tokenizer sections; command-line options override it.")] = None,
    max_time: Annotated[Optional[str], typer.Option(help="Time budget, e.g. 30m, 2h, 90s.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(help="Stop after this many epochs.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (weights, batches, dropout, tokenizer sample).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto (on CPU: bf16 where it has AMX, float32 where it has no bf16 units, else the faster in a short race), float32 or bfloat16.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (0: all cores).")] = None,
    batch_tokens: Annotated[Optional[str], typer.Option(help="Padded target tokens per batch, or 'auto': the largest that fits in GPU memory.")] = None,
    update_freq: Annotated[Optional[int], typer.Option(help="Batches accumulated per optimizer step.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(help="inverse-sqrt, or cosine or linear (to 0 at the end of --max-steps/--max-time/--max-epochs, whichever comes first).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup", help="Warm-up steps.")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing ε.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout rate.")] = None,
    post_norm: Annotated[Optional[bool], typer.Option("--post-norm", help="Post-norm layers (the paper's) instead of pre-norm.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Steps between dev evaluations and checkpoints.")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many evaluations without a better dev BLEU (0: never).")] = None,
    keep_last: Annotated[Optional[int], typer.Option(help="Periodic checkpoints to keep.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Subword vocabulary size.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="bpe or unigram.")] = None,
    separate_vocab: Annotated[Optional[bool], typer.Option("--separate-vocab", help="One vocabulary per language.")] = None,
    tokenizer_sample: Annotated[Optional[int], typer.Option(help="Pairs sampled to train the tokenizer.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Drop pairs longer than this many tokens.")] = None,
    max_ratio: Annotated[Optional[float], typer.Option(help="Drop pairs whose length ratio exceeds this.")] = None,
    no_dedupe: Annotated[Optional[bool], typer.Option("--no-dedupe", help="Keep exact duplicate pairs.")] = None,
    cache_dir: Annotated[Optional[str], typer.Option(help="Where to keep the token-id cache. [default: OUT/cache]")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile", help="torch.compile the model.")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Steps between log lines in metrics.jsonl.")] = None,
    average_last: Annotated[Optional[int], typer.Option(help="At the end, average this many last checkpoints if that scores higher on dev (0: off).")] = None,
    test: Annotated[Optional[str], typer.Option("--test", help="Held-out prefix: at the end, translate it (beam 5) and report BLEU with examples; never used to choose anything.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Train into an existing --out that is not empty and not this run's (nmt's files there are replaced; a tokenizer there is reused, unless nmt trained it there with other options).")] = False,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", "--finetune-from-model", help="Fine-tune: start from this model directory's weights, with its tokenizer and model options (optimizer, schedule and best score start afresh).")] = None,
    pairs: PairsOpt = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Share of each --train corpus in every epoch, e.g. 0.7,0.3 (one per corpus; normalised).")] = None,
) -> None:
    """Train tokenizer and Transformer on parallel text; re-running the same command resumes."""
    from nmt import config as cfg
    from nmt import mixing

    _survive_closed_stderr()
    _not_stdout(out, "--out", "a run is a directory and")
    _not_stdout(None if cache_dir is None else Path(cache_dir), "--cache-dir", "the token cache is a directory and")

    preset_given = preset is not None
    if preset == "finetune":  # what a fine-tune's config.json records, not a preset to start from
        raise UsageError(f"unknown preset 'finetune' (choose from {', '.join(cfg.PRESETS)} or auto; a fine-tune is "
                         f"--init-from DIR, and keeps that model's shape)")
    if preset is None:
        preset = "finetune" if init_from is not None else \
            "auto" if (max_time is not None or max_steps is not None) else "small"
    elif init_from is not None and preset == "auto":
        raise UsageError("--preset auto chooses a model shape; a fine-tune (--init-from) keeps the parent's "
                         "(drop --preset, give --max-time for its budget)")
    pair_list = _pair_list(pairs, src, tgt)

    def layered(name: str):  # the configs of preset `name` with the options given
        model_flags = _given(dropout=dropout, pre_norm=None if post_norm is None else not post_norm)
        # "auto" starts from the small preset's values; the recipe then replaces those not set by hand
        return cfg.layered(
            "small" if name in ("auto", "finetune") else name, config_file, model_flags,
            _tokenizer_flags(vocab_size, tokenizer, separate_vocab, tokenizer_sample),
            _given(train=train, src=src, tgt=tgt, max_time=parse_duration(max_time), max_steps=max_steps,
                   max_epochs=max_epochs, seed=seed, device=device, dtype=dtype, threads=threads,
                   batch_tokens=_batch_tokens(batch_tokens), update_freq=update_freq, lr=lr, lr_schedule=lr_schedule,
                   warmup_steps=warmup_steps, label_smoothing=label_smoothing, eval_every=eval_every, patience=patience,
                   keep_last=keep_last, max_length=max_length, max_ratio=max_ratio, cache_dir=cache_dir, compile=compile,
                   log_every=log_every, average_last=average_last, dedupe=None if no_dedupe is None else not no_dedupe,
                   dev=dev, pairs=pair_list, init_from=None if init_from is None else str(init_from)),
            whole_model=name not in ("auto", "finetune"))

    model_config, tok_config, train_config = layered(preset)
    if init_from is None and train_config.init_from is not None:  # the fine-tune's rules start from the flag
        raise UsageError(f"--config train.init_from: give --init-from {train_config.init_from} on the command line "
                         f"instead (a fine-tune keeps the parent's shape and sets its own schedule)")
    if out is None:
        out = Path("runs") / ("bible-es-en" if train is None and not pair_list and init_from is None else
                              "+".join(pair_list) if pair_list else f"{train_config.src}-{train_config.tgt}")
    if not preset_given and init_from is None and (resumed := _resumed_preset(out)) not in (None, preset):
        if resumed == "auto":  # no budget given: the default would be small, another model
            raise UsageError(f"{out} was trained with the recipe chosen for its budget (--preset auto): give "
                             f"--max-time or --max-steps to resume it (its budget continues it, a larger one "
                             f"extends it)")
        log.info("%s: a run of --preset %s, resumed with it%s", out, resumed,
                 " (the recipe, --preset auto, needs a new --out)" if preset == "auto" else "")
        preset = resumed
        model_config, tok_config, train_config = layered(preset)
    train_config = _first_pair(train_config, pair_list)
    if weights is not None:
        train_config = cfg.apply(train_config, {"weights": mixing.parse_weights(weights, len(train_config.train))},
                                 "train")
    elif train_config.weights is not None:  # from a --config file: the same checks
        train_config = cfg.apply(train_config, {"weights": mixing.check_weights(
            train_config.weights, len(train_config.train), "--config train: weights")}, "train")
    train_config = cfg.apply(train_config, {"preset": preset}, "train")
    if str(train_config.dev).lower() == "none":
        train_config = cfg.apply(train_config, {"dev": None}, "train")
    if preset == "auto" or init_from is not None:
        overrides = cfg.load_overrides(config_file) if config_file else {}
        flags = dict(model=_given(dropout=dropout, pre_norm=post_norm), tokenizer=_given(vocab_size=vocab_size),
                     train=_given(batch_tokens=batch_tokens, update_freq=update_freq, lr=lr, lr_schedule=lr_schedule,
                                  warmup_steps=warmup_steps, eval_every=eval_every, average_last=average_last))
        if init_from is not None:  # what a fine-tune compares with its parent, or keeps over its schedule
            flags["tokenizer"].update(_given(kind=tokenizer, joint=separate_vocab, sample_lines=tokenizer_sample))
            flags["model"].update(cfg.PRESETS[preset] if preset_given else {})
            flags["train"].update(_given(src=src, tgt=tgt, pairs=pairs))
        fixed = sorted({f"{section}.{name}" for section in ("model", "tokenizer", "train")
                        for name in [*overrides.get(section, {}), *flags[section]]})
        train_config = cfg.apply(train_config, {"fixed": fixed}, "train")
    _check_train_values(train_config)
    for name in ("dropout", "attention_dropout"):
        if not 0 <= getattr(model_config, name) < 1:
            raise UsageError(f"{name} must be in [0, 1) (got {getattr(model_config, name)})")
    parent = None
    if init_from is not None:  # checked before torch is imported: a wrong option fails at once
        from nmt import finetune

        parent, train_config, model_config, tok_config = finetune.configs(train_config, model_config, tok_config, out)
    from nmt.train import train as run_training

    test_corpus = None
    if test is not None:
        from nmt.corpus import ParallelCorpus
        from nmt.validate import check_test

        test_corpus = ParallelCorpus.from_prefix(test, train_config.src, train_config.tgt)
        check_test(test_corpus)  # a bad test set fails now, not after the training
    run_training(train_config, model_config, tok_config, out, test_corpus, force=force, parent=parent)


def _resumed_preset(out: Path) -> str | None:
    """The preset (tiny, small, base, big, or auto for the recipe) recorded by the run in `out` that
    has checkpoints to resume from, else None: a resume with no --preset keeps the run's, whether a
    budget was added (which alone makes the default --preset auto) or left out (the default small)."""
    from nmt import checkpoint
    from nmt.config import PRESETS

    if not checkpoint.list_checkpoints(out):
        return None
    try:
        preset = checkpoint.config_section(checkpoint.read_config(out), "train").get("preset")
    except NmtError:
        return None  # not a run's config: the run itself says so
    return preset if isinstance(preset, str) and (preset in PRESETS or preset == "auto") else None


def _survive_closed_stderr() -> None:
    """`nmt train 2>&1 | tee log`: when tee goes away the run goes on and still saves its checkpoints.
    SIGPIPE is ignored (a write then fails with EPIPE instead of killing the process) and logging
    drops a record it cannot write instead of printing a "Logging error" traceback."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    logging.raiseExceptions = False


def _batch_tokens(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--batch-tokens must be a number of tokens or 'auto' (got {value!r})") from None


def _check_train_values(c) -> None:
    if c.batch_tokens != "auto" and (not isinstance(c.batch_tokens, int) or c.batch_tokens < 1):
        raise UsageError(f"--batch-tokens must be ≥ 1 or 'auto' (got {c.batch_tokens!r})")
    for name in ("update_freq", "eval_every", "log_every"):
        if getattr(c, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be ≥ 1 (got {getattr(c, name)})")
    for name in ("max_steps", "max_epochs", "max_time"):
        if getattr(c, name) is not None and getattr(c, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(c, name)})")
    if c.keep_last < 1:
        raise UsageError(f"--keep-last must be ≥ 1 (got {c.keep_last})")
    for name in ("patience", "average_last"):
        if getattr(c, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be ≥ 0, 0 for off (got {getattr(c, name)})")
    if c.lr_schedule in ("cosine", "linear") and not (c.max_steps or c.max_time or c.max_epochs):
        raise UsageError(f"--lr-schedule {c.lr_schedule} decays to 0 at the end of the budget: "
                         f"give --max-steps, --max-time or --max-epochs")
    if not (isinstance(c.lr, (int, float)) and math.isfinite(c.lr) and c.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0 (got {c.lr})")
    if c.warmup_steps < 0:
        raise UsageError(f"--warmup must be ≥ 0 (got {c.warmup_steps})")
    if not 0 <= c.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1) (got {c.label_smoothing})")
    check_seed(c.seed)
    # options without a flag, from a --config file's train section: typed there, ranged here
    if not all(0 <= b < 1 for b in c.betas):
        raise UsageError(f"--config train.betas must be two numbers in [0, 1) (got {list(c.betas)})")
    for name, zero in (("weight_decay", ""), ("clip_norm", ", 0 for off"),
                       ("eval_max_sentences", ", 0 for the whole dev set")):
        if getattr(c, name) < 0:
            raise UsageError(f"--config train.{name} must be ≥ 0{zero} (got {getattr(c, name)})")
    _choice(c.device if not c.device.startswith("cuda:") else "cuda", "--device", ("auto", "cpu", "cuda"))


# ---------------------------------------------------------------------------------------------
# translate
# ---------------------------------------------------------------------------------------------


ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Model directory written by `nmt train`, or a CTranslate2 export.")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Output file ('-' = stdout). [default: stdout]")]
LengthPenaltyOpt = Annotated[float, typer.Option(help="Length penalty α (0: none).")]
LengthNormOpt = Annotated[str, typer.Option(help=f"{' or '.join(choices(DecodeConfig, 'length_norm'))}: gnmt ((5+|Y|)/6)^α, average |Y|^α.")]
BatchTokensOpt = Annotated[int, typer.Option(help="Tokens per batch (sentences × longest).")]
WindowOpt = Annotated[int, typer.Option(help="Lines read ahead and sorted by length.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or int8 (CPU dynamic quantisation; a CTranslate2 export: its compute type).")]
ThreadsOpt = Annotated[int, typer.Option(help="CPU threads (0: all cores).")]
TgtLangOpt = Annotated[Optional[str], typer.Option("--tgt-lang", help="Output language of a model trained on several directions (its <2xx> tag); required there.")]


@app.command()
def translate(
    model: ModelOpt,
    input: Annotated[str, typer.Option("--input", "-i", help="Input file ('-' = stdin).")] = "-",
    output: OutputOpt = None,
    beam_size: Annotated[int, typer.Option(help="Beam size (1 = greedy).")] = DecodeConfig.beam_size,
    nbest: Annotated[int, typer.Option(help="Hypotheses per line in --format jsonl.")] = DecodeConfig.nbest,
    length_penalty: LengthPenaltyOpt = DecodeConfig.length_penalty,
    length_norm: LengthNormOpt = DecodeConfig.length_norm,
    min_length: Annotated[int, typer.Option(help="Minimum output tokens before EOS.")] = DecodeConfig.min_length,
    max_length_a: Annotated[float, typer.Option(help="Output cap: a·source length + b.")] = DecodeConfig.max_length_a,
    max_length_b: Annotated[int, typer.Option(help="Output cap: a·source length + b.")] = DecodeConfig.max_length_b,
    batch_tokens: BatchTokensOpt = DecodeConfig.batch_tokens,
    window: WindowOpt = DecodeConfig.window,
    sampling_topk: Annotated[int, typer.Option(help="Sample from the k most probable tokens (0: off).")] = DecodeConfig.sampling_topk,
    sampling_topp: Annotated[float, typer.Option(help="Nucleus sampling threshold (0: off).")] = DecodeConfig.sampling_topp,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = DecodeConfig.temperature,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = DecodeConfig.seed,
    prefix: Annotated[Optional[str], typer.Option("--prefix", metavar="FILE", help="Forced start of each translation: one line per input line (an empty line: none).")] = None,
    alignment: Annotated[bool, typer.Option("--alignment", help="Word alignments (Pharaoh i-j, source-target, 0-based): text prints `translation ||| 0-0 1-2`, jsonl adds `alignment`.")] = DecodeConfig.alignment,
    guard: Annotated[bool, typer.Option("--guard/--no-guard", help="Decode lines that loop, blow up in length or hit the length cap again with a 3-gram ban.")] = DecodeConfig.guard,
    no_repeat_ngram: Annotated[int, typer.Option(help="Never repeat an n-gram of this many target tokens, on every line (0: off).")] = DecodeConfig.no_repeat_ngram,
    split_sentences: Annotated[bool, typer.Option("--split-sentences", help="Translate each line sentence by sentence (sentencex, the model's source language) and join the translations with a space.")] = DecodeConfig.split_sentences,
    format: Annotated[str, typer.Option("--format", help="text (1-best per line) or jsonl (n-best, scores, flags).")] = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = 0,
    tgt_lang: TgtLangOpt = None,
) -> None:
    """Translate lines from a file or stdin to stdout: one output line per input line.

    -m takes a model directory from `nmt train` or a CTranslate2 export from `nmt export`
    (recognised from the directory): the same options, line contract and JSON lines."""
    from nmt import api
    from nmt import config as cfg

    _choice(format, "--format", ("text", "jsonl"))
    decode = cfg.from_options(DecodeConfig, locals())  # the options named like DecodeConfig's fields
    cfg.check_decode(decode)  # bad options fail before a model is loaded
    if prefix == "-" and input == "-":
        raise UsageError("--prefix and --input cannot both be stdin")
    from nmt.textio import json_line, read_lines
    from nmt.translate import to_json, to_text

    _check_inputs(input, *([prefix] if prefix else []))
    translator = api.load(model, device=device, dtype=dtype, threads=threads).translator(tgt_lang, **dataclasses.asdict(decode))
    lines = read_lines(input)
    prefixes = read_lines(prefix) if prefix else None
    from nmt.textio import display_name

    names = (display_name(input), display_name(prefix)) if prefix else ("input", "prefix")
    _write_windows(translator.translate_windows(lines, prefixes, names),
                   lambda t: json_line(to_json(t)) if format == "jsonl" else to_text(t, alignment),
                   output, (input, *([prefix] if prefix else [])))
    log.info(translator.stats.summary())


def _check_inputs(*paths: str) -> None:
    """A missing input fails before an existing output is truncated."""
    from nmt.textio import open_binary

    for path in paths:
        if path != "-":
            open_binary(path).close()


def _not_stdout(path: Path | None, option: str, what: str) -> None:
    """'-' is stdin or stdout for nmt's data files: an option that names files or a directory to
    write refuses it rather than make one called '-'."""
    if path is not None and str(path) == "-":
        raise UsageError(f"{option} -: {what} cannot go to stdout; give a path")


def _write_windows(windows, render, output: Optional[str], inputs: tuple[str, ...] = ()) -> None:
    """One line per record (`render(record)`), flushed window by window, to stdout (no output,
    or '-') or to `output`: a regular file (or a symlink to one: its target) is written atomically
    (`atomic.write_file`: a failed run keeps the previous file, its permission bits are kept), a
    device or a pipe directly."""
    path = _output_path(output, inputs)

    def write_to(sink) -> None:
        for window in windows:
            for record in window:
                sink.write(render(record) + "\n")
            sink.flush()  # each window reaches the reader as soon as it is done

    if path is None:
        sink, name = sys.stdout, "<stdout>"
    elif path.exists() and not path.is_file():  # /dev/stdout, a FIFO, a character device
        try:
            sink, name = open(path, "w", encoding="utf-8"), str(path)
        except OSError as e:
            raise NmtError(f"{path}: cannot write ({e.strerror or e})") from None
    else:
        from nmt import atomic

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                write_to(f)

        atomic.write_file(path, write, parents=False, follow_link=True)
        return
    try:
        write_to(sink)
        if path is not None:
            sink.close()
    except BrokenPipeError:
        raise
    except OSError as e:  # a full disk under stdout or a device
        raise NmtError(f"{name}: write failed ({e.strerror or e})") from None
    finally:
        if path is not None:
            with contextlib.suppress(OSError):  # the write error, if any, is already reported
                sink.close()


def _output_path(output: Optional[str], inputs: tuple[str, ...]) -> Path | None:
    """The file a command writes its data to, None for stdout (no --output, or '-' as for the
    inputs). An output that is an input (the same file by any path, symlink or hard link) is refused."""
    if output is None or output == "-":
        return None
    from nmt.textio import same_file

    path = Path(output)
    for source in inputs:
        if path.exists() and same_file(source, path):
            raise UsageError(f"{output}: the output file is the input file; write the results elsewhere")
    return path


# ---------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------


@app.command()
def score(
    model: ModelOpt,
    src: Annotated[str, typer.Option("--src", help="Source sentences, one per line (-: stdin).")],
    tgt: Annotated[str, typer.Option("--tgt", help="Target sentences to score, one per line, in step with --src (-: stdin).")],
    output: OutputOpt = None,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="Divide by the length penalty, as beam search does for the score it reports (--no-normalize: the summed log-probability).")] = True,
    length_penalty: LengthPenaltyOpt = DecodeConfig.length_penalty,
    length_norm: LengthNormOpt = DecodeConfig.length_norm,
    batch_tokens: BatchTokensOpt = DecodeConfig.batch_tokens,
    window: WindowOpt = DecodeConfig.window,
    format: Annotated[str, typer.Option("--format", help="text (one score per line) or jsonl (scores, per-token log-probabilities, flags).")] = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = 0,
    tgt_lang: TgtLangOpt = None,
) -> None:
    """Score given translations: log p(target | source) of each pair by teacher forcing, EOS
    included, one line per pair. A pair of two empty lines gives an empty line; one empty side
    is an error."""
    from nmt import api
    from nmt import config as cfg
    from nmt.corpus import ParallelCorpus
    from nmt.textio import display_name, in_step, json_line, read_lines, refuse_terminal_stdin
    from nmt.translate import score_json, score_text

    _choice(format, "--format", ("text", "jsonl"))
    decode = cfg.from_options(DecodeConfig, locals())
    cfg.check_decode(decode)
    if src == "-" and tgt == "-":
        raise UsageError("--src and --tgt cannot both be stdin")
    refuse_terminal_stdin("--src", [src])
    refuse_terminal_stdin("--tgt", [tgt])
    _check_inputs(src, tgt)  # a missing file fails before the model loads or an output is truncated
    translator = api.load(model, device=device, dtype=dtype, threads=threads).translator(tgt_lang, **dataclasses.asdict(decode))
    names = (display_name(src), display_name(tgt))
    # two files: a count mismatch names both counts; stdin (`nmt translate … | nmt score --tgt -`) is read once
    pairs = in_step(read_lines(src), read_lines(tgt), names) if "-" in (src, tgt) else \
        ParallelCorpus(Path(src), Path(tgt)).pairs()
    _write_windows(translator.score_windows(pairs, normalize, names),
                   lambda s: json_line(score_json(s)) if format == "jsonl" else score_text(s), output, (src, tgt))
    st = translator.stats
    log.info("scored %s pairs (%s empty, %s truncated) in %.1f s", f"{st.lines:,}", f"{st.empty:,}",
             f"{st.truncated:,}", st.seconds)


# ---------------------------------------------------------------------------------------------
# average, info
# ---------------------------------------------------------------------------------------------


@app.command()
def average(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory written by `nmt train`.")],
    last: Annotated[int, typer.Option(help="Average this many newest checkpoints.")] = 3,
    dev: Annotated[Optional[str], typer.Option(help="Dev prefix to compare on. [default: the run's]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Average the last checkpoints; keep the average only if its dev BLEU is higher."""
    from nmt import runtime
    from nmt.average import average as run_average

    if last < 2:
        raise UsageError(f"--last must be ≥ 2 (got {last})")
    record = run_average(model, last, runtime.setup(device, "auto", 0), dev)
    typer.echo(f"kept the {record['kept']} model: dev BLEU averaged {record['scores']['averaged']['dev_bleu']:.2f}, "
               f"current {record['scores']['current']['dev_bleu']:.2f}")


@app.command()
def info(
    model: Annotated[Path, typer.Argument(help="Model directory written by `nmt train`.")],
    format: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
) -> None:
    """What a model directory holds: architecture, size, data, training and dev scores."""
    import json

    from nmt.info import describe, render

    _choice(format, "--format", ("text", "json"))
    facts = describe(model)
    if format == "json":
        typer.echo(json.dumps(facts, indent=2, ensure_ascii=False))
    else:
        render(facts)


@app.command()
def export(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory written by `nmt train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="CTranslate2 model directory to write (an existing export is replaced).")],
    format: Annotated[str, typer.Option("--format", help="Export format (ctranslate2).")] = "ctranslate2",
    quantization: Annotated[Optional[str], typer.Option(help="Weights on disk: int8, int8_float32, int16, float16, bfloat16, float32. [default: float32]")] = None,
) -> None:
    """Export a model to CTranslate2 (needs `pip install 'nmt[ctranslate2]'`)."""
    from nmt.export import export_ctranslate2

    _choice(format, "--format", ("ctranslate2",))
    _not_stdout(out, "--out", "an export is a directory and")
    log.info("exported to %s", export_ctranslate2(model, out, quantization))


# ---------------------------------------------------------------------------------------------
# attention, plot
# ---------------------------------------------------------------------------------------------


@app.command()
def attention(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory written by `nmt train`.")],
    sentence: Annotated[Optional[str], typer.Argument(help="Source sentence (or use -i/-n).")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="Take the sentence from this file…")] = None,
    line: Annotated[Optional[int], typer.Option("--line", "-n", help="…at this line (1-based). [default: 1]")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write OUT-encoder/-decoder/-cross.png (else a terminal heatmap).")] = None,
    beam_size: Annotated[int, typer.Option(help="Beam size for the translation.")] = 1,
    tgt_lang: TgtLangOpt = None,
) -> None:
    """Translate one sentence and show its attention: every layer and head, or a terminal heatmap
    (computed on the CPU in float32, as the maps are drawn)."""
    from nmt import checkpoint, directions, runtime
    from nmt import config as cfg
    from nmt.attention_maps import maps_for_sentence
    from nmt.plots import attention_png, attention_terminal
    from nmt.translate import Translator

    _not_stdout(out, "--out", "the maps are three PNG files and")
    cfg.check_decode(DecodeConfig(beam_size=beam_size))  # as translate: bad options fail before a model is loaded
    if (sentence is None) == (input is None):
        raise UsageError("give a sentence or --input FILE (with --line N), not both")
    if line is not None and input is None:
        raise UsageError(f"--line {line} picks a line of --input FILE; with the sentence given there is none to pick")
    if line is not None and line < 1:
        raise UsageError(f"--line must be ≥ 1, the lines of --input are counted from 1 (got {line})")
    line = 1 if line is None else line
    if input is not None:
        from nmt.textio import read_lines

        found = next((text for i, text in enumerate(read_lines(input), 1) if i == line), None)
        if found is None:
            raise NmtError(f"{input}: has no line {line}")
        sentence = found
    if not sentence.strip():
        raise UsageError("the sentence is empty")
    rt = runtime.setup("cpu", "float32", 0)
    nmt_model, vocabs, config = checkpoint.load_for_inference(model, rt.device)
    trained = directions.of_model(config, str(model / "config.json"))
    tag = directions.source_prefix(trained, directions.tag_ids(vocabs.src, trained, str(model)), tgt_lang)
    translator = Translator.from_model(nmt_model, vocabs, rt, DecodeConfig(beam_size=beam_size), src_prefix=tag)
    result = next(iter(translator.translate([sentence])))
    if result.truncated:
        log.warning("the sentence is longer than the model's %d positions: its maps show the part translated",
                    nmt_model.config.max_positions)
    typer.echo(result.text)
    maps = maps_for_sentence(nmt_model, vocabs, sentence, result.hypotheses[0].tokens, src_prefix=tag)
    if out is None:
        attention_terminal(maps)
    else:
        for path in attention_png(maps, out):
            log.info("wrote %s", path)


@app.command()
def plot(
    run: Annotated[Path, typer.Argument(help="Run directory written by `nmt train`.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="PNG file. [default: RUN/training.png]")] = None,
) -> None:
    """Training curves (train loss, dev loss, dev BLEU against steps and time) to PNG."""
    from nmt.plots import training_curves_png

    _not_stdout(out, "--out", "the curves are a PNG file and")
    log.info("wrote %s", training_curves_png(run, out or run / "training.png"))


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def main() -> None:
    """Run the app; turn user errors into one line and an exit code, and end quietly on a closed pipe."""
    # A closed stdout (`nmt translate … | head -1`) ends the process quietly, like other Unix tools.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    from nmt.textio import flush_stdout, output_error, utf8_stdio

    utf8_stdio()
    if len(sys.argv) == 1:  # `nmt` alone: its help (typer's own no-arguments path ends in an error line)
        sys.argv.append("--help")
    try:
        try:
            # outside standalone mode typer returns an exit code rather than exiting: 130 for a Ctrl-C
            code = app(standalone_mode=False)
        finally:
            flush_stdout()  # a full disk under stdout is an error here, not "Exception ignored" at exit
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and not isinstance(code, bool) and code:
            sys.exit(code)
    except NmtError as e:
        _fail(str(e), 2 if isinstance(e, UsageError) else getattr(e, "exit_code", 1), e)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", None)
        if code is None:
            code = getattr(e, "code", 0)
        sys.exit(code or 0)
    except typer.Abort:
        _fail("aborted", 130, None)
    except KeyboardInterrupt:
        _fail("interrupted", 130, None)
    except BrokenPipeError:
        os._exit(0)
    except OSError as e:  # a write error no module turned into an NmtError: stdout's, or a named file's
        _fail(output_error(e), 1, e)
    except Exception as e:  # click's usage errors (typer may vendor its own click) and real bugs
        if hasattr(e, "exit_code") and hasattr(e, "format_message"):
            _fail(e.format_message().splitlines()[0] if e.format_message() else type(e).__name__, e.exit_code, None)
        if _state["verbose"]:
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (run with --verbose for the traceback)", INTERNAL_ERROR, None)


def _fail(message: str, code: int, exc: BaseException | None) -> None:
    if _state["verbose"] and exc is not None:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    try:
        print(f"nmt: error: {message}", file=sys.stderr)
    except OSError:  # stderr is gone (`nmt train 2>&1 | tee log` and tee ended): the exit code still tells
        pass
    sys.exit(code)
