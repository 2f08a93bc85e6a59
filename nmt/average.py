"""Checkpoint averaging: the mean of the last K checkpoints' weights, kept only if it scores higher.

Averaging the parameters of the last few checkpoints usually gives a better model than any of
them (Vaswani et al. 2017, section 6.1). Here the averaged model and the current
`model.safetensors` are both scored on the dev set (greedy BLEU); the averaged one replaces it
only when it wins, and both scores are recorded in `averaging.json` of the model directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nmt import atomic, checkpoint, directions, mixing, validate
from nmt.errors import NmtError
from nmt.model import Transformer
from nmt.runtime import Runtime

RECORD = "averaging.json"  # what was averaged, both dev scores, which model was kept

log = logging.getLogger(__name__)


def average_state_dicts(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean (in float64, then back to each tensor's dtype) of safetensors files."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        tensors = checkpoint.read_tensors(path)
        if total and set(tensors) != set(total):
            raise NmtError(f"{path}: holds other tensors than the checkpoints before it")
        for name, tensor in tensors.items():
            dtypes[name] = tensor.dtype
            total[name] = total.get(name, 0) + tensor.double()
    return {name: (t / len(paths)).to(dtypes[name]) for name, t in total.items()}


def average(directory: Path, last: int, runtime: Runtime, dev_prefix: str | None = None,
            max_sentences: int = 0) -> dict:
    """Average the last `last` checkpoints of a run; keep the result if its dev BLEU is higher (on the
    run's dev set or `dev_prefix`; its first `max_sentences` lines, 0: all, as the run's evaluations
    read it, so that an extended run compares its checkpoints with the kept model on the same lines)."""
    config = checkpoint.read_config(directory)
    checkpoints = checkpoint.list_checkpoints(directory)[-last:]
    if len(checkpoints) < 2:
        raise NmtError(f"{directory}: need at least 2 checkpoints to average, found {len(checkpoints)}")
    dev_prefix = dev_prefix or checkpoint.config_section(config, "train").get("dev")
    if not dev_prefix:
        raise NmtError(f"{directory}: no dev set to compare the averaged model on (give --dev)")
    current, vocabs, _ = checkpoint.load_for_inference(directory)  # every part checked
    run = directions.of_model(config, str(directory / "config.json"))
    devs = mixing.dev_sets(dev_prefix, run, directions.tag_ids(vocabs.src, run, str(directory)))
    for d in devs:  # read whole before any model is scored: a bad dev set is a one-line error
        validate.check_dev(d.corpus, training=False)
    for c in checkpoints:  # names, shapes and dtypes of each, against the model: a one-line error, not a crash
        checkpoint.check_weights(c / checkpoint.WEIGHTS, current.config)
    averaged = Transformer(current.config)
    # safetensors stores tied matrices once, so the aliases (tgt_embed, output) are "missing" here
    _, unexpected = averaged.load_state_dict(average_state_dicts([c / checkpoint.WEIGHTS for c in checkpoints]),
                                             strict=False)
    if unexpected:
        raise NmtError(f"{directory}: checkpoints hold tensors the model does not have: {unexpected[:3]}")
    scores = {}
    for name, model in (("current", current), ("averaged", averaged)):
        bleu, signature, loss, _ = validate.evaluate_devs(model.to(runtime.device), vocabs, devs, runtime,
                                                          max_sentences)
        scores[name] = {"dev_bleu": bleu, "dev_loss": loss, "signature": signature}
    kept = "averaged" if scores["averaged"]["dev_bleu"] > scores["current"]["dev_bleu"] else "current"
    if kept == "averaged":
        checkpoint.save_weights(averaged, directory / checkpoint.WEIGHTS)
    record = {"checkpoints": [c.name for c in checkpoints], "scores": scores, "kept": kept, "dev": dev_prefix,
              "max_sentences": max_sentences}
    atomic.write_text(directory / RECORD, json.dumps(record, indent=2))
    log.info("averaged %d checkpoints: dev BLEU %.2f vs current %.2f: kept the %s model", len(checkpoints),
             scores["averaged"]["dev_bleu"], scores["current"]["dev_bleu"], kept)
    return record


def kept_model_bleu(directory: Path, dev_prefix: str | None, max_sentences: int) -> float | None:
    """The dev BLEU of the model `average` kept as `directory`'s model.safetensors, averaged or current
    (a re-run that averages the same checkpoints again finds its earlier average as the current model,
    scoring the same, and keeps it as "current"); None when there is no record, not one nmt wrote, or
    one scored on other lines than `dev_prefix`'s first `max_sentences`. A record from before these
    were kept counts as the run's whole dev set, and only where it kept the average (as it did then:
    its "current" may have been scored on another dev set, with `nmt average --dev`)."""
    try:
        record = checkpoint.read_record(directory, RECORD)
        if record is None or record["kept"] not in ("averaged", "current"):
            return None
        if "dev" not in record:
            if record["kept"] != "averaged" or max_sentences:
                return None
        elif record["dev"] != dev_prefix or record.get("max_sentences") != max_sentences:
            return None
        return float(record["scores"][record["kept"]]["dev_bleu"])
    except (OSError, NmtError, ValueError, TypeError, KeyError):
        return None
