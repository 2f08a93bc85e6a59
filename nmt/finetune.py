"""Fine-tuning: a run that starts from a trained model (`nmt train --init-from DIR`).

The parent directory is untrusted input and is read only through `checkpoint`'s checked loader
(config fields, tokenizer files, safetensors header). A fine-tune is a new run in its own
directory: it takes the parent's tokenizer (copied, never retrained: the vocabulary cannot change
silently, so a tokenizer option that differs from the parent's is an error), the parent's model
options (an explicit one that differs is an error naming it; dropout may change, it is a
training-time setting that no weight depends on) and the parent's translation weights
(`model.safetensors`: its best or averaged model). Optimizer, schedule, best score and patience
start afresh. The training defaults are a fixed fine-tuning schedule (`training_defaults`), not
the budget recipe: the parent's batch size and evaluation interval, half its peak learning rate,
a short warm-up, and a cosine decay to 0 when a budget is given. Any option given by hand wins.

`lineage` is what config.json records about the parent (directory, fingerprints, dev scores, and
its own lineage); re-running the command resumes the fine-tune like any run, and is refused if
the parent's weights changed in between. Loading the weights into the model is `load_weights`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nmt import checkpoint
from nmt.config import ModelConfig, TokenizerConfig, TrainConfig, check_choices, from_dict
from nmt.corpus import sha256_of
from nmt.directions import Directions, of_model, of_run
from nmt.errors import NmtError, UsageError

log = logging.getLogger(__name__)

WARMUP_STEPS = 50  # the parent's weights are trained: a short warm-up only lets Adam's moments settle
LR_FACTOR = 0.5  # of the parent's peak rate
FREE_MODEL_OPTIONS = {"dropout", "attention_dropout"}  # no weight depends on them
TOKENIZER_FLAGS = {"vocab_size": "--vocab-size", "kind": "--tokenizer", "joint": "--separate-vocab",
                   "sample_lines": "--tokenizer-sample"}


@dataclass
class Parent:
    directory: Path
    config: dict[str, Any]
    model_config: ModelConfig
    tok_config: TokenizerConfig
    directions: Directions


def read_parent(directory: Path) -> Parent:
    """The parent's config, checked: its model section as `checkpoint` checks any model directory,
    its tokenizer section's keys and choices, its directions; and it must have translation weights.
    Any problem is one error line starting with --init-from."""
    try:
        return _read_parent(Path(directory))
    except UsageError:
        raise
    except NmtError as e:
        raise NmtError(f"--init-from: {e}") from None


def _read_parent(directory: Path) -> Parent:
    config = checkpoint.read_config(directory)
    model_config = checkpoint.read_model_config(directory, config)
    what = f"{directory / 'config.json'}: tokenizer"
    if not isinstance(config.get("tokenizer"), dict):
        raise NmtError(f"{what}: missing or not a JSON object")
    tok_config = from_dict(TokenizerConfig, config["tokenizer"], what)
    try:
        check_choices(tok_config, what)
    except UsageError as e:
        raise NmtError(str(e)) from None
    if not (directory / checkpoint.WEIGHTS).is_file():
        raise NmtError(f"{directory}: no {checkpoint.WEIGHTS} (has the parent saved a model yet?)")
    return Parent(directory, config, model_config, tok_config, of_model(config, f"{directory / 'config.json'}"))


def check_options(parent: Parent, model: dict[str, Any], tokenizer: dict[str, Any]) -> None:
    """Options given explicitly (by preset, --config or flags) must agree with the parent's:
    the first that differs is a usage error naming it."""
    for name, value in model.items():
        old = getattr(parent.model_config, name, None)
        if name not in FREE_MODEL_OPTIONS and name not in ("src_vocab_size", "tgt_vocab_size") and old != value:
            name = "pre_norm (--post-norm)" if name == "pre_norm" else name
            raise UsageError(f"--init-from {parent.directory}: model option {name} is {value}, the parent's is {old} "
                             f"(a fine-tune keeps the parent's model: drop the option or the --preset)")
    for name, value in tokenizer.items():
        old = getattr(parent.tok_config, name, None)
        if old != value:
            flag = TOKENIZER_FLAGS.get(name, f"tokenizer.{name}")
            shown = (lambda v: not v) if name == "joint" else (lambda v: v)
            raise UsageError(f"--init-from {parent.directory}: {flag} {shown(value)} differs from the parent's "
                             f"{shown(old)} (a fine-tune keeps the parent's tokenizer and vocabulary: drop the option)")


def parent_model_config(parent: Parent, model: dict[str, Any]) -> ModelConfig:
    """The parent's model options, with the free ones (dropout) given explicitly applied."""
    return replace(parent.model_config, **{k: v for k, v in model.items() if k in FREE_MODEL_OPTIONS})


def training_defaults(parent: Parent, has_budget: bool) -> dict[str, Any]:
    """The fixed fine-tuning schedule (TrainConfig fields), from the parent's training section
    where it holds sound values (it is untrusted: anything else falls back to nmt's defaults)."""
    train = parent.config.get("train") if isinstance(parent.config.get("train"), dict) else {}
    lr = train.get("lr")
    batch = train.get("batch_tokens")
    every = train.get("eval_every")
    out: dict[str, Any] = {"warmup_steps": WARMUP_STEPS, "lr_schedule": "cosine" if has_budget else "inverse-sqrt",
                           "average_last": 0}
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and 0 < lr < 1:
        out["lr"] = LR_FACTOR * lr
    if isinstance(batch, int) and not isinstance(batch, bool) and 1 <= batch <= 1 << 24 or batch == "auto":
        out["batch_tokens"] = batch
    if isinstance(every, int) and not isinstance(every, bool) and 1 <= every <= 1 << 30:
        out["eval_every"] = every
    return out


def configs(config: TrainConfig, model_config: ModelConfig, tok_config: TokenizerConfig, out: Path):
    """(parent, configs) of a fine-tune: the parent's model and tokenizer options (explicit ones
    must agree, `config.fixed` says which), its directions unless --src/--tgt/--pairs are given,
    and the fine-tuning schedule for the training options not given by hand."""
    parent = read_parent(Path(config.init_from))
    if out.exists() and parent.directory.exists() and out.resolve() == parent.directory.resolve():
        raise UsageError(f"--init-from {parent.directory} is the --out directory: a fine-tune is a new run, "
                         f"give it a new --out")
    chosen = lambda section, c: {k.split(".", 1)[1]: getattr(c, k.split(".", 1)[1])  # noqa: E731
                                 for k in config.fixed if k.startswith(section + ".")}
    check_options(parent, chosen("model", model_config), chosen("tokenizer", tok_config))
    model_config = parent_model_config(parent, chosen("model", model_config))
    defaults = training_defaults(parent, bool(config.max_steps or config.max_time))
    given = {"train.src", "train.tgt", "train.pairs"} & set(config.fixed)
    pairs = parent.directions.pairs
    if not given and pairs:
        defaults.update(src=pairs[0][0], tgt=pairs[0][1], pairs=[f"{a}-{b}" for a, b in pairs] if len(pairs) > 1 else [])
    elif given in ({"train.src"}, {"train.tgt"}) and pairs:  # one side given: the other is the parent's
        side, other = ("tgt", "src") if given == {"train.tgt"} else ("src", "tgt")
        value = getattr(config, side)
        # the one direction with this side (of a single direction: itself or, with the side it had on
        # the other end, its reverse, es-en → en-es); a single direction's other side otherwise (a new
        # direction, es-en → es-fr: said below)
        candidates = [pairs[0], pairs[0][::-1]] if len(pairs) == 1 else pairs
        matching = [p for p in candidates if p[side == "tgt"] == value] or (pairs if len(pairs) == 1 else [])
        if len(matching) != 1:
            raise UsageError(f"--{side} {value}: the parent was trained on {parent.directions.text()}, so the "
                             f"other side is not known: give --{other} too")
        defaults[other] = matching[0][side == "src"]
    config = replace(config, **{k: v for k, v in defaults.items() if f"train.{k}" not in config.fixed})
    new = [f"{a}-{b}" for a, b in of_run(config.src, config.tgt, config.pairs).pairs if (a, b) not in pairs]
    if new and pairs:
        vocabularies = "" if parent.tok_config.joint else \
            f"; its separate vocabularies were trained on {pairs[0][0]} (source) and {pairs[0][1]} (target)"
        log.info("fine-tune: %s not among the directions the parent was trained on (%s)%s", ", ".join(new),
                 parent.directions.text(), vocabularies)
    return parent, config, model_config, parent.tok_config


def lineage(parent: Parent, tokenizer_fingerprint: str) -> dict[str, Any]:
    """config.json's record of the parent: where, which weights and tokenizer (SHA-256), what it
    scored on dev (from its training.json, if readable), and its own lineage."""
    record: dict[str, Any] = {"directory": str(parent.directory.resolve()),
                              "weights_sha256": sha256_of(parent.directory / checkpoint.WEIGHTS),
                              "tokenizer": tokenizer_fingerprint,
                              "directions": parent.directions.text()}
    record.update(_scores(parent.directory))
    if isinstance(parent.config.get("parent"), dict):
        record["parent"] = parent.config["parent"]
    return record


def _scores(directory: Path) -> dict[str, Any]:
    """Steps and dev scores from the parent's training.json; nothing if it is missing or malformed."""
    from nmt.textio import read_small_file

    try:
        data = json.loads(read_small_file(directory / "training.json", checkpoint.CONFIG_LIMIT, "a training summary"))
    except (NmtError, OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    out = {k: data[k] for k in ("steps", "best_dev_bleu", "best_step") if number(data.get(k))}
    evals = data.get("evaluations")
    if isinstance(evals, list):
        out["dev_scores"] = [{k: e[k] for k in ("step", "dev_bleu", "dev_loss") if number(e.get(k))}
                             for e in evals[-20:] if isinstance(e, dict)]
    return out


def load_weights(model, parent: Parent) -> None:
    """The parent's translation weights into `model` (same architecture), through the checked loader."""
    loaded, _, _ = checkpoint.load_for_inference(parent.directory)
    model.load_state_dict(loaded.state_dict())

