"""`nmt info`: what a model directory holds, gathered from its JSON files (no weights loaded).

Architecture and preset, parameter count (from the config, on the meta device), vocabulary
sizes, training data fingerprints, steps, tokens, time and device, dev scores with their
sacreBLEU signatures, averaging results and package versions; the directions of a model trained
on several (and their target-language tags), a fine-tune's lineage, a weighted mix's shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nmt import checkpoint
from nmt.directions import of_model
from nmt.errors import NmtError
from nmt.textio import display_name


def describe(directory: Path) -> dict[str, Any]:
    from nmt.engines import is_ctranslate2_dir
    from nmt.export import read_export_record

    if is_ctranslate2_dir(directory):  # CTranslate2's own config.json is not ours: say what the directory is
        try:
            source = read_export_record(directory).get("source_model")
        except NmtError:  # an unreadable record only loses the model's name
            source = None
        raise NmtError(f"{display_name(directory)} is a CTranslate2 export (`nmt export`): run `nmt info` on the model "
                       f"it was exported from{f' ({source})' if isinstance(source, str) else ''}")
    config = checkpoint.read_config(directory)
    run = of_model(config, str(Path(directory) / "config.json"))
    facts: dict[str, Any] = {"directory": display_name(directory), "format_version": config["version"],
                             "languages": ", ".join(f"{s}→{t}" for s, t in run.pairs) or "?",
                             "directions": [f"{s}-{t}" for s, t in run.pairs], "tags": run.tags,
                             "parent": config.get("parent"), "mixing": config.get("mixing"),
                             "preset": checkpoint.config_section(config, "train").get("preset"), "model": config.get("model"),
                             "parameters": _parameters(directory, config), "tokenizer": config.get("tokenizer"),
                             "data": config.get("data"), "filters": config.get("filters"),
                             "versions": config.get("versions")}
    for name in ("training", "averaging"):
        record = checkpoint.read_record(directory, f"{name}.json")
        if record is not None:
            facts[name] = record
    return facts


def _parameters(directory: Path, config: dict[str, Any]) -> int:
    import torch

    from nmt.model import Transformer, count_parameters

    with torch.device("meta"):
        return count_parameters(Transformer(checkpoint.read_model_config(directory, config)))


def _lineage(parent: Any) -> list[str]:
    """One line per ancestor, nearest first: directory, weights fingerprint, its best dev BLEU."""
    lines = []
    while isinstance(parent, dict) and len(lines) < 16:
        bleu = parent.get("best_dev_bleu")
        lines.append(f"{parent.get('directory')} (weights sha256 {str(parent.get('weights_sha256'))[:16]}…"
                     + (f", best dev BLEU {bleu:.2f} at step {parent.get('best_step')}"
                        if isinstance(bleu, (int, float)) and bleu >= 0 else "")  # -1: trained without a dev set
                     + ")")
        parent = parent.get("parent")
    return lines


def render(facts: dict[str, Any]) -> None:
    """The facts as a table on stdout; a JSON file of the directory missing a field the table shows,
    or holding one of another type, is a one-line error naming the files."""
    try:
        _render(facts)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise NmtError(f"{facts['directory']}: config.json, training.json or averaging.json is malformed "
                       f"({type(e).__name__}: {e}); `nmt info --format json` shows what they hold") from None


def _render(facts: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from nmt.progress import stdout_console

    m, t = facts["model"], facts.get("training", {})
    table = Table(title=escape(f"nmt model {facts['directory']}"), show_header=False)
    rows = [
        ("languages", facts["languages"] + (f" ({len(facts['directions'])} directions in one model; translate "
                                            f"with --tgt-lang {'/'.join(sorted({d.split('-')[1] for d in facts['directions']}))})"
                                            if len(facts["directions"]) > 1 else "")),
        ("architecture", f"Transformer {m['encoder_layers']}+{m['decoder_layers']} layers, d_model {m['d_model']}, "
                         f"{m['n_heads']} heads, d_ff {m['d_ff']}, {'pre' if m['pre_norm'] else 'post'}-norm"),
        ("preset", str(facts["preset"])),
        ("parameters", f"{facts['parameters']:,}"),
        ("vocabulary", f"{m['src_vocab_size']:,} source / {m['tgt_vocab_size']:,} target "
                       f"({facts['tokenizer']['kind']}, {'joint' if facts['tokenizer']['joint'] else 'separate'})"),
    ]
    if facts["tags"]:
        rows.append(("target tags", " ".join(facts["tags"]) + " (special tokens, first on the source side)"))
    for p in _lineage(facts.get("parent")):
        rows.append(("fine-tuned from", p))
    if isinstance(facts.get("mixing"), dict):
        for part in facts["mixing"].get("parts") or []:
            weight = "" if part.get("weight") is None else f"weight {part['weight']:.3f}, "
            rows.append(("data mix", f"{part.get('part')}: {weight}{part.get('pairs', 0):.3f} of pairs, "
                                     f"{part.get('target_tokens', 0):.3f} of target tokens"))
    for d in facts.get("data") or []:
        rows.append(("data", f"{d['path']}: {d['lines']:,} lines, {d['size']:,} bytes, sha256 {d['sha256'][:16]}…"))
    if t:
        evaluating = t.get("evaluation_seconds")  # the dev evaluations' time: None where one did not record it
        rows += [("training", f"{t['steps']:,} steps, {t['target_tokens']:,} target tokens, {t['seconds'] / 60:.1f} min, "
                              f"{t['target_tokens_per_s']:,.0f} target tokens/s"
                              + (f" ({t['training_target_tokens_per_s']:,.0f} between dev evaluations, which took "
                                 f"{evaluating / 60:.1f} min)" if evaluating else "")),
                 ("device", f"{t['device']} × {t['world_size']}"),
                 ("best dev BLEU", f"{t['best_dev_bleu']:.2f} at step {t['best_step']:,}" if t["best_dev_bleu"] >= 0
                  else "none (trained without a dev set)")]
        if t.get("evaluations"):
            rows.append(("signature", t["evaluations"][-1]["signature"]))
    if "averaging" in facts:
        a = facts["averaging"]
        rows.append(("averaging", f"{len(a['checkpoints'])} checkpoints: dev BLEU {a['scores']['averaged']['dev_bleu']:.2f} "
                                  f"vs {a['scores']['current']['dev_bleu']:.2f}, kept {a['kept']}"))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in (facts.get("versions") or {}).items())))
    for key, value in rows:  # paths and signatures are text, not rich markup ("[v2]" is not a style)
        table.add_row(key, escape(value))
    stdout_console().print(table)
