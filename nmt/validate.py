"""Dev scoring: how good a model is on a dev set, as training and checkpoint averaging need it.

Dev BLEU is sacreBLEU on detokenised greedy output (the same `Translator` as `nmt translate`,
so the same line contract and source-length limit), with its signature; dev loss is the
cross-entropy per target token under teacher forcing (no label smoothing), over batches from
the one padded-batch builder. What to do with the scores (keep the best model, stop early,
keep an average) is the caller's business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmt.batching import pad_batch
from nmt.config import DecodeConfig
from nmt.corpus import ParallelCorpus
from nmt.runtime import Runtime
from nmt.tokenizer import PAD_ID, Vocabs, encode_batch

LOSS_BATCH = 64  # sentences per dev-loss batch
DEV_BATCH_TOKENS = 6000  # source tokens per greedy batch


@torch.inference_mode()
def evaluate_dev(model, vocabs: Vocabs, dev: ParallelCorpus, runtime: Runtime, max_sentences: int = 0,
                 ) -> tuple[float, str, float]:
    """(dev BLEU, its sacreBLEU signature, dev loss per target token); the model's train/eval
    mode is restored afterwards."""
    from nmt import metrics
    from nmt.translate import Translator

    pairs = list(dev.pairs())
    if max_sentences:
        pairs = pairs[:max_sentences]
    was_training = model.training
    model.eval()
    translator = Translator.from_model(model, vocabs, runtime, DecodeConfig(beam_size=1, batch_tokens=DEV_BATCH_TOKENS))
    hyps = [t.text for t in translator.translate(s for s, _ in pairs)]
    bleu_metric = metrics.build_metrics(metrics.MetricOptions(metrics=("bleu",)), [[t for _, t in pairs]])
    record = metrics.corpus_scores(hyps, bleu_metric)["bleu"]
    loss = dev_loss(model, vocabs, runtime, pairs)
    model.train(was_training)
    return record["score"], record["signature"], loss


def dev_loss(model, vocabs: Vocabs, runtime: Runtime, pairs: list[tuple[str, str]]) -> float:
    """Σ cross-entropy / Σ target tokens (EOS included), both sides cut to the source-length limit."""
    src_ids = encode_batch(vocabs.src, [s for s, _ in pairs])
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
