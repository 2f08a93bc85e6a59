"""Dev scoring: how good a model is on a dev set, as training and checkpoint averaging need it.

Dev BLEU is sacreBLEU on detokenised greedy output (the same `Translator` as `nmt translate`,
so the same line contract and source-length limit), with its signature; dev loss is the
cross-entropy per target token under teacher forcing (no label smoothing), over batches from
the one padded-batch builder. What to do with the scores (keep the best model, stop early,
keep an average) is the caller's business. `score_test` reports a finished model on a held-out
set (`nmt train --test`): beam search, BLEU and chrF, examples; it decides nothing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nmt import atomic, checkpoint
from nmt.batching import pad_batch
from nmt.config import DecodeConfig
from nmt.corpus import ParallelCorpus
from nmt.errors import NmtError
from nmt.model import eval_mode
from nmt.runtime import Runtime
from nmt.tokenizer import PAD_ID, Vocabs, encode_batch

log = logging.getLogger(__name__)

LOSS_BATCH = 64  # sentences per dev-loss batch
DEV_BATCH_TOKENS = 6000  # source tokens per greedy batch


def check_dev(dev: ParallelCorpus, training: bool = True) -> int:
    """Read the whole dev set once: unequal line counts, invalid UTF-8 (file and line, from the
    reader), an empty line on either side (a pair that BLEU cannot score fairly) or no pairs at all
    is an error (`training`: its message offers --dev none); returns the pairs."""
    return _check_held_out(dev, "dev", ", or --dev none" if training else "", empty_lines=False)


def check_test(test: ParallelCorpus) -> int:
    """Read the whole test set of `nmt train --test` once, before the training: unequal line counts,
    invalid UTF-8 or no pairs at all is an error now, not after hours of training (an empty line is
    a line to translate, as `nmt translate` does); returns the pairs."""
    return _check_held_out(test, "test", ", or leave out --test", empty_lines=True)


def _check_held_out(corpus: ParallelCorpus, name: str, hint: str, empty_lines: bool) -> int:
    corpus.check_line_counts()
    n = 0
    for n, (src, tgt) in enumerate(corpus.pairs(), start=1):
        for path, text in ((corpus.src_path, src), (corpus.tgt_path, tgt)):
            if not empty_lines and not text.strip():
                raise NmtError(f"{path}: line {n} is empty (every {name} pair needs text on both sides: "
                               f"remove the pair or fix the line)")
    if n == 0:
        raise NmtError(f"{corpus.src_path}, {corpus.tgt_path}: the {name} set is empty (give a {name} set with "
                       f"lines{hint})")
    return n


@torch.inference_mode()
def evaluate_devs(model, vocabs: Vocabs, devs, runtime: Runtime, max_sentences: int = 0,
                  ) -> tuple[float, str, float, dict[str, float]]:
    """`evaluate_dev` over the dev sets of several directions (`mixing.DevSet`s, each with its
    tag): (mean dev BLEU, the first's signature, mean dev loss, BLEU per direction)."""
    results = {d.name: evaluate_dev(model, vocabs, d.corpus, runtime, max_sentences, d.src_prefix) for d in devs}
    first = next(iter(results.values()))
    mean = lambda i: sum(r[i] for r in results.values()) / len(results)  # noqa: E731
    return mean(0), first[1], mean(2), {name: r[0] for name, r in results.items()}


def evaluate_dev(model, vocabs: Vocabs, dev: ParallelCorpus, runtime: Runtime, max_sentences: int = 0,
                 src_prefix: tuple[int, ...] = ()) -> tuple[float, str, float]:
    """(dev BLEU, its sacreBLEU signature, dev loss per target token); the model's train/eval
    mode is restored afterwards. `src_prefix`: ids before every source (a target-language tag)."""
    from nmt import metrics
    from nmt.translate import Translator

    pairs = list(dev.pairs())
    if max_sentences:
        pairs = pairs[:max_sentences]
    with eval_mode(model):
        translator = Translator.from_model(model, vocabs, runtime, DecodeConfig(beam_size=1, batch_tokens=DEV_BATCH_TOKENS,
                                                                                 guard=False), src_prefix)
        hyps = [t.text for t in translator.translate(s for s, _ in pairs)]
        bleu_metric = metrics.build_metrics(metrics.MetricOptions(metrics=("bleu",)), [[t for _, t in pairs]])
        record = metrics.corpus_scores(hyps, bleu_metric)["bleu"]
        loss = dev_loss(model, vocabs, runtime, pairs, src_prefix)
    return record["score"], record["signature"], loss


def dev_loss(model, vocabs: Vocabs, runtime: Runtime, pairs: list[tuple[str, str]],
             src_prefix: tuple[int, ...] = ()) -> float:
    """Σ cross-entropy / Σ target tokens (EOS included), both sides cut to the source-length limit."""
    src_ids = [[*src_prefix, *ids] for ids in encode_batch(vocabs.src, [s for s, _ in pairs])]
    tgt_ids = encode_batch(vocabs.tgt, [t for _, t in pairs])
    total, count = 0.0, 0
    for i in range(0, len(pairs), LOSS_BATCH):
        batch = pad_batch(src_ids[i : i + LOSS_BATCH], tgt_ids[i : i + LOSS_BATCH],
                          max_positions=model.config.max_positions).to(runtime.device)
        with runtime.autocast():
            logits = model(batch.src, batch.tgt_in)  # [B, T, V]
        total += F.cross_entropy(logits.float().transpose(1, 2), batch.tgt_out, ignore_index=PAD_ID,
                                 reduction="sum").item()
        count += int((batch.tgt_out != PAD_ID).sum())
    return total / max(count, 1)


def score_test(out: Path, test: ParallelCorpus, runtime: Runtime, src_prefix: tuple[int, ...] = (),
               examples: int = 3) -> dict:
    """The final model of `out` on a held-out set, reported, never used for a decision: beam search
    (the translate defaults), BLEU and chrF with signatures, the translations written to OUT/test.hyp,
    a few lines shown, and the record kept in training.json."""
    from nmt import metrics
    from nmt.translate import Translator

    model, vocabs, _ = checkpoint.load_for_inference(out, runtime.device)
    pairs = list(test.pairs())
    decode = DecodeConfig()
    t0 = time.monotonic()
    hyps = [t.text for t in Translator.from_model(model, vocabs, runtime, decode, src_prefix).translate(s for s, _ in pairs)]
    seconds = time.monotonic() - t0
    atomic.write_text(out / "test.hyp", "".join(h + "\n" for h in hyps))
    bleu = metrics.build_metrics(metrics.MetricOptions(metrics=("bleu", "chrf")), [[t for _, t in pairs]])
    scores = metrics.corpus_scores(hyps, bleu)
    record = {"source": str(test.src_path), "reference": str(test.tgt_path), "lines": len(pairs),
              "beam_size": decode.beam_size, "seconds": seconds,
              **{name: {"score": r["score"], "signature": r["signature"]} for name, r in scores.items()}}
    for (src, ref), hyp in list(zip(pairs, hyps))[:examples]:
        log.info("test example\n  source:     %s\n  translated: %s\n  reference:  %s", src, hyp, ref)
    log.info("test BLEU %.1f, chrF %.1f on %s (%d lines, beam %d, %.0f s); %s", scores["bleu"]["score"],
             scores["chrf"]["score"], test.src_path.name, len(pairs), decode.beam_size, seconds,
             scores["bleu"]["signature"])
    summary_path = out / "training.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    atomic.write_text(summary_path, json.dumps({**summary, "test": record}, indent=2))
    return record
