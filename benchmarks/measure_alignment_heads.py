"""Which decoder layer and heads should word alignments be read from? Measured on tiny
Transformers trained here, in seconds, on tasks whose true alignment is known:

    copy     y = x                     (alignment: the diagonal)
    reverse  y = x reversed            (the anti-diagonal)
    shift    y = x rotated by 2 tokens (a non-monotone-looking but known permutation)

For each decoder depth, every layer's cross-attention is read two ways: from the step that
predicts target token j (query = the token before j, as `attention_maps.alignment_attention`
does) and from the step that reads j (query = j itself). The accuracy printed is the share of
target tokens whose most-attended source token is the true one, for each head alone and for
the average of the layer's heads; held-out sentences, 3 seeds.

    python benchmarks/measure_alignment_heads.py [--steps 600] [--seeds 3]

Only tiny models on synthetic tasks can be measured here (no gold word alignments for the
embedded corpus); the figures say which layer carries the alignment in the simplest case.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nmt.attention_maps import decoder_maps  # noqa: E402
from nmt.batching import pad_batch  # noqa: E402
from nmt.config import ModelConfig  # noqa: E402
from nmt.model import Transformer  # noqa: E402

V = 40


def task_target(x: list[int], task: str) -> tuple[list[int], list[int]]:
    """(target, gold source position of each target token)."""
    n = len(x)
    if task == "copy":
        gold = list(range(n))
    elif task == "reverse":
        gold = list(range(n - 1, -1, -1))
    else:  # shift
        gold = [(j + 2) % n for j in range(n)]
    return [x[g] for g in gold], gold


def sample(g: torch.Generator, n: int, task: str):
    xs = [torch.randint(4, V, (int(torch.randint(5, 13, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    ys, golds = zip(*(task_target(x, task) for x in xs))
    return xs, list(ys), list(golds)


def train(task: str, layers: int, seed: int, steps: int) -> Transformer:
    torch.manual_seed(seed)
    c = ModelConfig(d_model=64, n_heads=4, d_ff=128, encoder_layers=2, decoder_layers=layers, dropout=0.0,
                    attention_dropout=0.0, src_vocab_size=V, tgt_vocab_size=V, max_positions=32)
    model = Transformer(c)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xs, ys, _ = sample(g, 64, task)
        b = pad_batch(xs, ys)
        logits = model(b.src, b.tgt_in)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b.tgt_out, ignore_index=c.pad_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.inference_mode()
def accuracies(model: Transformer, task: str, seed: int) -> dict:
    """{(layer, head or 'mean', 'predicts'|'reads'): accuracy}"""
    xs, ys, golds = sample(torch.Generator().manual_seed(1000 + seed), 200, task)
    b = pad_batch(xs, ys)
    memory, mask = model.encode(b.src)
    _, cross = decoder_maps(model, memory, mask, b.tgt_in)  # [L, B, H, T, S]
    out = {}
    n_heads = cross.shape[2]
    for layer in range(cross.shape[0]):
        for head in [*range(n_heads), "mean"]:
            w = cross[layer].mean(1) if head == "mean" else cross[layer][:, head]  # [B, T, S]
            for way, shift in (("predicts", 0), ("reads", 1)):
                hits = total = 0
                for i, gold in enumerate(golds):
                    rows = w[i, shift : shift + len(gold), : len(xs[i])]
                    got = rows.argmax(-1).tolist()
                    hits += sum(a == b for a, b in zip(got, gold[: len(got)]))
                    total += len(got)
                out[(layer, head, way)] = hits / total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--layers", default="2,3")
    ap.add_argument("--tasks", default="copy,reverse,shift")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for task in args.tasks.split(","):
        for layers in map(int, args.layers.split(",")):
            start = time.perf_counter()
            runs = [accuracies(train(task, layers, seed, args.steps), task, seed) for seed in range(args.seeds)]
            print(f"\n{task}, {layers} decoder layers ({time.perf_counter() - start:.0f} s, {args.seeds} seeds): "
                  "argmax accuracy, mean over seeds (min-max)")
            for way in ("predicts", "reads"):
                for layer in range(layers):
                    cells = []
                    for head in [*range(4), "mean"]:
                        vals = [r[(layer, head, way)] for r in runs]
                        cells.append(f"{'h' + str(head) if head != 'mean' else 'mean'} {sum(vals) / len(vals):.2f}"
                                     f" ({min(vals):.2f}-{max(vals):.2f})")
                    print(f"  {way:8} layer {layer}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
