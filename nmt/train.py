"""The training run, top to bottom: prepare the run directory, then loop
(learning rate → forward/backward over `update_freq` batches → clip → step → log → evaluate and save)
until a budget (steps, time, epochs, patience) or a signal ends it.

Preparation (`prepare`): corpora → tokenizer (trained on a sample, or the one already in the
run directory) → token cache → config.json. Re-running the same command resumes from the
newest checkpoint exactly (step, schedule, optimizer, RNG, position in the data); a change of
training data or model options is refused. Under `torchrun` each rank trains on its own share of
every step's batches (DDP); rank 0 alone writes files and logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from datetime import timedelta
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nmt import atomic, checkpoint, directions, finetune, mixing, recipe, validate
from nmt.batching import Batch, Plan, collate, padded, plan_epoch, target_tokens, training_pad_multiple
from nmt.cache import MEMO_FILE, Filters, load_or_build
from nmt.config import PRESET_TRAINING, ModelConfig, TokenizerConfig, TrainConfig, to_dict, type_problem
from nmt.corpus import ParallelCorpus, fingerprints, sample_corpora, sha256_of
from nmt.directions import Directions
from nmt.errors import Interrupted, NmtError, UsageError
from nmt.model import Transformer, count_parameters
from nmt.progress import StepProgress
from nmt.runtime import RACE_ANSWERS, Runtime, dtype_name, keep_freed_memory, setup, trim_heap
from nmt.textio import count_lines
from nmt.tokenizer import JOINT_FILE, PAD_ID, SEPARATE_FILES, Vocabs, train_vocabs_streamed

log = logging.getLogger(__name__)


# -- preparation ---------------------------------------------------------------------------------


@dataclass
class Prepared:
    out: Path
    vocabs: Vocabs
    cache: mixing.Mixture  # every direction of every corpus, read like one token cache
    model_config: ModelConfig
    dev: ParallelCorpus | None  # the first direction's dev set
    directions: Directions = Directions((("es", "en"),))
    devs: list[mixing.DevSet] = field(default_factory=list)
    parent: finetune.Parent | None = None


def run_directions(config: TrainConfig, parent: finetune.Parent | None = None) -> Directions:
    """The run's directions (--pairs, else --src → --tgt); a fine-tune of a tagged model stays tagged."""
    d = directions.of_run(config.src, config.tgt, config.pairs)
    return Directions(d.pairs, True) if parent is not None and parent.directions.tagged else d


def corpora_of(config: TrainConfig, parent: finetune.Parent | None = None) -> list[ParallelCorpus]:
    """The distinct training corpora (a corpus serving two directions once: the tokenizer's sample)."""
    uses = mixing.corpus_uses(config.train, run_directions(config, parent))
    return mixing.group_corpora(uses)


def check_joint(run: Directions, tok_config: TokenizerConfig) -> None:
    """Several directions share one tokenizer: separate vocabularies are a usage error."""
    if run.multi and not tok_config.joint:
        raise UsageError("--pairs with several directions needs one joint vocabulary (drop --separate-vocab)")


def prepare_tokenizer(config: TrainConfig, tok_config: TokenizerConfig, out: Path,
                      parent: finetune.Parent | None = None, tags: list[str] | None = None) -> Vocabs:
    """The run's tokenizer: the one saved in `out`, else the parent's (a fine-tune), else trained
    on a seeded sample and saved."""
    half, trained = Vocabs.half_saved(out), bool(checkpoint.list_checkpoints(out))
    if half and trained:  # a trained model's tokenizer is not made anew
        raise NmtError(f"{out}: has {half} but not the other side's file, and checkpoints trained with both "
                       f"(restore it, or use a new --out)")
    if trained and not Vocabs.exists(out) and parent is None:
        raise NmtError(f"{out}: has checkpoints but not the tokenizer they were trained with (restore "
                       f"{JOINT_FILE} or {' and '.join(SEPARATE_FILES)}, or use a new --out)")
    asked = _tokenizer_options(config, tok_config, tags)
    if Vocabs.exists(out):
        log.info("tokenizer: reusing %s", out)
        vocabs = Vocabs.load(out)
        if parent is not None and vocabs.fingerprint() != Vocabs.load(parent.directory).fingerprint():
            raise NmtError(f"{out}: holds a tokenizer that is not the one of --init-from {parent.directory} "
                           f"(use a new --out)")
        if parent is None and not trained:  # with checkpoints, check_resumable compares the run's config
            _check_tokenizer_options(out, asked, vocabs, lambda: _training_data(config, out))
        return vocabs
    if parent is not None:
        log.info("tokenizer: the parent's, from %s", parent.directory)
        vocabs = Vocabs.load(parent.directory)
    else:
        vocabs = train_tokenizer(config, tok_config, tags or [])
        record = {**asked, "data": _training_data(config, out), "tokenizer_sha256": vocabs.fingerprint()}
        atomic.write_text(out / TOKENIZER_OPTIONS_FILE, json.dumps(record, indent=1) + "\n")
    vocabs.save(out)
    return vocabs


TOKENIZER_OPTIONS_FILE = "tokenizer.options.json"  # what the tokenizer in a run directory was trained with


def tokenizer_files(out: Path) -> dict[str, str]:
    """The SHA-256 of each tokenizer file in `out`, by name: their bytes as written (not as a
    `tokenizers` version would serialise them again), which a resume must find unchanged."""
    return {name: sha256_of(out / name) for name in (JOINT_FILE, *SEPARATE_FILES) if (out / name).is_file()}


def _tokenizer_options(config: TrainConfig, tok_config: TokenizerConfig, tags: list[str] | None) -> dict[str, Any]:
    """What decides the tokenizer `nmt train` trains: its options, the seed of its sample, the tags."""
    return {**to_dict(tok_config), "seed": config.seed, "tags": list(tags or [])}


def _training_data(config: TrainConfig, out: Path, parent: finetune.Parent | None = None) -> list[str]:
    """The SHA-256 of each training file, sorted (the fingerprint memo spares a second hashing)."""
    return sorted(_data_in_cache_order(config, out, parent))


def _data_in_cache_order(config: TrainConfig, out: Path, parent: finetune.Parent | None = None) -> list[str]:
    """The SHA-256 of each training file in the order config.json's `data` lists them: the token
    caches' (`mixing.cache_groups`), each corpus's source then target file."""
    uses = mixing.corpus_uses(config.train, run_directions(config, parent))
    corpora = [c for group in mixing.cache_groups(uses, config.weights is not None) for c in mixing.group_corpora(group)]
    paths = [p for c in corpora for p in (c.src_path, c.tgt_path)]
    return [fp.sha256 for fp in fingerprints(paths, cache_root(config, out) / MEMO_FILE)]


def cache_root(config: TrainConfig, out: Path) -> Path:
    return Path(config.cache_dir) if config.cache_dir else out / "cache"


def _check_tokenizer_options(out: Path, asked: dict[str, Any], vocabs: Vocabs,
                             data: Callable[[], list[str]]) -> None:
    """A tokenizer that `nmt train` trained in `out`, and no checkpoint yet (a preparation or a run cut
    short, or --force), is reused only with the options and training files (`data`: their SHA-256,
    sorted) it was trained with; one put there by hand (no record, or a record of another tokenizer)
    is reused as it is."""
    try:
        saved = json.loads((out / TOKENIZER_OPTIONS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise NmtError(f"{out / TOKENIZER_OPTIONS_FILE}: cannot be read ({e}); delete it and the tokenizer "
                       f"files to train the tokenizer again") from None
    if not isinstance(saved, dict):
        raise NmtError(f"{out / TOKENIZER_OPTIONS_FILE}: is not a JSON object; delete it and the tokenizer "
                       f"files to train the tokenizer again")
    if saved.get("tokenizer_sha256") != vocabs.fingerprint():  # replaced since (nmt train-tokenizer, by hand)
        return
    differ = [f"{key} {saved[key]!r} (this run: {value!r})" for key, value in asked.items()
              if key in saved and saved[key] != value]  # an option newer than the record: not compared
    if not differ and "data" in saved and saved["data"] != data():
        differ = ["other training data"]
    if differ:
        raise NmtError(f"{out}: its tokenizer was trained with {', '.join(differ)}; use a new --out, or delete "
                       f"the tokenizer files there to train it again")


def train_tokenizer(config: TrainConfig, tok_config: TokenizerConfig, tags: list[str] | None = None) -> Vocabs:
    """Train the tokenizer(s) on a seeded sample of the training data, streamed (`nmt train` and
    `nmt train-tokenizer` alike: the same sample, the same empty-data check); `tags` (target-language
    tags of a multi-direction run) become special tokens."""
    corpora = corpora_of(config)
    log.info("tokenizer: training %s, %d pieces, on up to %s sampled pairs%s", tok_config.kind,
             tok_config.vocab_size, f"{tok_config.sample_lines:,}", f"; tags {' '.join(tags)}" if tags else "")
    return train_vocabs_streamed(lambda: sample_corpora(corpora, tok_config.sample_lines, config.seed), tok_config,
                                 f"training data {corpora[0].src_path}, {corpora[0].tgt_path}", tags or [])


def prepare(config: TrainConfig, model_config: ModelConfig, tok_config: TokenizerConfig, out: Path,
            build_cache: bool = True, parent: finetune.Parent | None = None) -> Prepared:
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_stale_temporaries(out)  # what killed runs left: temporaries, half-pruned checkpoints
    run = run_directions(config, parent)
    uses = mixing.corpus_uses(config.train, run)
    check_joint(run, tok_config)
    for d in mixing.dev_sets(config.dev, run, {}) if config.dev else []:
        validate.check_dev(d.corpus)  # now, before the tokenizer: not at the first evaluation after hours of training
    vocabs = prepare_tokenizer(config, tok_config, out, parent, run.tags)
    tag_ids = directions.tag_ids(vocabs.src, run, str(parent.directory if parent else out))
    devs = mixing.dev_sets(config.dev, run, tag_ids) if config.dev else []
    # a fine-tune keeps the parent's joint_vocab: a parent from before the field shares its embeddings
    model_config = ModelConfig(**{**asdict(model_config), "src_vocab_size": vocabs.src.get_vocab_size(),
                                  "tgt_vocab_size": vocabs.tgt.get_vocab_size(),
                                  "joint_vocab": model_config.joint_vocab if parent is not None else vocabs.joint})
    filters = Filters(config.max_length, config.max_ratio, config.dedupe)
    cache = mixing.mixture(uses, config.weights, tag_ids,
                           lambda corpora: load_or_build(corpora, vocabs, filters, cache_root(config, out))) \
        if build_cache else None
    return Prepared(out, vocabs, cache, model_config, devs[0].corpus if devs else None,  # type: ignore[arg-type]
                    run, devs, parent)


def check_max_length(config: TrainConfig, model_config: ModelConfig, tagged: bool = False) -> None:
    """--max-length must fit the model's positions (batches are padded to a multiple of PAD_MULTIPLE;
    a target-language tag is one more source token)."""
    if config.max_length < 2:
        raise UsageError(f"--max-length must be ≥ 2 tokens (got {config.max_length})")
    if padded(config.max_length + tagged) > model_config.max_positions:
        raise UsageError(f"--max-length {config.max_length} exceeds the model's max_positions "
                         f"{model_config.max_positions} (lower --max-length, or raise model.max_positions "
                         f"with --config)")


# What a run makes after its configuration: a --force that replaces an nmt run without checkpoints
# deletes them with the old configuration, so that the directory never pairs new options with old
# weights or records. (Nothing else is deleted: a folder that is not a run keeps its files.)
RUN_PRODUCTS = (checkpoint.WEIGHTS, "training.json", "averaging.json", "test.hyp", "metrics.jsonl")

PREPARATION_FILES = {"tokenizer.json", "tokenizer.src.json", "tokenizer.tgt.json", TOKENIZER_OPTIONS_FILE, "cache",
                     "recipe.json", checkpoint.RUN_LOCK}


def check_out_dir(out: Path, force: bool) -> bool:
    """Train only into a new or empty directory, or an nmt run (config.json of nmt's format; its
    configuration is compared later, by `check_resumable`), or one holding only what a preparation
    cut short leaves (tokenizer, cache, recipe, temporaries); anything else needs --force, and so
    does a finished model (its weights and training.json) whose checkpoints are gone: it cannot
    be resumed, only replaced.
    Returns whether `out` holds an nmt run's config."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise NmtError(f"{out}: exists and is not a directory (use a new --out)")
    if (out / "config.json").exists():
        try:
            checkpoint.read_config(out)
        except NmtError:
            if force:
                return False
            raise NmtError(f"{out}: has a config.json that is not an nmt run's (use a new --out, or --force "
                           f"to train into it anyway)") from None
        else:
            finished = (out / checkpoint.WEIGHTS).exists() and (out / "training.json").exists()
            if finished and not force and not checkpoint.list_checkpoints(out):
                raise NmtError(f"{out}: holds a trained model but no checkpoints to resume its training from: "
                               f"training again from step 0 would replace it (use a new --out, or --force to train "
                               f"a new model there)")
            return True
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in PREPARATION_FILES and not checkpoint.TEMPORARY.match(p.name))
    if others and not force:
        shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
        raise NmtError(f"{out}: directory is not empty and not an nmt run (it holds {shown}); use a new --out, "
                       f"or --force to train into it anyway")
    return False


def run_config(p: Prepared, config: TrainConfig, tok_config: TokenizerConfig, processes: int = 1) -> dict[str, Any]:
    import sacrebleu
    import tokenizers

    metas = [json.loads((c.directory / "meta.json").read_text()) for c in p.cache.caches]
    first = p.directions.pairs[0]
    described = {
        "src": first[0], "tgt": first[1], **_directions_record(p.directions), "processes": processes,
        "model": to_dict(p.model_config), "tokenizer": to_dict(tok_config), "train": to_dict(config),
        "data": [fp for m in metas for fp in m["fingerprints"]], "filters": asdict(p.cache.report),
        "tokenizer_files": tokenizer_files(p.out),  # what a resume must find there (its ids are the model's)
        "versions": {"nmt": __import__("nmt").__version__, "torch": torch.__version__,
                     "tokenizers": tokenizers.__version__, "sacrebleu": sacrebleu.__version__},
    }
    if p.parent is not None:
        described["parent"] = finetune.lineage(p.parent, p.vocabs.fingerprint())
    return described


# Training options that decide which pairs an epoch holds and in what order: a resume continues
# the epoch at its batch index, so it needs the same plan. (Not --batch-tokens: after an
# out-of-memory a resume may lower it; that epoch is then cut anew and goes on from the same batch index.)
PLAN_OPTIONS = ("seed", "weights", "max_length", "max_ratio", "dedupe", "curriculum")
PLAN_NAME = "options that set the data order"


def check_resumable(out: Path, new: dict[str, Any], has_checkpoints: bool = True) -> None:
    """Refuse to resume when the data, the directions, or the model, tokenizer or data-plan
    options changed (say what changed); without checkpoints, refuse to replace the model of
    another configuration (--force does)."""
    what, fix = ("cannot resume", "use a new --out") if has_checkpoints else \
        ("holds an nmt run of another configuration", "use a new --out, or --force to replace it")
    old = checkpoint.read_config(out)
    for section, keys, name in (("model", None, "model options"), ("tokenizer", None, "tokenizer options"),
                                ("train", PLAN_OPTIONS, PLAN_NAME)):
        before, now = old.get(section) or {}, new.get(section) or {}
        if section == "model":  # a field newer than the run's config.json: the default its loading gives
            before = {**to_dict(ModelConfig()), **before}
        if problem := _options_changed(name, before, now, keys):
            raise NmtError(f"{out}: {what}, {problem}; {fix}")
    if problem := _directions_changed(old, new):
        raise NmtError(f"{out}: {what}, {problem}; {fix}")
    old_data = [d["sha256"] for d in old["data"]]  # the bytes, wherever they are now (data moved: same run)
    new_data = [d["sha256"] for d in new["data"]]
    if old_data != new_data and sorted(old_data) == sorted(new_data) and has_checkpoints:
        raise NmtError(f"{out}: {what}, {_order_changed(checkpoint.config_section(old, 'train').get('train'))}")
    if old_data != new_data:
        which = [d["path"] for sha, d in zip(old_data, new["data"]) if sha != d["sha256"]]
        raise NmtError(f"{out}: {what}, training data changed "
                       f"({', '.join(which or [d['path'] for d in new['data']])}); {fix}")
    now = new.get("processes", 1)
    was = _processes(out, old) if has_checkpoints else now  # (no checkpoint, no place in an epoch to keep)
    if not isinstance(was, int):
        log.warning("%s: cannot tell how many processes trained it: resuming with %d", out, now)
    elif was != now:  # each rank's place in the epoch is an index into its own share of the batches
        raise NmtError(f"{out}: {what}, it was trained by {was} process{'es' * (was > 1)} and this command runs "
                       f"{now}: run it with {was} (torchrun --nproc-per-node {was}) or use a new --out")
    old_parent, new_parent = (c.get("parent", {}).get("weights_sha256") for c in (old, new))
    if old_parent != new_parent:
        was = f"fine-tuned from {old['parent'].get('directory')}" if old_parent else "trained from scratch"
        now = f"--init-from {new['parent']['directory']}" if new_parent else "no --init-from"
        raise NmtError(f"{out}: {what}, it was {was} and the command now gives {now}"
                       f"{' (whose weights changed)' if old_parent and new_parent else ''}; {fix}")


def _options_changed(name: str, before: dict[str, Any], now: dict[str, Any], keys=None) -> str | None:
    """'NAME changed (k: old → new, …)' for the options (`keys`, else all) the record `before` has
    and `now` gives otherwise; None when none does."""
    keys = [k for k in (keys or sorted(set(before) | set(now))) if k in before]
    diffs = ", ".join(f"{k}: {before.get(k)} → {now.get(k)}" for k in keys if before.get(k) != now.get(k))
    return f"{name} changed ({diffs})" if diffs else None


def _directions_record(run: Directions) -> dict[str, Any]:
    return {"directions": [f"{s}-{t}" for s, t in run.pairs], "tagged": bool(run.tagged)}


def _directions_changed(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    if "directions" not in old or (old.get("directions"), old.get("tagged")) == (new["directions"], new["tagged"]):
        return None
    return (f"directions changed ({', '.join(old['directions'])}{' tagged' if old.get('tagged') else ''} → "
            f"{', '.join(new['directions'])}{' tagged' if new['tagged'] else ''})")


def check_resume_before_the_cache(out: Path, config: TrainConfig, parent: finetune.Parent | None) -> None:
    """What `check_resumable` would refuse that is known before the token cache is built: options
    that set the data order, other directions, training files that no longer hold the bytes the run
    trained on. Found now, a refused resume does not first tokenise the data into a cache of its own."""
    old = checkpoint.read_config(out)
    run = run_directions(config, parent)
    for problem in (_options_changed(PLAN_NAME, checkpoint.config_section(old, "train"), to_dict(config), PLAN_OPTIONS),
                    _directions_changed(old, _directions_record(run))):
        if problem:
            raise NmtError(f"{out}: cannot resume, {problem}; use a new --out")
    recorded = old.get("tokenizer_files")  # (a run from before it was recorded: not compared)
    if isinstance(recorded, dict) and recorded and Vocabs.exists(out) and tokenizer_files(out) != recorded:
        raise NmtError(f"{out}: cannot resume, its tokenizer files are not the ones it was trained with (replaced "
                       f"since: restore them, or use a new --out)")
    # the files' bytes in the order the caches hold them, as `check_resumable` compares them after the
    # cache: at the same paths or moved, another order of the same files is another plan
    given = _data_in_cache_order(config, out, parent)
    trained = [d.get("sha256") for d in old.get("data") or [] if isinstance(d, dict)]
    if trained != given and sorted(map(str, trained)) == sorted(given):
        raise NmtError(f"{out}: cannot resume, {_order_changed(checkpoint.config_section(old, 'train').get('train'))}")
    now = set(given)
    gone = [str(d.get("path")) for d in old.get("data") or [] if isinstance(d, dict) and d.get("sha256") not in now]
    if gone:  # a file it trained on is given no more: its record could not match
        raise NmtError(f"{out}: cannot resume, training data changed ({', '.join(gone)}); use a new --out")


def _order_changed(trained: Any) -> str:
    """The message's middle for a resume given the run's --train corpora in another order: each
    epoch's plan is an index into the cache, whose pairs come in the corpora's order."""
    given = " ".join(f"--train {t}" for t in trained) if isinstance(trained, list) else "their first order"
    return f"the order of the --train corpora changed (it was trained with {given}); give them in that order, " \
           f"or use a new --out"


def _processes(out: Path, old: dict[str, Any]) -> int | None:
    """How many processes trained the run: config.json says, or for a run from before it did, the
    summary its last finished command wrote (training.json); None when neither does."""
    if "processes" in old:
        return old["processes"]
    try:
        return json.loads((out / "training.json").read_text()).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None


# -- the training loop ---------------------------------------------------------------------------


@dataclass
class Progress:
    """Everything that says where training is; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    target_tokens: int = 0
    seconds: float = 0.0
    best_bleu: float = -1.0
    best_step: int = 0
    evals_without_gain: int = 0
    history: list[dict] = field(default_factory=list)
    batch_tokens: int = 0  # the budget --batch-tokens auto settled on (kept for an exact resume)


def _read_progress(saved: Path, state: dict[str, Any]) -> Progress:
    """A checkpoint's progress (progress.json, or the state's copy in checkpoints from before it),
    its fields typed and ranged and its step the checkpoint's own: a damaged one is a one-line error,
    not a crash or a run restarted at a step of its own choosing."""
    path = saved / PROGRESS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8") if path.exists() else state["progress"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NmtError(f"{path}: cannot be read ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); "
                       f"{_resume_before(saved)}") from None
    def refused(problem: str) -> NmtError:
        return NmtError(f"{path}: {problem}; {_resume_before(saved)}")

    names = [f.name for f in fields(Progress)]
    if not isinstance(data, dict):
        raise refused("not a JSON object")
    if unknown := sorted(set(data) - set(names)):
        raise refused(f"unknown field(s) {unknown}")
    progress = Progress(**data)
    if problem := type_problem(progress):
        raise refused(problem)
    for name in names:  # (in the fields' order: the first one wrong is named, the same each time)
        if name not in ("history", "best_bleu") and getattr(progress, name) < 0:
            raise refused(f"{name} = {getattr(progress, name)} is negative")
    if not all(isinstance(record, dict) for record in progress.history):
        raise refused("history holds a record that is not an object")
    if saved.name != f"step-{progress.step:08d}":
        raise refused(f"step {progress.step} is not this checkpoint's")
    return progress


def _resume_before(saved: Path) -> str:
    """What to do about a damaged checkpoint: resume from the one before it, where there is one."""
    if len(checkpoint.list_checkpoints(saved.parent.parent)) > 1:
        return f"move {saved.name} out of {saved.parent} to resume from the checkpoint before it"
    return (f"it is the run's only checkpoint, so the run cannot be resumed: train into a new --out (its "
            f"{checkpoint.WEIGHTS}, if any, is the best model so far)")


def inverse_sqrt_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then decay ∝ 1/√step (Vaswani et al. 2017, 5.3)."""
    step = max(step, 1)
    return peak * min(step / max(warmup, 1), math.sqrt(max(warmup, 1) / step))


def cosine_lr(step: int, peak: float, warmup: int, budget_used: float) -> float:
    """Linear warm-up, then half a cosine from `peak` to 0 as the step or time budget runs out
    (budget_used in [0, 1]): with a known budget, ending at a small rate gives a better final model."""
    warm = min(max(step, 1) / max(warmup, 1), 1.0)
    return peak * warm * 0.5 * (1 + math.cos(math.pi * min(max(budget_used, 0.0), 1.0)))


def linear_lr(step: int, peak: float, warmup: int, budget_used: float) -> float:
    """Linear warm-up, then a straight line from `peak` to 0 as the budget runs out (the
    budget-aware schedule Li et al. 2020 found best): it stays high longer than the cosine."""
    warm = min(max(step, 1) / max(warmup, 1), 1.0)
    return peak * warm * (1 - min(max(budget_used, 0.0), 1.0))


def _build_model(c: ModelConfig, runtime: Runtime) -> Transformer:
    """The model on its device; one that does not fit there is a one-line error naming its shape
    (the limits on each option allow models far larger than any machine's memory)."""
    try:
        return Transformer(c).to(runtime.device)
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; the CPU allocator raises a plain one
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        raise NmtError(f"the model (d_model {c.d_model}, d_ff {c.d_ff}, {c.encoder_layers}+{c.decoder_layers} layers, "
                       f"vocabulary {c.src_vocab_size:,}) does not fit in the memory of {runtime.device.type}: choose "
                       f"a smaller one (--preset, or --config model)") from None


class Trainer:
    def __init__(self, p: Prepared, config: TrainConfig, runtime: Runtime, dist: "Distributed"):
        self.p, self.config, self.runtime, self.dist = p, config, runtime, dist
        self._pad_multiple = training_pad_multiple(runtime.device, runtime.dtype)
        if runtime.device.type == "cpu":
            keep_freed_memory()  # the same large temporaries every step: reuse, don't re-fault
        torch.manual_seed(config.seed)
        self.model = _build_model(p.model_config, runtime)
        self.optimizer = _optimizer(self.model, config, runtime)
        if dist.rank > 0:  # the same weights (DDP copies rank 0's), each rank its own dropout masks
            torch.manual_seed(config.seed + dist.rank)
        self.progress = Progress()
        self.stop_reason: str | None = None
        self.train_model = self.model
        if dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.metrics_path = p.out / "metrics.jsonl"

    # resume ----------------------------------------------------------------------------------

    def resume(self) -> bool:
        checkpoints = checkpoint.list_checkpoints(self.p.out)
        if not checkpoints:
            return False
        latest = checkpoints[-1]
        checkpoint.load_weights(self.model, latest / checkpoint.WEIGHTS)
        state = checkpoint.load_state(latest)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise NmtError(f"{latest / 'state.pt'}: its optimizer state does not fit this model ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:120]}); {_resume_before(latest)}") from None
        self.progress = _read_progress(latest, state)
        if not self._last_evaluation_missing():  # saved and scored: an epoch that ends here is not saved again
            self._saved_step = self.progress.step
        rank = self.dist.rank  # each rank's own stream (checkpoints before they were kept: rank 0's for all)
        ranks_cpu, ranks_cuda = state.get("rng_cpu_ranks") or [], state.get("rng_cuda_ranks") or []
        torch.set_rng_state(ranks_cpu[rank] if rank < len(ranks_cpu) else state["rng_cpu"])
        if self.runtime.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(ranks_cuda[rank] if rank < len(ranks_cuda) else state["rng_cuda"],
                                     self.runtime.device)
        self._beat_the_average()
        log.info("resuming from %s (step %d, epoch %d, batch %d)", latest.name, self.progress.step,
                 self.progress.epoch, self.progress.batch_in_epoch)
        return True

    def _beat_the_average(self) -> None:
        """An averaged model kept at the end of the run resumed here (`nmt.average`) scored above the
        best checkpoint: it is the model to beat, or an extended run's next evaluation that beats
        only the best checkpoint would replace a better model.safetensors. The progress's best (score
        and step) stays the best checkpoint's: the bar is apart from it (`_to_beat`)."""
        from nmt.average import kept_model_bleu

        # None: the checkpoints' own best stands
        # (a checkpoint saved by an nmt from before the bar was kept apart holds it as its best_bleu)
        kept = kept_model_bleu(self.p.out, self.config.dev, self.config.eval_max_sentences)
        if kept is not None and kept > self.progress.best_bleu:
            log.info("the model that averaging kept at the end of the last run (dev BLEU %.2f) is the one to beat", kept)
            self._to_beat = kept

    def save(self) -> Path | None:
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.runtime.device) if self.runtime.device.type == "cuda" else None
        ranks = self.dist.gather((cpu, cuda)) if self.dist.world_size > 1 else []  # every rank's stream: an exact resume
        if not self.dist.is_writer:
            return None
        state = {"optimizer": self.optimizer.state_dict(), "progress": json.dumps(asdict(self.progress)),
                 "rng_cpu": cpu}
        if cuda is not None:
            state["rng_cuda"] = cuda
        if ranks:
            state["rng_cpu_ranks"] = [r[0] for r in ranks]
            if cuda is not None:
                state["rng_cuda_ranks"] = [r[1] for r in ranks]
        return checkpoint.save_checkpoint(self.p.out, self.progress.step, self.model, state, self.config.keep_last)

    # loop ------------------------------------------------------------------------------------

    def run(self) -> Progress:
        c = self.config
        start = self._start = time.monotonic() - self.progress.seconds
        total = c.max_steps if c.max_steps else (c.max_time or None)
        self._check_budget()  # a finished run re-run with the same budget trains no further
        # a signal during the catch-up evaluation, as during the loop's: the evaluation ends, then the run
        with _StopOnSignal(self):
            if self._last_evaluation_missing() and (self.stop_reason or self.progress.step % c.eval_every == 0):
                self._finish_evaluation()  # it was killed (or failed) in an evaluation it was due: done now
                self._end_if_the_evaluation_spent_the_budget(start)  # every rank's clock counts it, as in the loop
            budget = self.batch_tokens()
            with StepProgress("train", total, log_every=30.0) as bar:
                self._train(budget, start, bar)
        self.progress.seconds = time.monotonic() - start
        return self.progress

    def _train(self, budget: int, start: float, bar: StepProgress) -> None:
        """Epoch after epoch until a budget, the patience or a signal ends the run."""
        c = self.config
        while self.stop_reason is None:
            batches = self.p.cache.plan(budget, c.seed, self.progress.epoch, self.dist.rank, self.dist.world_size,
                                        c.curriculum)
            if not batches:
                self._no_batches(budget)
            if len(batches) < c.update_freq:  # no step would ever be made: refuse, don't spin
                raise UsageError(f"--update-freq {c.update_freq} exceeds the {len(batches)} batches of an "
                                 f"epoch{' on each rank' if self.dist.world_size > 1 else ''} at "
                                 f"--batch-tokens {budget} (lower --update-freq or --batch-tokens)")
            left_out = len(batches) % c.update_freq
            if left_out and self.dist.is_writer and not self._left_out_said:
                log.info("--update-freq %d: each epoch's last %d of its %d batches%s are left out (others each "
                         "epoch, as the order is drawn anew)", c.update_freq, left_out, len(batches),
                         " on each rank" if self.dist.world_size > 1 else "")
                self._left_out_said = True
            self._epoch_batches = len(batches)  # the epoch share of the budget (`budget_used`)
            trim_heap()  # the plan's temporaries: memory stays flat as the corpus grows
            self.p.cache.drop_pages()  # and so do the pages of the lengths it read
            self._epoch(batches, start, bar)

    def batch_tokens(self) -> int:
        """The token budget per batch: --batch-tokens, or with `auto` the largest that fits in GPU
        memory (probed once, then kept with the checkpoints; on CPU the preset's default, or with
        `--preset auto` the recipe's batch)."""
        c, pr = self.config, self.progress
        if c.batch_tokens != "auto":
            return int(c.batch_tokens)
        if not pr.batch_tokens:
            if self.runtime.device.type == "cuda":
                from nmt import autobatch

                cache = self.p.cache
                longest = padded(int(max(cache.src_len.max(), cache.tgt_len.max())) + 1)  # EOS included
                # the bare model, not the DDP wrapper: ranks probe independently, with no collectives
                found = autobatch.probe(lambda b: self._forward_backward(b, b.n_tgt_tokens, True, self.model), self.model,
                                        longest, (self.p.model_config.src_vocab_size, self.p.model_config.tgt_vocab_size),
                                        self.runtime.device)
                pr.batch_tokens = self.dist.min_int(found)  # every rank plans with the same budget
            elif c.preset == "auto":  # the batch the recipe measured and planned with
                pr.batch_tokens = recipe.batch_tokens_for("cpu")
            else:
                preset = c.preset if c.preset in PRESET_TRAINING else "small"
                pr.batch_tokens = PRESET_TRAINING[preset]["batch_tokens"]
                log.info("--batch-tokens auto sizes batches to GPU memory; on CPU the %s preset's %d is used",
                         preset, pr.batch_tokens)
        return pr.batch_tokens

    def _epoch(self, batches: Plan, start: float, bar: StepProgress) -> None:
        c, pr = self.config, self.progress
        window_tokens, window_start = 0, time.monotonic()
        while pr.batch_in_epoch + c.update_freq <= len(batches) and self.stop_reason is None:
            group = batches[pr.batch_in_epoch : pr.batch_in_epoch + c.update_freq]
            loss, n_tokens = self.train_step(group)
            pr.batch_in_epoch += c.update_freq
            pr.step += 1
            pr.target_tokens += n_tokens
            window_tokens += n_tokens
            pr.seconds = time.monotonic() - start
            if pr.step % c.log_every == 0:
                rate = window_tokens / max(time.monotonic() - window_start, 1e-9)
                self._log({"event": "train", "step": pr.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                           "target_tokens_per_s": rate, "seconds": pr.seconds, "epoch": pr.epoch})
                window_tokens, window_start = 0, time.monotonic()
                best = f" dev BLEU {pr.best_bleu:.1f}" if pr.best_bleu >= 0 else ""  # (none evaluated yet)
                bar.update(self._done(), f"step {pr.step} loss {loss:.3f} {rate:,.0f} tok/s{best}")
            self._check_budget()
            if pr.step % c.eval_every == 0 or self.stop_reason is not None:
                self.evaluate_and_save()
                window_tokens, window_start = 0, time.monotonic()  # the next rate is of training alone
                self._end_if_the_evaluation_spent_the_budget(start)
        if self.stop_reason is None:
            pr.epoch += 1
            pr.batch_in_epoch = 0
            if done := self._epochs_done():
                self.stop_reason = done
                if self._saved_step != pr.step:  # not when the epoch's last step was just evaluated
                    self.evaluate_and_save()

    def _end_if_the_evaluation_spent_the_budget(self, start: float) -> None:
        """A save and evaluation that spent the time budget's last seconds, or in which a signal
        came, end the run at the step they saved and scored, not one step later with a second save
        and evaluation. The checkpoint is told the time now, so that a resume with the same budget
        trains no further. (Every rank calls this at the same point: the check is collective.)"""
        if self.stop_reason is not None:
            return
        if self.config.max_time:
            self.progress.seconds = time.monotonic() - start
        self._check_budget()
        if self.stop_reason is not None and self._saved_dir is not None:
            self._write_progress(self._saved_dir)

    def _no_batches(self, budget: int) -> None:
        """Why an epoch holds no batch for this process: none fits the budget, or there are fewer
        batches than processes (each takes an equal share, so the few are dropped)."""
        c, ranks = self.config, self.dist.world_size
        whole = len(self.p.cache.plan(budget, c.seed, self.progress.epoch, 0, 1, c.curriculum)) if ranks > 1 else 0
        if whole:
            raise NmtError(f"an epoch has {whole} batch{'es' * (whole > 1)} of --batch-tokens {budget}, fewer than the "
                           f"{ranks} processes (each needs its own): lower --batch-tokens or run fewer processes")
        raise NmtError("no batch fits the token budget (raise --batch-tokens)")

    def _done(self) -> float:
        c, pr = self.config, self.progress
        return pr.step if c.max_steps else pr.seconds

    def train_step(self, group: list[np.ndarray]) -> tuple[float, int]:
        """One optimizer step over the batches of `group` (pair indices): (mean loss, target tokens)."""
        c = self.config
        lr = self.learning_rate(self.progress.step + 1)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        n_tokens = self.dist.sum_int(sum(target_tokens(self.p.cache, idx) for idx in group))
        self.train_model.train()
        try:
            total_loss = self._accumulate(group, n_tokens)
        except torch.OutOfMemoryError:
            if self.dist.world_size > 1:
                # the other ranks are inside this step's gradient all-reduce: a retry here would pair
                # its collectives with theirs wrongly (a hang, or gradients summed across steps)
                raise NmtError(f"out of memory at step {self.progress.step + 1} on rank {self.dist.rank} "
                               f"(batches of {n_tokens:,} target tokens over {self.dist.world_size} ranks): "
                               f"lower --batch-tokens") from None
            # A rare batch too large for the device: drop its partial gradients, retry in halves.
            self.optimizer.zero_grad(set_to_none=True)
            if self.runtime.device.type == "cuda":
                torch.cuda.empty_cache()
            halves = [h for idx in group for h in np.array_split(idx, 2) if len(h)]
            log.warning("out of memory at step %d: retrying as %d smaller batches", self.progress.step + 1, len(halves))
            total_loss = self._accumulate(halves, n_tokens)
        loss = self.dist.sum_float(total_loss) / n_tokens
        if c.clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if not (math.isfinite(loss) and bool(torch.isfinite(norm))):  # every rank alike: the gradients are all-reduced
            self.optimizer.zero_grad(set_to_none=True)
            raise NmtError(self._diverged(loss, float(norm), lr))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, n_tokens

    def _diverged(self, loss: float, norm: float, lr: float) -> str:
        """The one-line error of a step whose loss or gradient is not a finite number: the step is not
        taken, so the weights and checkpoints stay as they were (none is saved with NaNs in it)."""
        saved = checkpoint.list_checkpoints(self.p.out)
        kept = f"its last checkpoint, {saved[-1].name}, is kept" if saved else "no checkpoint was saved"
        return (f"training diverged at step {self.progress.step + 1}: the loss is {loss:.4g} and the gradient norm "
                f"{norm:.4g} (learning rate {lr:.3g}); {kept}: run the same command again with a lower --lr "
                f"(now {self.config.lr:g}) or a longer --warmup (now {self.config.warmup_steps})")

    def learning_rate(self, step: int) -> float:
        c = self.config
        budgeted = c.max_steps or c.max_time or c.max_epochs
        if c.lr_schedule == "cosine" and budgeted:
            return cosine_lr(step, c.lr, c.warmup_steps, self.budget_used(step))
        if c.lr_schedule == "linear" and budgeted:
            return linear_lr(step, c.lr, c.warmup_steps, self.budget_used(step))
        return inverse_sqrt_lr(step, c.lr, c.warmup_steps)

    def budget_used(self, step: int) -> float:
        """The share of the budget spent before optimizer step `step`: the largest of the step, time
        and epoch shares (whichever ends the run first; time makes the schedule wall-clock based).
        Step 1 starts at 0 and the last step of `--max-steps N` at (N-1)/N, so it still learns."""
        c, pr = self.config, self.progress
        shares = [(step - 1) / c.max_steps] if c.max_steps else []
        if c.max_time:
            shares.append(pr.seconds / c.max_time)
        if c.max_epochs and self._epoch_batches:
            shares.append((pr.epoch + pr.batch_in_epoch / self._epoch_batches) / c.max_epochs)
        return max(shares, default=0.0)

    def _accumulate(self, group: list[np.ndarray], n_tokens: int) -> float:
        """Forward and backward over each batch; gradients add up to d(Σ loss / Σ tokens)."""
        pin = self.runtime.device.type == "cuda"
        total_loss = 0.0
        for i, idx in enumerate(group):
            batch = collate(self.p.cache, idx, pin, self._pad_multiple).to(self.runtime.device)
            total_loss += self._forward_backward(batch, n_tokens, sync=i == len(group) - 1)
        return total_loss

    def _forward_backward(self, batch: Batch, n_tokens: int, sync: bool, model=None) -> float:
        """Add this batch's gradients of Σ loss / n_tokens; return its summed loss."""
        model = model if model is not None else self.train_model
        with _no_sync(model, sync), self.runtime.autocast(), self.runtime.kernels():
            keep = batch.tgt_out != PAD_ID
            loss_sum = model(batch.src, batch.tgt_in, keep, batch.tgt_out[keep], self.config.label_smoothing)
        # DDP averages gradients over ranks, so scale by world size: the result is Σ loss / Σ tokens.
        (loss_sum * self.dist.world_size / n_tokens).backward()
        return loss_sum.item()

    def _check_budget(self) -> None:
        c, pr = self.config, self.progress
        # one clock for all ranks (the slowest's): the time budget's learning rate and stop agree
        pr.seconds = self.dist.max_float(pr.seconds)
        reason = None
        if c.max_steps and pr.step >= c.max_steps:  # (a run resumed with fewer steps than it has: at its own)
            reason = f"{c.max_steps} steps done" if pr.step == c.max_steps else \
                f"already at step {pr.step}, past --max-steps {c.max_steps}"
        elif c.max_time and pr.seconds >= c.max_time:
            reason = f"time budget of {c.max_time:.0f} s used"
        else:  # epochs and patience as the loop ends them: a finished run re-run stays finished
            reason = self._epochs_done() or self._patience_spent() or (f"stopped by {self._signal}" if self._signal else None)
        # every rank must stop at the same step: rank 0's decision (or any rank's signal) wins
        if self.dist.any_flag(reason is not None) and self.stop_reason is None:
            self.stop_reason = reason or "stopped by another rank"

    def _epochs_done(self) -> str | None:
        """The stop reason once --max-epochs passes over the data are done, else None."""
        c = self.config
        return f"{c.max_epochs} epochs done" if c.max_epochs and self.progress.epoch >= c.max_epochs else None

    def _patience_spent(self) -> str | None:
        """The stop reason once --patience evaluations in a row gained no dev BLEU, else None."""
        c = self.config
        return (f"no dev BLEU gain in {c.patience} evaluations"
                if c.patience and self.progress.evals_without_gain >= c.patience else None)

    _signal: str | None = None
    _signum: int = 0
    _left_out_said = False  # the batches --update-freq leaves out of each epoch, logged once
    _epoch_batches = 0  # batches in the current epoch (its share of a --max-epochs budget)
    _saved_step = -1  # the step evaluate_and_save last saved
    _saved_dir: Path | None = None  # and its checkpoint directory (the writer's; None on other ranks)
    _to_beat = -1.0  # dev BLEU of an averaged model kept in place of the best checkpoint (`_beat_the_average`)
    _start = 0.0  # time.monotonic() when the run would have started, had it never stopped

    # evaluation ------------------------------------------------------------------------------

    def evaluate_and_save(self) -> None:
        """Save the checkpoint, then evaluate (an evaluation that fails loses no steps) and record the
        result beside the checkpoint. After a signal, save only: the grace period is short."""
        pr = self.progress
        if self.dist.is_writer and self.p.dev is None:  # no dev set: the newest model is the one to use
            checkpoint.save_weights(self.model, self.p.out / checkpoint.WEIGHTS)
        self._saved_step = pr.step
        saved = self._saved_dir = self.save()
        if self.dist.is_writer and self.p.dev is not None and not self._signal:
            self._evaluate()
            if saved is not None:
                pr.seconds = time.monotonic() - self._start  # a resume counts the evaluation, as this run does
                self._write_progress(saved)
        self.dist.share_stop(self)
        self.dist.barrier()

    def _write_progress(self, saved: Path) -> None:
        """The progress beside a saved checkpoint, after its evaluation: what a resume continues from
        (its state file holds the progress as it was before the evaluation)."""
        atomic.write_text(saved / PROGRESS_FILE, json.dumps(asdict(self.progress)))

    def _last_evaluation_missing(self) -> bool:
        pr = self.progress
        return (self.p.dev is not None and pr.step > 0 and not self._signal
                and not any(r.get("event") == "eval" and r.get("step") == pr.step for r in pr.history))

    def _finish_evaluation(self) -> None:
        """The evaluation of the newest checkpoint that a killed or failed run did not finish (its
        steps were saved first): evaluated now, so the run has its best model and its patience
        counts as if it had not been stopped."""
        if self.dist.is_writer:
            log.info("step %d was saved but not evaluated: evaluating it now", self.progress.step)
            self._evaluate()
            self.progress.seconds = time.monotonic() - self._start
            self._saved_dir = checkpoint.list_checkpoints(self.p.out)[-1]  # told the time again if this ends the run
            self._write_progress(self._saved_dir)
        self._saved_step = self.progress.step
        self.dist.share_stop(self)  # its patience may end the run: on every rank, or the others wait in a step
        self.dist.barrier()

    def _evaluate(self) -> None:
        """Dev BLEU and loss of the current weights: logged, kept in the history, best model saved."""
        pr = self.progress
        began = time.monotonic()
        bleu, signature, dev_loss, each = validate.evaluate_devs(self.model, self.p.vocabs, self.p.devs, self.runtime,
                                                                 self.config.eval_max_sentences)
        improved = bleu > max(pr.best_bleu, self._to_beat)
        record = {"event": "eval", "step": pr.step, "seconds": pr.seconds, "dev_bleu": bleu,
                  "dev_loss": dev_loss, "signature": signature, "target_tokens": pr.target_tokens,
                  "eval_seconds": round(time.monotonic() - began, 3)}
        if len(each) > 1:  # several directions: dev BLEU is their mean
            record["directions"] = each
        pr.history.append(record)
        self._log(record)
        log.info("step %d: dev BLEU %.2f, dev loss %.3f%s", pr.step, bleu, dev_loss,
                 " (best so far, saved)" if improved else "")
        if bleu > pr.best_bleu:  # the best checkpoint (an averaged model kept may still score above it)
            pr.best_bleu, pr.best_step = bleu, pr.step
        if improved:
            pr.evals_without_gain = 0
            checkpoint.save_weights(self.model, self.p.out / checkpoint.WEIGHTS)
        else:
            pr.evals_without_gain += 1
            self.stop_reason = self.stop_reason or self._patience_spent()

    def _log(self, record: dict) -> None:
        if self.dist.is_writer:
            checkpoint.append_jsonl(self.metrics_path, {"time": time.time(), **record})


def _optimizer(model: torch.nn.Module, c: TrainConfig, runtime: Runtime) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases, norms), as in nanoGPT."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # The fused kernel is ~7x faster than the per-tensor loop on CPU too (measured: 7 vs 50 ms a
    # step for the small preset on 2 cores).
    return torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, eps=1e-9, fused=True)


class _no_sync:
    """DDP's no_sync for all but the last batch of an accumulated step (no-op without DDP)."""

    def __init__(self, model, sync: bool):
        self.ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


class _StopOnSignal:
    """SIGINT/SIGTERM/SIGHUP ask the loop to stop at the next step boundary and save (no evaluation);
    the run then exits 128 + the signal's number. A second signal stops at once. A signal ignored
    when the run started (`nohup` ignores SIGHUP) stays ignored."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.trainer._signal:
            raise KeyboardInterrupt
        self.trainer._signal = signal.Signals(signum).name
        self.trainer._signum = signum
        log.warning("%s received: stopping at the end of this step or evaluation, its checkpoint saved (again to abort)",
                    self.trainer._signal)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


# -- torch.distributed ---------------------------------------------------------------------------


class Distributed:
    """The process group under torchrun (WORLD_SIZE > 1), or a single process."""

    def __init__(self, runtime_device: str):
        self.world_size, self.rank, self.local_rank = _ranks(os.environ)
        self.is_writer = self.rank == 0
        self.backend = None
        if self.world_size > 1:
            import torch.distributed as dist

            use_cuda = runtime_device != "cpu" and torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            self.backend = "nccl" if use_cuda else "gloo"
            # rank 0 alone prepares the corpus (tokenizer, cache) while the others wait at a barrier
            dist.init_process_group(self.backend, timeout=dist_timeout(os.environ))

    def device_name(self, requested: str) -> str:
        if self.backend == "nccl":
            return f"cuda:{self.local_rank}"
        return "cpu" if self.backend == "gloo" else requested

    def _all_reduce(self, value: float, op) -> float:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        if self.backend == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op)
        return t.item()

    def sum_int(self, value: int) -> int:
        import torch.distributed as dist

        return int(self._all_reduce(float(value), dist.ReduceOp.SUM if self.world_size > 1 else None))

    def min_int(self, value: int) -> int:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        return int(self._all_reduce(value, dist.ReduceOp.MIN))

    def sum_float(self, value: float) -> float:
        import torch.distributed as dist

        return self._all_reduce(value, dist.ReduceOp.SUM if self.world_size > 1 else None)

    def max_float(self, value: float) -> float:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        return self._all_reduce(value, dist.ReduceOp.MAX)

    def gather(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order, on every rank (any picklable object)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def any_flag(self, flag: bool) -> bool:
        import torch.distributed as dist

        return self._all_reduce(float(flag), dist.ReduceOp.MAX if self.world_size > 1 else None) > 0

    def share_stop(self, trainer: Trainer) -> None:
        """Patience is decided on rank 0 (it evaluates); tell the others."""
        if self.world_size > 1 and self.any_flag(trainer.stop_reason is not None) and trainer.stop_reason is None:
            trainer.stop_reason = "stopped by rank 0"

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Destroy the process group, once what still holds it is gone: the DDP wrapper, in reference
        cycles, keeps it alive past destroy_process_group, and when it was freed only at interpreter
        shutdown, gloo aborted the process ('terminate called without an active exception'; about 1
        two-process run in 9 under load). The caller drops its Trainer first."""
        if self.world_size > 1:
            import gc
            import torch.distributed as dist

            gc.collect()
            dist.destroy_process_group()


def _ranks(env) -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them; a stray or inconsistent one is an error
    (a RANK 1 alone would train without writing anything)."""
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = env.get(name)
        try:
            values[name] = None if text is None else int(text)
        except ValueError:
            raise NmtError(f"environment variable {name}={text!r} is not a number (torchrun sets it)") from None
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world is None and (rank or local):
        raise NmtError(f"RANK={rank} is set without WORLD_SIZE: run under torchrun, or unset RANK and LOCAL_RANK")
    world, rank, local = world or 1, rank or 0, local or 0
    if world < 1 or not 0 <= rank < world or not 0 <= local < world:
        raise NmtError(f"RANK={rank}, LOCAL_RANK={local} with WORLD_SIZE={world}: each must be in [0, WORLD_SIZE) "
                       f"(run under torchrun, or unset them)")
    return world, rank, local


DIST_TIMEOUT = 6 * 3600  # seconds: rank 0 tokenising a large corpus while the others wait


def dist_timeout(env) -> timedelta:
    """The process group's timeout: NMT_DIST_TIMEOUT seconds, else 6 hours (torch's default of
    10-30 minutes would end the run while rank 0 still prepares a large corpus)."""
    text = env.get("NMT_DIST_TIMEOUT")
    if text is None:
        return timedelta(seconds=DIST_TIMEOUT)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise NmtError(f"NMT_DIST_TIMEOUT={text!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


# -- the whole job -------------------------------------------------------------------------------


RECIPE_FILE = "recipe.json"
PROGRESS_FILE = "progress.json"  # in checkpoints/step-N/: the progress after that step's evaluation


def _recipe_vocabulary(config: TrainConfig, tok_config: TokenizerConfig, out: Path) -> TokenizerConfig:
    """The recipe's vocabulary size (from the corpus size), unless set by hand; a run resumed
    keeps the size its tokenizer was trained with (its config.json)."""
    if "tokenizer.vocab_size" in config.fixed:
        return tok_config
    previous = _previous_tokenizer(out)
    if isinstance(previous.get("vocab_size"), int):
        return replace(tok_config, vocab_size=previous["vocab_size"])
    pairs = sum(count_lines(c.tgt_path) for c in corpora_of(config))
    return replace(tok_config, vocab_size=recipe.vocabulary(pairs))


def _previous_tokenizer(out: Path) -> dict[str, Any]:
    """The tokenizer section of the config.json of the run in `out` whose tokenizer is there ({} if none)."""
    if not ((out / "config.json").is_file() and Vocabs.exists(out)):
        return {}
    try:
        return checkpoint.config_section(checkpoint.read_config(out), "tokenizer")
    except NmtError:
        return {}


def _read_recipe(path: Path) -> recipe.Recipe:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NmtError(f"{path}: cannot be read as a recipe ({e}); {RECIPE_FIX}") from None
    return recipe.from_record(record, str(path), RECIPE_FIX)


RECIPE_FIX = "delete it: a run restores it from its config.json, a preparation chooses again"


def _recipe(p: Prepared, config: TrainConfig, runtime: Runtime, out: Path, continues: bool,
            ranks: int = 1) -> recipe.Recipe:
    """The stored recipe of this run (a resume), else one chosen now by timing the candidate shapes
    on real batches; printed with its reason and written to OUT/recipe.json. `continues`: this
    command continues the run whose config is in `out` (not a --force that replaces it), and that
    config's copy of the recipe restores a lost recipe.json; `ranks`: the processes that will train
    (torchrun)."""
    stored = out / RECIPE_FILE
    by_hand = _shape_by_hand(config, p.model_config)
    if continues and not stored.exists():
        record = checkpoint.read_config(out).get("recipe")
        if record:  # written with the run's config, so it is this run's
            recipe.from_record(record, f"{out / 'config.json'}: its recipe", "use a new --out")
            atomic.write_text(stored, json.dumps(record, indent=2))
    # what the recipe was chosen for: the budget, the target tokens of a step (batches per step, processes),
    # and what set the speeds it timed (dtype, CPU threads)
    speed = _speed_of(runtime)
    budget = {"max_time": config.max_time, "max_steps": config.max_steps, "max_epochs": config.max_epochs,
              "update_freq": config.update_freq, "processes": ranks, **speed}
    if stored.exists():
        chosen = _read_recipe(stored)
        # a run's own recipe stays (a resume with changed options is refused later; one that stopped before
        # its first checkpoint is told of another budget); a preparation cut short, or a run --force replaces,
        # chooses again for another budget (a record from before the budget was kept: as if the same; one from
        # before the step's size was kept: as if one batch on one process; one from before the speed's
        # settings were kept: as if these), another dtype or thread count, or other shape options
        was = {"update_freq": 1, "processes": 1, **speed, **chosen.budget}
        same_budget = not chosen.budget or was == budget
        other_budget = bool(chosen.budget) and {**was, **speed} != budget  # not only the speed's settings
        if continues or (same_budget and all(chosen.model.get(k) == v for k, v in by_hand.items())):
            log.info("recipe (stored): %s", chosen.reason)
            if not same_budget and not checkpoint.list_checkpoints(out):
                if other_budget:
                    log.warning("%s: its recipe was chosen for another budget (%s) and no checkpoint is saved yet: "
                                "a new --out chooses one for this budget", out, _budget_text(chosen.budget, budget))
                else:
                    log.warning("%s: its recipe was timed with another dtype or thread count (%s) and no checkpoint "
                                "is saved yet: a new --out times the shapes again", out,
                                _budget_text(was, budget, speed=True))
            return chosen
        other = "does not fit the shape options set by hand" if same_budget else \
            "was chosen for another budget" if other_budget else \
            f"was timed with another dtype or thread count ({_budget_text(was, budget, speed=True)})"
        log.info("recipe: the stored one (%s) %s; choosing again", chosen.shape, other)
    # `--batch-tokens auto` on CPU trains with the recipe's batch (`Trainer.batch_tokens`); on a GPU the
    # memory probe may choose another, and the figures here assume the recipe's
    batch_tokens = int(config.batch_tokens) if "train.batch_tokens" in config.fixed and config.batch_tokens != "auto" \
        else recipe.batch_tokens_for(runtime.device.type)
    corpus_tokens = int(p.cache.tgt_len.sum()) + len(p.cache.tgt_len)  # EOS included
    most = config.eval_max_sentences  # 0: the whole dev set
    dev_pairs = sum(min(n, most) if most else n for n in (d.corpus.check_line_counts() for d in p.devs))  # each direction's
    mean_tgt = corpus_tokens / max(len(p.cache.tgt_len), 1)
    # shape options set by hand narrow the candidates, so the rest of the recipe fits the shape that trains
    shapes = recipe.candidates(by_hand)
    rates, eval_seconds, too_large = {}, 0.0, []
    if config.max_time:  # a step budget needs no speed: it fixes the tokens seen
        cap = recipe.step_cap_of(config.max_steps, config.max_epochs, corpus_tokens, batch_tokens, config.update_freq,
                                 ranks)  # shapes needing more steps than that are not timed
        rates = recipe.measure(shapes, _shape_trial(p, config, runtime, batch_tokens),
                               keep_going=lambda name, rate: recipe.worth_measuring_next(name, rate, config.max_time,
                                                                                         batch_tokens, shapes,
                                                                                         config.update_freq, cap),
                               out_of_memory=too_large)
        # a dev evaluation decodes every dev target (about as fast per token as training) and scores its loss
        eval_seconds = 1.4 * dev_pairs * mean_tgt / max(min(rates.values()), 1.0)
    chosen = replace(recipe.choose(rates, corpus_tokens, config.max_time, config.max_steps, batch_tokens, eval_seconds,
                                   shapes, update_freq=config.update_freq, ranks=ranks, max_epochs=config.max_epochs,
                                   out_of_memory=next(iter(too_large), None)),
                     budget=budget)
    log.info("recipe: %s", chosen.reason)
    atomic.write_text(stored, json.dumps(recipe.describe(chosen), indent=2))
    return chosen


def _speed_of(runtime: Runtime) -> dict[str, Any]:
    """What sets the speeds a recipe times, besides the machine: the dtype and, on CPU, the threads."""
    return {"dtype": dtype_name(runtime.dtype), "threads": torch.get_num_threads() if runtime.device.type == "cpu" else None}


def _budget_text(budget: dict[str, Any], now: dict[str, Any], speed: bool = False) -> str:
    """The budget a recipe was chosen for, as options; the step's size where it is not one batch on one
    process or differs from `now`'s (records from before it was kept have none), and the dtype and
    threads where they differ from `now`'s (or alone, with `speed`)."""
    names = {"max_time": "--max-time {:g}s", "max_steps": "--max-steps {}", "max_epochs": "--max-epochs {}",
             "update_freq": "--update-freq {}", "processes": "{} processes", "dtype": "{}", "threads": "threads {}"}
    shown = [names[k].format(v) for k, v in budget.items() if k in names and v is not None
             and (not speed or k in ("dtype", "threads"))
             and not (k in ("update_freq", "processes") and v == 1 and now.get(k) == 1)
             and not (k in ("dtype", "threads") and v == now.get(k))]
    return ", ".join(shown) or "none"


def _shape_by_hand(config: TrainConfig, model_config: ModelConfig) -> dict[str, int]:
    """The shape options (`recipe.SHAPE_FIELDS`) set by hand: flags or a `--config` file."""
    return {k: getattr(model_config, k) for k in recipe.SHAPE_FIELDS if f"model.{k}" in config.fixed}


def _apply_recipe(chosen: recipe.Recipe, config: TrainConfig, model_config: ModelConfig,
                  quiet: bool = False) -> tuple[TrainConfig, ModelConfig]:
    """The recipe's settings, except those set by hand (`config.fixed`); `quiet` on the ranks
    that do not log (under torchrun rank 0 alone says what was kept)."""
    train_fields = {k: v for k, v in chosen.train.items() if f"train.{k}" not in config.fixed}
    model_fields = {k: v for k, v in chosen.model.items() if f"model.{k}" not in config.fixed}
    kept = [f"{k} {getattr(config, k)} (recipe: {v})" for k, v in chosen.train.items()
            if k not in train_fields and getattr(config, k) != v]
    kept += [f"{k} {getattr(model_config, k)} (recipe: {v})" for k, v in chosen.model.items()
             if k not in model_fields and getattr(model_config, k) != v]
    if kept and not quiet:  # the reason line above names the recipe's values; say which ones this run does not use
        log.info("recipe: set by hand, kept: %s", ", ".join(kept))
    return replace(config, **train_fields), replace(model_config, **model_fields)


def _shape_trial(p: Prepared, config: TrainConfig, runtime: Runtime, batch_tokens: int):
    """For recipe.measure: build a shape with its optimizer; return a function that runs one optimizer
    step on real batch i of the cache (the same batches for every shape)."""
    batches = plan_epoch(p.cache.src_len, p.cache.tgt_len, batch_tokens, config.seed, 0)
    multiple = training_pad_multiple(runtime.device, runtime.dtype)  # as the training steps will pad them

    def out_of_memory() -> recipe.DoesNotFit:
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
        return recipe.DoesNotFit()

    def build(shape: recipe.Shape):
        try:
            model = Transformer(replace(p.model_config, **shape.model_fields())).to(runtime.device)
            optimizer = _optimizer(model, config, runtime)
        except torch.OutOfMemoryError:
            raise out_of_memory() from None

        def step(i: int) -> int:
            batch = collate(p.cache, batches[i % len(batches)], multiple=multiple).to(runtime.device)
            try:
                with runtime.autocast(), runtime.kernels():
                    keep = batch.tgt_out != PAD_ID
                    loss = model(batch.src, batch.tgt_in, keep, batch.tgt_out[keep], config.label_smoothing)
                loss.backward()
                optimizer.step()
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                raise out_of_memory() from None
            optimizer.zero_grad(set_to_none=True)
            if runtime.device.type == "cuda":
                torch.cuda.synchronize(runtime.device)
            return int(keep.sum())

        return step

    return build



def train(config: TrainConfig, model_config: ModelConfig, tok_config: TokenizerConfig, out: Path,
          test: ParallelCorpus | None = None, force: bool = False,
          parent: finetune.Parent | None = None) -> Progress:
    """Prepare (or resume) the run in `out` and train until a budget ends it; then, with `test`,
    translate its source with the final model (beam search) and report BLEU (`validate.score_test`).
    `out` must be new, empty or this run's unless `force`; a signal ends it with `Interrupted`.
    With `config.init_from` the run is a fine-tune of that model directory (`nmt.finetune`; `parent`:
    the configs already resolved by `finetune.configs`)."""
    if config.init_from and parent is None:
        parent, config, model_config, tok_config = finetune.configs(config, model_config, tok_config, out)
    check_max_length(config, model_config, bool(run_directions(config, parent).tagged))
    if config.preset == "auto":  # refused before any work: no budget to choose from, options no candidate fits
        if not config.max_time and not config.max_steps:
            raise UsageError("--preset auto chooses the recipe from a budget: give --max-time or --max-steps")
        recipe.candidates(_shape_by_hand(config, model_config))
    dist = Distributed(config.device)
    lock = None
    try:
        # rank 0 alone looks: the others start after it has written there
        existing_run = check_out_dir(out, force) if dist.is_writer else False
        # --force over a run that saved no checkpoint makes a new run there: none of the old one's choices
        # (recipe, raced dtype) is kept, and its configuration is not compared
        continues = existing_run and not (force and not checkpoint.list_checkpoints(out))
        raced_before = _dtype_raced_before(out, continues)
        runtime = _runtime(config, dist, raced_before)
        chosen = None
        if config.preset == "auto":
            tok_config = _recipe_vocabulary(config, tok_config, out)
        # one trainer per run directory, from its first write on (an error before it leaves no directory)
        lock = checkpoint.lock_run(out) if dist.is_writer else None
        if dist.is_writer:
            if existing_run and checkpoint.list_checkpoints(out):
                check_resume_before_the_cache(out, config, parent)
            p = prepare(config, model_config, tok_config, out, parent=parent)
            if config.preset == "auto":
                chosen = _recipe(p, config, runtime, out, continues, dist.world_size)
        dist.barrier()  # rank 0 trained the tokenizer, built the cache, chose the recipe; the others reuse them
        if not dist.is_writer:
            p = prepare(config, model_config, tok_config, out, parent=parent)
            if config.preset == "auto":
                chosen = _read_recipe(out / RECIPE_FILE)
        if chosen is not None:
            config, p.model_config = _apply_recipe(chosen, config, p.model_config, quiet=not dist.is_writer)
        described = run_config(p, config, tok_config, dist.world_size)
        if chosen is not None:
            described["recipe"] = recipe.describe(chosen)
        if runtime.raced or raced_before:  # kept through a resume with --dtype set
            described[RACED_DTYPE] = dtype_name(runtime.dtype) if runtime.raced else raced_before
        has_checkpoints = bool(checkpoint.list_checkpoints(out))
        if continues or \
                (not dist.is_writer and (out / "config.json").exists() and has_checkpoints):
            check_resumable(out, described, has_checkpoints)
        if dist.is_writer and existing_run and not continues:  # --force replaces a run without checkpoints
            for name in RUN_PRODUCTS:  # the replaced run's, before its config.json goes
                (out / name).unlink(missing_ok=True)
        if dist.is_writer:
            checkpoint.write_config(out, described)
        trainer = Trainer(p, config, runtime, dist)
        if not trainer.resume() and parent is not None:
            finetune.load_weights(trainer.model, parent)  # a fresh fine-tune: the parent's weights, all else anew
            log.info("fine-tuning %s (weights sha256 %s…)", parent.directory, described["parent"]["weights_sha256"][:12])
        _announce(trainer, runtime, dist)
        trainer.batch_tokens()  # on every rank: with `auto` on a GPU the ranks agree on it together
        if dist.is_writer and len(p.cache.parts) > 1:
            described["mixing"] = _mixing_record(trainer)
            checkpoint.write_config(out, described)
        result = trainer.run()
        if dist.is_writer:
            _write_summary(trainer, runtime, dist)
        if trainer._signal:  # saved; no averaging or test in a grace period
            raise Interrupted(f"{trainer.stop_reason} at step {result.step}: checkpoint saved in {out}; "
                              f"run the same command to resume", trainer._signum)
        if dist.is_writer:
            kept = len(checkpoint.list_checkpoints(out))
            if config.average_last >= 2 and p.dev is not None and kept >= 2:
                from nmt.average import average

                average(out, config.average_last, runtime, max_sentences=config.eval_max_sentences)
            elif config.average_last >= 2 and p.dev is not None:
                log.info("no averaging: %d checkpoint kept (--keep-last %d)", kept, config.keep_last)
        best = f"; best dev BLEU {result.best_bleu:.2f} at step {result.best_step}" if result.best_bleu >= 0 else ""
        if dist.is_writer:  # the other ranks evaluate nothing: their records hold no score
            log.info("training ended: %s%s; model in %s", trainer.stop_reason, best, out)
        if dist.is_writer and test is not None:
            first = p.directions.pairs[0][1]
            validate.score_test(out, test, runtime, directions.source_prefix(
                p.directions, directions.tag_ids(p.vocabs.src, p.directions, str(out)), first))
        return result
    finally:
        trainer = None  # its DDP wrapper holds the process group (Distributed.close)
        dist.close()
        if lock is not None:
            os.close(lock)


RACED_DTYPE = "dtype_raced"  # config.json: the dtype `--dtype auto`'s bf16/fp32 race chose for the run


def _dtype_raced_before(out: Path, continues: bool) -> str | None:
    """The dtype a race chose for the run in `out` (its config.json) when this command `continues` it;
    None for a new run (one that --force replaces included) or a record that names no dtype a race answers."""
    if not continues:
        return None
    record = checkpoint.read_config(out).get(RACED_DTYPE)
    return record if record in RACE_ANSWERS else None


def _runtime(config: TrainConfig, dist: Distributed, raced_before: str | None) -> Runtime:
    """Device, dtype and threads of this process. Where `--dtype auto` is decided by the bf16/fp32
    race (a CPU that lists AVX-512 BF16 without AMX, or whose flags can't be read), the run keeps the race's first answer: a resume passes
    it in (`raced_before`, rank 0's config.json), and under torchrun every rank takes rank 0's (a race
    on each could differ, and the ranks would then train in two dtypes at two speeds)."""
    device = dist.device_name(config.device)
    if dist.world_size == 1 or config.dtype != "auto":
        return setup(device, config.dtype, config.threads, raced_before=raced_before)
    runtime, answer = None, None
    if dist.is_writer:
        try:
            runtime = setup(device, "auto", config.threads, raced_before=raced_before)
            answer = dtype_name(runtime.dtype)
        except NmtError as e:  # told to the others, which wait for the answer in the gather below
            answer = e
    first = dist.gather(answer)[0]
    if isinstance(first, NmtError):
        raise first
    return runtime or setup(device, first, config.threads)


def _mixing_record(trainer: Trainer) -> dict[str, Any]:
    """The realised share of each corpus and direction in the first epoch's batches: printed, and
    kept in config.json."""
    mix, c = trainer.p.cache, trainer.config
    shares = mix.shares(mix.plan(trainer.batch_tokens(), c.seed, 0))
    for s in shares:
        weight = "" if s["weight"] is None else f"weight {s['weight']:.3f}, "
        log.info("data mix: %s: %sshare of pairs %.3f, of target tokens %.3f", s["part"], weight, s["pairs"],
                 s["target_tokens"])
    return {"weights": c.weights, "sampling": "whole passes, then a seeded sample without replacement" if c.weights
            else "every pair once per epoch", "parts": shares}


def _announce(trainer: Trainer, runtime: Runtime, dist: Distributed) -> None:
    p = trainer.p
    log.info("data: %s", p.cache.report.summary())
    log.info("model: %s parameters (%d+%d layers, d_model %d); %s%s", f"{count_parameters(trainer.model):,}",
             p.model_config.encoder_layers, p.model_config.decoder_layers, p.model_config.d_model,
             runtime.describe(), f"; {dist.world_size} processes ({dist.backend})" if dist.world_size > 1 else "")


def _write_summary(trainer: Trainer, runtime: Runtime, dist: Distributed) -> None:
    """OUT/training.json. `target_tokens_per_s` is the whole run's rate (its time budget's);
    `training_target_tokens_per_s` leaves out the dev evaluations' time (`evaluation_seconds`), both
    None where an evaluation did not record its time (a run begun by an nmt from before they did)."""
    pr = trainer.progress
    evals = [r for r in pr.history if r.get("event") == "eval"]
    evaluating = sum(r["eval_seconds"] for r in evals) if all("eval_seconds" in r for r in evals) else None
    summary = {"steps": pr.step, "epochs": pr.epoch, "target_tokens": pr.target_tokens, "seconds": pr.seconds,
               "target_tokens_per_s": pr.target_tokens / max(pr.seconds, 1e-9), "evaluation_seconds": evaluating,
               "training_target_tokens_per_s": None if evaluating is None else
               pr.target_tokens / max(pr.seconds - evaluating, 1e-9),
               "device": runtime.describe(),
               "world_size": dist.world_size, "stop_reason": trainer.stop_reason, "best_dev_bleu": pr.best_bleu,
               "best_step": pr.best_step, "parameters": count_parameters(trainer.model), "evaluations": pr.history}
    atomic.write_text(trainer.p.out / "training.json", json.dumps(summary, indent=2))

