"""Search engines: what `Translator` calls to turn a batch of source ids into n-best hypotheses.

Everything that is the same for every way of decoding (windows, sorting, batching, order, empty
lines, truncation, detokenising, stats) is `Translator`'s; an engine only searches. An engine is
anything with the `Engine` protocol: `max_positions` (the source-length limit derives from it)
and `search(sources, prefixes, no_repeat_ngram, attention) → hypotheses`, taking source ids
without specials, at most `batching.max_source_tokens(max_positions)` each, and returning each
sentence's hypotheses, best first, as `search.Hypothesis` (tokens without BOS/EOS,
log-probability with EOS, length-penalised score, whether the cap was hit). `prefixes` (target
ids per sentence, or None) are forced at the start of every hypothesis, and the log-probability
covers them; `no_repeat_ngram` (None: the config's) bans repeated n-grams for this call (the loop
guard's retries); `attention` fills each hypothesis' `attention`, the cross-attention rows
[len(tokens)][len(source)] that word alignments are read from. Every engine here also has
`score(sources, targets) → per-token log-probabilities` (teacher forcing; targets without
specials and within the same limit; one value per target token and one for EOS), which
`Translator.score` and `nmt score` use.

The engines:

    BeamSearch, Greedy, Sampling   nmt's own searches (`nmt.search`) over a model
    NaiveGreedy                    the no-cache reference decoder (recomputes every prefix)
    CTranslate2                    a directory written by `nmt export` (`is_ctranslate2_dir`)

`for_model` picks nmt's engine for a DecodeConfig; `CTranslate2.load` opens an export.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import torch

from nmt.batching import pad_batch
from nmt.config import DecodeConfig, is_sampling
from nmt.errors import NmtError
from nmt.runtime import Runtime
from nmt.search import (Hypothesis, SentenceResult, beam_search, greedy, greedy_no_cache, max_lengths, penalty_of,
                        sample)

from nmt.tokenizer import EOS_ID, SPECIALS, Vocabs


class Engine(Protocol):
    max_positions: int

    def search(self, sources: list[list[int]], prefixes: list[list[int]] | None = None,
               no_repeat_ngram: int | None = None, attention: bool = False) -> list[list[Hypothesis]]:
        """The hypotheses of each source (ids without specials), best first."""

    def score(self, sources: list[list[int]], targets: list[list[int]]) -> list[list[float]]:
        """log p(token | source, prefix) of each target token and of the EOS after them."""


# -- nmt's own searches -------------------------------------------------------------------------


class _ModelEngine:
    """A search function of `nmt.search` over the model, on the runtime's device and dtype."""

    def __init__(self, model, runtime: Runtime, config: DecodeConfig):
        self.model, self.runtime, self.config = model, runtime, config
        self.max_positions = model.config.max_positions

    def search(self, sources: list[list[int]], prefixes: list[list[int]] | None = None,
               no_repeat_ngram: int | None = None, attention: bool = False) -> list[list[Hypothesis]]:
        config = self.config
        if no_repeat_ngram is not None:
            config = dataclasses.replace(config, no_repeat_ngram=no_repeat_ngram)
        src = pad_batch(sources, max_positions=self.max_positions).src.to(self.runtime.device)
        with self.runtime.autocast():
            found = [r.hypotheses for r in self._run(src, config, prefixes)]
            if attention:
                self._attach_attention(sources, found)
        return found

    def _attach_attention(self, sources: list[list[int]], found: list[list[Hypothesis]]) -> None:
        """One teacher-forced decoder pass over all hypotheses of the batch: the cross-attention
        the search computed along each (`attention_maps.alignment_attention`)."""
        from nmt.attention_maps import alignment_attention

        pairs = [(s, h) for s, hyps in zip(sources, found) for h in hyps]
        weights = alignment_attention(self.model, [s for s, _ in pairs], [h.tokens for _, h in pairs])
        for (_, h), w in zip(pairs, weights):
            h.attention = w.tolist()

    @torch.inference_mode()
    def score(self, sources: list[list[int]], targets: list[list[int]]) -> list[list[float]]:
        """Teacher forcing over a batch from the one padded-batch builder: the log-softmax of
        the logits in float32 (as the searches take it), gathered at each next target token."""
        batch = pad_batch(sources, targets, max_positions=self.max_positions).to(self.runtime.device)
        with self.runtime.autocast():
            logits = self.model(batch.src, batch.tgt_in)  # [B, T, V]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(2, batch.tgt_out[:, :, None])[:, :, 0]  # [B, T]
        return [row[: len(t) + 1] for row, t in zip(logp.cpu().tolist(), targets)]

    def _run(self, src: torch.Tensor, config: DecodeConfig, prefixes) -> list[SentenceResult]:
        raise NotImplementedError


class BeamSearch(_ModelEngine):
    def _run(self, src, config, prefixes):
        return beam_search(self.model, src, config, prefixes)


class Greedy(_ModelEngine):
    def _run(self, src, config, prefixes):
        return greedy(self.model, src, config, prefixes)


class Sampling(_ModelEngine):
    """One sample per sentence; the generator is seeded once, so a run is reproducible."""

    def __init__(self, model, runtime: Runtime, config: DecodeConfig):
        super().__init__(model, runtime, config)
        self.generator = torch.Generator(device=runtime.device).manual_seed(config.seed)

    def _run(self, src, config, prefixes):
        return sample(self.model, src, config, self.generator, prefixes)


class NaiveGreedy(_ModelEngine):
    def _run(self, src, config, prefixes):
        return greedy_no_cache(self.model, src, config, prefixes)


def for_model(model, runtime: Runtime, config: DecodeConfig) -> _ModelEngine:
    """Sampling when any sampling option is set, else greedy for beam 1, else beam search."""
    if is_sampling(config):
        return Sampling(model, runtime, config)
    return Greedy(model, runtime, config) if config.beam_size <= 1 else BeamSearch(model, runtime, config)


# -- CTranslate2 --------------------------------------------------------------------------------


def is_ctranslate2_dir(directory: Path) -> bool:
    """A directory written by `nmt export` (it has the export's metadata file)."""
    from nmt.export import EXPORT_META

    return (Path(directory) / EXPORT_META).is_file()


class CTranslate2:
    """An exported model behind the same interface, with our options mapped onto
    `ctranslate2.Translator.translate_batch`:

    - beam_size, nbest → beam_size, num_hypotheses; min_length → min_decoding_length (both ban
      EOS for the first min_length steps).
    - The cap a·|source| + b (EOS counted, clamped to max_positions - 1) has no CTranslate2
      equivalent: max_decoding_length is one number per call and counts tokens without EOS, and
      at the cap CTranslate2 simply stops where we force EOS. So each call gets
      max_decoding_length = cap - 1: with `exact_caps` the sentences of a batch are grouped by
      cap (one call per distinct cap: exact, smaller batches); without it a batch is one call
      with its largest cap and longer outputs are cut to their own cap afterwards (greedy
      tokens stay exact; beam search may rank differently on lines that reach their cap).
      Either way a capped hypothesis scores without the EOS we would force.
    - length_penalty α: CTranslate2 divides by |Y|^α with |Y| counting EOS (return_end_token,
      then stripped), our length_norm="average" exactly. Its score times |Y|^α is the
      log-probability, which is then scored with our own penalty, so "gnmt" ranks the n-best
      list CTranslate2 found by ((5 + |Y|) / 6)^α.
    - Beam search stops once K hypotheses have finished (CTranslate2's patience 1); ours goes on
      while a live beam could still win, so with a length penalty the two can differ. With
      α = 0 both return the most probable finished hypothesis.
    - Sampling maps to sampling_topk (0 = whole vocabulary), sampling_topp, sampling_temperature;
      the random streams differ, so samples do not match ours.
    - Forced prefixes map to target_prefix (its max_decoding_length counts the prefix, as our cap
      does, raised to the prefix + EOS like ours). CTranslate2's score leaves the prefix tokens
      out, so a prefixed line's hypotheses are scored again with `score_batch`: the reported
      score covers the whole hypothesis (EOS included, also at the cap), as ours does.
    - no_repeat_ngram maps to no_repeat_ngram_size (the same tokens as ours; its scores are
      renormalised over the allowed tokens, so those hypotheses are rescored too); alignments read return_attention, which
      averages the heads and layer chosen at export (`export.build_spec`, the same as ours for
      an export written by this version).
    """

    def __init__(self, translator: Any, vocabs: Vocabs, max_positions: int, config: DecodeConfig,
                 exact_caps: bool = True, record: dict[str, Any] | None = None):
        from nmt.export import vocab_tokens

        self.translator, self.vocabs, self.max_positions = translator, vocabs, max_positions
        self.config, self.exact_caps = config, exact_caps
        self.record = record or {}  # the export's nmt_export.json, as `load` read and checked it
        self.src_tokens = vocab_tokens(vocabs.src)
        self.tgt_tokens = vocab_tokens(vocabs.tgt)
        self.tgt_ids = {t: i for i, t in enumerate(self.tgt_tokens)}

    @staticmethod
    def load(ct2_dir: Path, config: DecodeConfig, compute_type: str = "default", threads: int = 0,
             device: str = "cpu", exact_caps: bool = True) -> "CTranslate2":
        """Open an exported directory: the translator (`threads` = CTranslate2's intra_threads; 0:
        as many as torch uses, all cores, as for nmt's own engine, where CTranslate2's own default
        would be 4), the tokenizer(s) and max_positions saved beside it."""
        from nmt.export import EXPORT_FORMAT, EXPORT_META, ctranslate2_module, read_export_record

        ct2 = ctranslate2_module()
        ct2_dir = Path(ct2_dir)
        meta = read_export_record(ct2_dir)
        if meta.get("format") != EXPORT_FORMAT:
            raise NmtError(f"{ct2_dir / EXPORT_META}: format is not {EXPORT_FORMAT!r}")
        max_positions = meta.get("max_positions")
        if not (isinstance(max_positions, int) and not isinstance(max_positions, bool) and max_positions >= 2):
            raise NmtError(f"{ct2_dir / EXPORT_META}: max_positions is {str(max_positions)[:40]!r}, not a whole number "
                           f"≥ 2 (export the model again)")
        vocabs = Vocabs.load(ct2_dir)
        if meta.get("vocab_fingerprint") != vocabs.fingerprint():  # ids would name other pieces: garbage or a crash
            raise NmtError(f"{ct2_dir}: its tokenizer is not the one the model was exported with "
                           f"({EXPORT_META} names another; export the model again)")
        try:
            translator = ct2.Translator(str(ct2_dir), device=device, compute_type=compute_type,
                                        inter_threads=1, intra_threads=threads or torch.get_num_threads())
        except (RuntimeError, ValueError) as e:
            raise NmtError(f"{ct2_dir}: CTranslate2 cannot load it ({str(e).splitlines()[0][:200]})") from None
        # sampling: CTranslate2 seeds each thread's generator at its first use from this seed (by
        # default from std::random_device), so a run is reproducible as with nmt's own engine
        ct2.set_random_seed(config.seed)
        return CTranslate2(translator, vocabs, max_positions, config, exact_caps, meta)

    @property
    def src_language(self) -> str | None:
        src = self.record.get("src")  # written by exports since --split-sentences; older ones: None
        return src if isinstance(src, str) else None

    def with_config(self, config: DecodeConfig) -> "CTranslate2":
        """The same loaded translator under other decoding options (nothing is reloaded; the
        sampling seed is set again, for the threads that have not sampled yet)."""
        from nmt.export import ctranslate2_module

        ctranslate2_module().set_random_seed(config.seed)
        return CTranslate2(self.translator, self.vocabs, self.max_positions, config, self.exact_caps, self.record)

    def score(self, sources: list[list[int]], targets: list[list[int]]) -> list[list[float]]:
        """`score_batch`: CTranslate2 starts the target with the decoder start token (our BOS)
        and appends EOS itself, and returns one log-probability per target token and EOS."""
        results = self.translator.score_batch(
            [[self.src_tokens[i] for i in s] for s in sources], [[self.tgt_tokens[i] for i in t] for t in targets],
            max_batch_size=self.config.batch_tokens, batch_type="tokens", max_input_length=0)
        return [list(r.log_probs) for r in results]

    def search(self, sources: list[list[int]], prefixes: list[list[int]] | None = None,
               no_repeat_ngram: int | None = None, attention: bool = False) -> list[list[Hypothesis]]:
        c = self.config
        prefixes = [list(p)[: self.max_positions - 2] for p in prefixes] if prefixes else [[] for _ in sources]
        # The very function our search uses (float32 arithmetic included), on lengths with EOS.
        caps = max_lengths(torch.tensor([len(s) + 1 for s in sources]), c.max_length_a, c.max_length_b,
                           self.max_positions).tolist()
        caps = [max(cap, len(p) + 1) for cap, p in zip(caps, prefixes)]
        groups: dict[int, list[int]] = {}
        for j, cap in enumerate(caps):
            groups.setdefault(cap if self.exact_caps else 0, []).append(j)
        results: list[list[Hypothesis]] = [[] for _ in sources]
        ngram = c.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram
        for group in groups.values():
            found = self._call([sources[j] for j in group], [caps[j] for j in group], [prefixes[j] for j in group],
                               ngram, attention)
            for j, hyps in zip(group, found):
                results[j] = hyps
        return results

    def _call(self, seqs: list[list[int]], caps: list[int], prefixes: list[list[int]], ngram: int,
              attention: bool) -> list[list[Hypothesis]]:
        c = self.config
        limit = max(caps) - 1  # CTranslate2 counts output tokens without EOS
        if limit < 1:  # a cap of 1 leaves room for EOS only: the empty translation
            return [[Hypothesis([], 0.0, 0.0, True, attention=[] if attention else None)] for _ in seqs]
        sampling = is_sampling(c)
        has_prefix = any(prefixes)
        outputs = self.translator.translate_batch(
            [[self.src_tokens[i] for i in s] for s in seqs],
            target_prefix=[[self.tgt_tokens[i] for i in p] for p in prefixes] if has_prefix else None,
            max_batch_size=c.batch_tokens, batch_type="tokens",
            beam_size=1 if sampling else c.beam_size, num_hypotheses=1 if sampling else c.nbest,
            length_penalty=c.length_penalty, max_input_length=0, max_decoding_length=limit,
            min_decoding_length=min(c.min_length, limit), return_end_token=True, return_scores=True,
            sampling_topk=(c.sampling_topk or 0) if sampling else 1, sampling_topp=c.sampling_topp or 1.0,
            sampling_temperature=c.temperature, no_repeat_ngram_size=ngram, return_attention=attention,
        )
        eos = SPECIALS[EOS_ID]
        results = []
        for out, cap, source, prefix in zip(outputs, caps, seqs, prefixes):
            hyps = []
            for k, (tokens, score) in enumerate(zip(out.hypotheses, out.scores)):
                ended = bool(tokens) and tokens[-1] == eos
                length = len(tokens)  # EOS included when it ended, as CTranslate2 normalised it
                ids = [self.tgt_ids[t] for t in (tokens[:-1] if ended else tokens)[: cap - 1]]
                logprob = score * (length**c.length_penalty if c.length_penalty and length else 1.0)
                n = len(ids) + 1
                hyp = Hypothesis(ids, logprob, logprob / penalty_of(n, c), n >= cap)
                if attention:
                    hyp.attention = [list(row[: len(source)]) for row in out.attention[k][: len(ids)]]
                hyps.append(hyp)
            if prefix or ngram:
                self._rescore(source, hyps)
            results.append(sorted(hyps, key=lambda h: h.score, reverse=True))
        return results

    def _rescore(self, source: list[int], hyps: list[Hypothesis]) -> None:
        """CTranslate2's score of a prefixed hypothesis leaves the prefix tokens out (and, at the
        cap, the EOS we force), and under no_repeat_ngram_size it is the log-probability of the
        banned distribution renormalised: `score_batch` gives the model's log-probability of
        the whole hypothesis, as our searches report it."""
        for h, logps in zip(hyps, self.score([source] * len(hyps), [h.tokens for h in hyps])):
            h.logprob = sum(logps)
            h.score = h.logprob / penalty_of(len(logps), self.config)
