"""Pictures: attention grids (layers × heads) and training curves to PNG, a compact attention
heatmap in the terminal.

matplotlib is an optional extra (`pip install 'nmt[plot]'`), imported only here and only when
a PNG is asked for; the terminal heatmap needs only rich.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from nmt.attention_maps import AttentionMaps
from nmt.errors import NmtError, UsageError

log = logging.getLogger(__name__)

SHADES = " ░▒▓█"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NmtError("drawing PNG files needs matplotlib: pip install 'nmt[plot]'") from None
    return plt


def attention_png(maps: AttentionMaps, prefix: Path) -> list[Path]:
    """PREFIX-encoder.png, PREFIX-decoder.png, PREFIX-cross.png: one panel per layer (rows) and head (columns)."""
    plt = _pyplot()
    kinds = {"encoder": (maps.encoder, maps.src_tokens, maps.src_tokens),
             "decoder": (maps.decoder, maps.tgt_tokens, maps.tgt_tokens),
             "cross": (maps.cross, maps.tgt_tokens, maps.src_tokens)}
    written = []
    for kind, (w, rows, cols) in kinds.items():
        n_layers, n_heads = w.shape[:2]
        size = 0.25 * max(len(rows), len(cols)) + 1.0
        fig, axes = plt.subplots(n_layers, n_heads, figsize=(size * n_heads, size * n_layers), squeeze=False)
        for layer in range(n_layers):
            for head in range(n_heads):
                ax = axes[layer][head]
                ax.imshow(w[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
                ax.set_title(f"{kind} layer {layer + 1} head {head + 1}", fontsize=8)
                ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
                ax.set_yticks(range(len(rows)), rows, fontsize=6)
        fig.tight_layout()
        path = prefix.with_name(f"{prefix.name}-{kind}.png")
        _save(plt, fig, path)
        written.append(path)
    return written


def attention_terminal(maps: AttentionMaps) -> None:
    """The last layer's cross-attention, averaged over heads, as shaded cells (target rows × source columns)."""
    from rich.console import Console
    from rich.table import Table

    w = maps.cross[-1].mean(0)  # [T, S]
    table = Table(title="cross-attention, last layer, mean over heads", show_lines=False, box=None)
    table.add_column("")
    for tok in maps.src_tokens:
        table.add_column(tok, justify="center", no_wrap=True)
    for i, tok in enumerate(maps.tgt_tokens):
        cells = [SHADES[min(int(v * len(SHADES)), len(SHADES) - 1)] * 2 for v in w[i].tolist()]
        table.add_row(tok, *cells)
    Console().print(table)


def _records(path: Path) -> list[dict]:
    """The JSON objects of metrics.jsonl; a line that is not one (cut short when a run was killed
    mid-write, and the resumed run appended after it) is skipped and counted."""
    records, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        log.warning("%s: skipped %d unreadable line(s) (line %s), as a killed run leaves one cut short",
                    path, len(bad), ", ".join(map(str, bad[:3])))
    return records


def _save(plt, fig, path: Path) -> None:
    """Write a figure in the format its file name says; a format matplotlib cannot write, or a
    file that cannot be written, is a one-line error naming the file."""
    kinds = fig.canvas.get_supported_filetypes()
    try:
        if path.suffix.lower().lstrip(".") not in kinds:
            raise UsageError(f"{path}: matplotlib cannot write {path.suffix or 'a file without a suffix'} "
                             f"(name it .png, or one of {', '.join(sorted(kinds))})")
        fig.savefig(path, dpi=80)
    except OSError as e:
        raise NmtError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        plt.close(fig)


def training_curves_png(run: Path, out: Path) -> Path:
    """Train loss, dev loss and dev BLEU against steps and against time, from metrics.jsonl."""
    path = run / "metrics.jsonl"
    if not path.exists():
        raise NmtError(f"{run}: no metrics.jsonl (not a training run directory?)")
    records = _records(path)
    number = lambda r, keys: all(isinstance(r.get(k), (int, float)) for k in keys)  # noqa: E731
    train = [r for r in records if r.get("event") == "train" and number(r, ("step", "seconds", "loss"))]
    evals = [r for r in records if r.get("event") == "eval" and number(r, ("step", "seconds", "dev_loss", "dev_bleu"))]
    if not train and not evals:
        raise NmtError(f"{path}: no training records yet")
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for row, x_key, x_label in ((0, "step", "step"), (1, "seconds", "seconds")):
        axes[row][0].plot([r[x_key] for r in train], [r["loss"] for r in train])
        axes[row][0].set(title="train loss", xlabel=x_label)
        axes[row][1].plot([r[x_key] for r in evals], [r["dev_loss"] for r in evals], marker="o")
        axes[row][1].set(title="dev loss", xlabel=x_label)
        axes[row][2].plot([r[x_key] for r in evals], [r["dev_bleu"] for r in evals], marker="o")
        axes[row][2].set(title="dev BLEU", xlabel=x_label)
    fig.tight_layout()
    _save(plt, fig, out)
    return out
