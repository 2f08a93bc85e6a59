"""Search over token ids: greedy, sampling and batched beam search, all with the decoder cache.

Beam search is a loop of short named steps over fixed-shape tensors (after Sockeye and
fairseq): score the next tokens, pick the top 2·K candidates per sentence (so hypotheses that
end do not starve the beam), move those that end to the finished list, keep the best K that
go on, reorder the cache, and let sentences with K finished hypotheses leave the batch.
The length of a hypothesis counts its end-of-sentence token.

Shapes: B sentences still decoding, K beam, V vocabulary, S source length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nmt.config import DecodeConfig


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    logprob: float  # natural-log probability of tokens + EOS under the model
    score: float  # logprob normalised by the length penalty (what the search ranks by)
    hit_max_length: bool = False


@dataclass
class SentenceResult:
    hypotheses: list[Hypothesis] = field(default_factory=list)  # best first


def length_penalty(length: Tensor | int, alpha: float, kind: str = "gnmt") -> Tensor | float:
    """GNMT: ((5 + |Y|) / 6)^α (Wu et al. 2016); "average": |Y|^α. α = 0 means no normalisation."""
    if kind == "average":
        return length**alpha
    return ((5 + length) / 6) ** alpha


def max_lengths(src_lengths: Tensor, a: float, b: int, max_positions: int) -> Tensor:
    """Per-sentence cap on output tokens (EOS included): a·|source| + b, within the model's positions."""
    return (src_lengths.float() * a + b).floor().long().clamp(min=1, max=max_positions - 1)


def _next_logprobs(model, tokens: Tensor, cache, step: int, min_len: int, max_len: Tensor, eos_id: int) -> Tensor:
    """log p(next | prefix) as float32 [N, V], with EOS banned before min_len and forced at max_len."""
    logp = torch.log_softmax(model.decode_step(tokens, cache).float(), dim=-1)
    if step < min_len:
        logp[:, eos_id] = -math.inf
    forced = step + 1 >= max_len  # [N]: this is the last token allowed
    if forced.any():
        eos_row = torch.full_like(logp[0], -math.inf)
        eos_row[eos_id] = 0.0
        # keep the real EOS probability for the score, ban everything else
        logp[forced] = torch.where(eos_row == 0, logp[forced], eos_row)
    return logp


# -- greedy and sampling ------------------------------------------------------------------------


@torch.inference_mode()
def greedy(model, src: Tensor, config: DecodeConfig, generator: torch.Generator | None = None) -> list[SentenceResult]:
    """Pick the most probable token (or sample, when the config asks) until EOS, per sentence."""
    c = model.config
    memory, src_mask = model.encode(src)
    lengths = (src != c.pad_id).sum(1)
    max_len = max_lengths(lengths, config.max_length_a, config.max_length_b, c.max_positions)
    cache = model.init_cache(memory, src_mask, 1, int(max_len.max()))
    active = torch.arange(src.shape[0], device=src.device)  # original index of each row
    tokens = torch.full((src.shape[0],), c.bos_id, dtype=torch.long, device=src.device)
    out: list[list[int]] = [[] for _ in range(src.shape[0])]
    logprob = torch.zeros(src.shape[0], device=src.device)
    results = [SentenceResult() for _ in range(src.shape[0])]
    for step in range(int(max_len.max())):
        logp = _next_logprobs(model, tokens, cache, step, config.min_length, max_len[active], c.eos_id)
        tokens = _pick(logp, config, generator)
        logprob[active] += logp.gather(1, tokens[:, None])[:, 0]
        done = tokens == c.eos_id
        for row, tok in zip(active.tolist(), tokens.tolist()):
            if tok != c.eos_id:
                out[row].append(tok)
        for row in active[done].tolist():
            n = len(out[row]) + 1
            lp = logprob[row].item()
            results[row].hypotheses.append(Hypothesis(out[row], lp, lp / _lp(n, config), n >= max_len[row].item()))
        if done.all():
            break
        keep = (~done).nonzero()[:, 0]
        if not done.any():
            continue
        cache.keep_sentences(keep, 1)
        active, tokens = active[keep], tokens[keep]
    return results


def _lp(length: int, config: DecodeConfig) -> float:
    return float(length_penalty(length, config.length_penalty, config.length_norm)) if config.length_penalty else 1.0


def _pick(logp: Tensor, config: DecodeConfig, generator: torch.Generator | None) -> Tensor:
    if not (config.sampling_topk or config.sampling_topp) and config.temperature == 1.0 and generator is None:
        return logp.argmax(-1)
    logits = logp / max(config.temperature, 1e-6)
    if config.sampling_topk:
        kth = logits.topk(min(config.sampling_topk, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if config.sampling_topp:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        outside = probs.cumsum(-1) - probs > config.sampling_topp  # tokens after the nucleus is full
        logits = logits.scatter(-1, order, logits.gather(-1, order).masked_fill(outside, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# -- beam search --------------------------------------------------------------------------------


@dataclass
class Candidates:
    scores: Tensor  # [B, 2K] cumulative log-probabilities, best first
    origins: Tensor  # [B, 2K] which beam each extends
    tokens: Tensor  # [B, 2K] the token it adds


def top_candidates(beam_scores: Tensor, logp: Tensor) -> Candidates:
    """The 2·K best one-token extensions of K beams: beam_scores [B, K], logp [B, K, V]."""
    b, k, v = logp.shape
    total = (beam_scores[:, :, None] + logp).view(b, k * v)
    scores, flat = total.topk(min(2 * k, k * v), dim=1)
    return Candidates(scores, flat // v, flat % v)


def split_candidates(cand: Candidates, eos_id: int, beam: int) -> tuple[Tensor, Tensor]:
    """(ends [B, 2K]: EOS candidates among the top K, which finish; goes_on [B, K]: positions of
    the best K candidates that do not end, which form the next beam)."""
    is_eos = cand.tokens == eos_id
    rank = torch.arange(cand.tokens.shape[1], device=cand.tokens.device)
    ends = is_eos & (rank < beam) & cand.scores.isfinite()
    # stable sort puts the non-EOS candidates first in score order
    goes_on = torch.sort(is_eos.to(torch.int8), dim=1, stable=True).indices[:, :beam]
    return ends, goes_on


@torch.inference_mode()
def beam_search(model, src: Tensor, config: DecodeConfig) -> list[SentenceResult]:
    c, k = model.config, config.beam_size
    memory, src_mask = model.encode(src)
    n_sent = src.shape[0]
    max_len = max_lengths((src != c.pad_id).sum(1), config.max_length_a, config.max_length_b, c.max_positions)
    t_max = int(max_len.max())
    cache = model.init_cache(memory, src_mask, k, t_max)
    active = torch.arange(n_sent, device=src.device)
    scores = torch.full((n_sent, k), -math.inf, device=src.device)
    scores[:, 0] = 0.0  # all beams start as the same empty hypothesis: keep one
    history = torch.full((n_sent, k, t_max), c.pad_id, dtype=torch.long, device=src.device)
    last = torch.full((n_sent * k,), c.bos_id, dtype=torch.long, device=src.device)
    finished: list[list[Hypothesis]] = [[] for _ in range(n_sent)]
    for step in range(t_max):
        rows_max = max_len[active].repeat_interleave(k)
        logp = _next_logprobs(model, last, cache, step, config.min_length, rows_max, c.eos_id)
        cand = top_candidates(scores, logp.view(len(active), k, -1))
        ends, goes_on = split_candidates(cand, c.eos_id, k)
        _collect_finished(cand, ends, history, step, active, max_len, finished, config)
        scores, origins, tokens = (x.gather(1, goes_on) for x in (cand.scores, cand.origins, cand.tokens))
        history = history.gather(1, origins[:, :, None].expand_as(history)).clone()
        history[:, :, step] = tokens
        done = _sentences_done(finished, active, scores[:, 0], step, config)
        if done.all():
            break
        rows = torch.arange(len(active), device=src.device)[:, None] * k + origins  # [B, K]
        if done.any():  # one copy both reorders the cache and drops the finished sentences
            keep = (~done).nonzero()[:, 0]
            cache.reorder(rows[keep].view(-1), keep)
            active, scores, history, tokens = active[keep], scores[keep], history[keep], tokens[keep]
        else:
            cache.reorder(rows.view(-1))
        last = tokens.reshape(-1)
    return [_best(hyps, config.nbest) for hyps in finished]


def _collect_finished(cand: Candidates, ends: Tensor, history: Tensor, step: int, active: Tensor,
                      max_len: Tensor, finished: list[list[Hypothesis]], config: DecodeConfig) -> None:
    """Candidates that end with EOS join their sentence's finished list (the K best are kept),
    scored with the length penalty."""
    for row, pos in ends.nonzero().tolist():
        sentence = int(active[row])
        logprob = float(cand.scores[row, pos])
        length = step + 1
        hyp = Hypothesis(history[row, int(cand.origins[row, pos]), :step].tolist(), logprob,
                         logprob / _lp(length, config), length >= int(max_len[sentence]))
        kept = finished[sentence]
        if len(kept) < config.beam_size:
            kept.append(hyp)
        elif hyp.score > min(h.score for h in kept):
            kept.remove(min(kept, key=lambda h: h.score))
            kept.append(hyp)


def _sentences_done(finished: list[list[Hypothesis]], active: Tensor, best_live: Tensor, step: int,
                    config: DecodeConfig) -> Tensor:
    """A sentence is done when the n-best list it will return is settled: it has nbest finished
    hypotheses and its best live one, ending at the next step, would not beat the nbest-th of
    them (exact without a length penalty, since log-probabilities only fall; with one, the
    usual heuristic). Waiting for K finished hypotheses instead (fairseq's rule) decodes longer:
    without a length penalty for the same output; with the default one, measured on the
    Bible test set (small model, beam 5), 11% slower, 25 of 300 lines different, and BLEU
    19.85 instead of 19.77 on 500 lines (CTranslate2: 19.74)."""
    bound = best_live.tolist()
    penalty = _lp(step + 2, config)
    done = []
    for i, sentence in enumerate(active.tolist()):
        kept = finished[sentence]
        done.append(len(kept) >= config.nbest and
                    bound[i] / penalty <= sorted((h.score for h in kept), reverse=True)[config.nbest - 1])
    return torch.tensor(done, device=active.device)


def _best(hyps: list[Hypothesis], nbest: int) -> SentenceResult:
    return SentenceResult(sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest])


# -- reference decoder --------------------------------------------------------------------------


@torch.inference_mode()
def greedy_no_cache(model, src: Tensor, max_len_a: float, max_len_b: int) -> list[list[int]]:
    """Greedy decoding that recomputes the whole prefix at every step: the naive baseline that
    tests and benchmarks compare the cached search against."""
    c = model.config
    memory, src_mask = model.encode(src)
    max_len = max_lengths((src != c.pad_id).sum(1), max_len_a, max_len_b, c.max_positions)
    prefix = torch.full((src.shape[0], 1), c.bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for step in range(int(max_len.max())):
        logits = model.decode(prefix, memory, src_mask)[:, -1].float()
        nxt = logits.argmax(-1)
        nxt = torch.where(step + 1 >= max_len, torch.full_like(nxt, c.eos_id), nxt)
        nxt = torch.where(done, torch.full_like(nxt, c.pad_id), nxt)
        prefix = torch.cat([prefix, nxt[:, None]], dim=1)
        done |= nxt == c.eos_id
        if done.all():
            break
    out = []
    for row in prefix[:, 1:].tolist():
        out.append(row[: row.index(c.eos_id)] if c.eos_id in row else row)
    return out
