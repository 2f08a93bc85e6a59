"""`nmt info`: what a model directory holds, gathered from its JSON files (no weights loaded).

Architecture and preset, parameter count (from the config, on the meta device), vocabulary
sizes, training data fingerprints, steps, tokens, time and device, dev scores with their
sacreBLEU signatures, averaging results and package versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nmt import checkpoint
from nmt.errors import NmtError


def describe(directory: Path) -> dict[str, Any]:
    config = checkpoint.read_config(directory)
    facts: dict[str, Any] = {"directory": str(directory), "format_version": config["version"],
                             "languages": f"{config.get('src')}→{config.get('tgt')}",
                             "preset": config.get("train", {}).get("preset"), "model": config.get("model"),
                             "parameters": _parameters(directory, config), "tokenizer": config.get("tokenizer"),
                             "data": config.get("data"), "filters": config.get("filters"),
                             "versions": config.get("versions")}
    for name in ("training", "averaging"):
        path = Path(directory) / f"{name}.json"
        if path.exists():
            try:
                facts[name] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise NmtError(f"{path}: not valid JSON ({e})") from None
    return facts


def _parameters(directory: Path, config: dict[str, Any]) -> int:
    import torch

    from nmt.model import Transformer, count_parameters

    with torch.device("meta"):
        return count_parameters(Transformer(checkpoint.read_model_config(directory, config)))


def render(facts: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m, t = facts["model"], facts.get("training", {})
    table = Table(title=f"nmt model {facts['directory']}", show_header=False)
    rows = [
        ("languages", facts["languages"]),
        ("architecture", f"Transformer {m['encoder_layers']}+{m['decoder_layers']} layers, d_model {m['d_model']}, "
                         f"{m['n_heads']} heads, d_ff {m['d_ff']}, {'pre' if m['pre_norm'] else 'post'}-norm"),
        ("preset", str(facts["preset"])),
        ("parameters", f"{facts['parameters']:,}"),
        ("vocabulary", f"{m['src_vocab_size']:,} source / {m['tgt_vocab_size']:,} target "
                       f"({facts['tokenizer']['kind']}, {'joint' if facts['tokenizer']['joint'] else 'separate'})"),
    ]
    for d in facts.get("data") or []:
        rows.append(("data", f"{d['path']}: {d['lines']:,} lines, {d['size']:,} bytes, sha256 {d['sha256'][:16]}…"))
    if t:
        rows += [("training", f"{t['steps']:,} steps, {t['target_tokens']:,} target tokens, {t['seconds'] / 60:.1f} min, "
                              f"{t['target_tokens_per_s']:,.0f} target tokens/s"),
                 ("device", f"{t['device']} × {t['world_size']}"),
                 ("best dev BLEU", f"{t['best_dev_bleu']:.2f} at step {t['best_step']:,}")]
        if t.get("evaluations"):
            rows.append(("signature", t["evaluations"][-1]["signature"]))
    if "averaging" in facts:
        a = facts["averaging"]
        rows.append(("averaging", f"{len(a['checkpoints'])} checkpoints: dev BLEU {a['scores']['averaged']['dev_bleu']:.2f} "
                                  f"vs {a['scores']['current']['dev_bleu']:.2f}, kept {a['kept']}"))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in (facts.get("versions") or {}).items())))
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
