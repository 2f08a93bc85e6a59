"""Search against independent computations: full recomputation, exhaustive search, a scripted
decoder whose scores are computed by hand, and teacher forcing."""

import itertools
import math

import pytest
import torch

from conftest import tiny_transformer
from nmt.config import DecodeConfig, ModelConfig
from nmt.model import Transformer
from nmt.search import beam_search, greedy, greedy_no_cache, length_penalty, sample, sampling_probs

BOS, EOS, PAD = 2, 3, 0


def tiny(vocab=24, seed=0, d=32) -> Transformer:
    return tiny_transformer(vocab, seed, d)


def sources(lengths, vocab=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, vocab, (n,), generator=g).tolist() + [EOS] for n in lengths]
    src = torch.full((len(rows), max(map(len, rows))), PAD)
    for i, r in enumerate(rows):
        src[i, : len(r)] = torch.tensor(r)
    return src


def teacher_forced_logprob(model, src_row, tokens):
    tgt = torch.tensor([[BOS] + tokens + [EOS]])
    with torch.no_grad():
        logp = torch.log_softmax(model(src_row[None], tgt[:, :-1]).float(), -1)
    return logp[0].gather(1, tgt[0, 1:, None]).sum().item()


def test_cached_decoding_equals_full_recomputation_at_every_step():
    model = tiny()
    src = sources([5, 9, 3])
    memory, mask = model.encode(src)
    steps = torch.randint(4, 24, (3, 12), generator=torch.Generator().manual_seed(3))
    prefix = torch.cat([torch.full((3, 1), BOS), steps], 1)
    cache = model.init_cache(memory, mask, 1, 13)
    with torch.no_grad():
        for t in range(13):
            incremental = model.decode_step(prefix[:, t], cache)
            full = model.decode(prefix[:, : t + 1], memory, mask)[:, -1]
            torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


def test_cached_greedy_equals_the_naive_decoder():
    model = tiny(seed=4)
    src = sources([4, 8, 6, 2, 11])
    cfg = DecodeConfig(beam_size=1, max_length_a=1.5, max_length_b=4, min_length=2)
    cached, naive = greedy(model, src, cfg), greedy_no_cache(model, src, cfg)
    assert [r.hypotheses[0].tokens for r in cached] == [r.hypotheses[0].tokens for r in naive]
    for x, y in zip(cached, naive):
        assert all(len(r.hypotheses[0].tokens) >= 2 for r in (x, y))
        assert x.hypotheses[0].logprob == pytest.approx(y.hypotheses[0].logprob, abs=1e-4)
        assert x.hypotheses[0].hit_max_length == y.hypotheses[0].hit_max_length


def test_beam_size_one_equals_greedy():
    model = tiny(seed=5)
    src = sources([3, 7, 5, 10])
    for alpha in (0.0, 1.0):
        g = greedy(model, src, DecodeConfig(beam_size=1, length_penalty=alpha))
        b = beam_search(model, src, DecodeConfig(beam_size=1, length_penalty=alpha))
        for x, y in zip(g, b):
            assert x.hypotheses[0].tokens == y.hypotheses[0].tokens
            assert x.hypotheses[0].logprob == pytest.approx(y.hypotheses[0].logprob, abs=1e-4)


@pytest.mark.parametrize("alpha,kind", [(0.0, "gnmt"), (1.0, "gnmt"), (1.0, "average")])
def test_large_beam_finds_the_exhaustive_best(alpha, kind):
    """Vocabulary of 6 (4 non-EOS symbols counting pad/unk/bos), at most 4 tokens: score all
    1 + 5 + 25 + 125 possible outputs by teacher forcing and take the best."""
    vocab = 6
    model = tiny(vocab=vocab, seed=7, d=16)
    src = sources([2], vocab=vocab, seed=2)  # source length 3 with EOS → cap = 0·3 + 4
    cfg = DecodeConfig(beam_size=200, nbest=5, length_penalty=alpha, length_norm=kind, max_length_a=0.0,
                       max_length_b=4)
    found = beam_search(model, src, cfg)[0].hypotheses
    others = [t for t in range(vocab) if t != EOS]
    best = []
    for n in range(4):
        for tokens in itertools.product(others, repeat=n):
            lp = teacher_forced_logprob(model, src[0], list(tokens))
            norm = length_penalty(n + 1, alpha, kind) if alpha else 1.0
            best.append((lp / norm, list(tokens)))
    best.sort(key=lambda x: -x[0])
    assert [h.tokens for h in found] == [t for _, t in best[:5]]
    for h, (score, _) in zip(found, best):
        assert h.score == pytest.approx(score, abs=1e-4)


def test_reported_score_equals_teacher_forced_logprob():
    model = tiny(seed=8)
    src = sources([6, 3, 9])
    results = beam_search(model, src, DecodeConfig(beam_size=4, nbest=4, length_penalty=1.0))
    for row, result in enumerate(results):
        assert len(result.hypotheses) == 4
        for h in result.hypotheses:
            lp = teacher_forced_logprob(model, src[row][src[row] != PAD], h.tokens)
            assert h.logprob == pytest.approx(lp, abs=1e-4)
            assert h.score == pytest.approx(lp / length_penalty(len(h.tokens) + 1, 1.0), abs=1e-4)
        scores = [h.score for h in result.hypotheses]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("beam", [1, 4])
def test_a_sentence_alone_equals_it_inside_a_padded_batch(beam):
    model = tiny(seed=9)
    src = sources([2, 12, 5, 8, 1])
    cfg = DecodeConfig(beam_size=beam, nbest=1)
    search = greedy if beam == 1 else beam_search
    together = search(model, src, cfg)
    for i in range(src.shape[0]):
        alone_src = src[i : i + 1, : int((src[i] != PAD).sum())]
        alone = search(model, alone_src, cfg)[0]
        assert alone.hypotheses[0].tokens == together[i].hypotheses[0].tokens
        assert alone.hypotheses[0].score == pytest.approx(together[i].hypotheses[0].score, abs=1e-4)


# -- a scripted decoder: every expected score by hand ------------------------------------------


class ScriptedCache:
    def __init__(self, n):
        self.prefixes = [[] for _ in range(n)]
        self.length = 0

    def reorder(self, rows):
        self.prefixes = [list(self.prefixes[r]) for r in rows.tolist()]

    def keep_sentences(self, sentences, beam):
        self.prefixes = [self.prefixes[s * beam + k] for s in sentences.tolist() for k in range(beam)]


class ScriptedModel:
    """Next-token probabilities looked up by prefix (tuple of tokens); a/b are tokens 4/5."""

    V = 6

    def __init__(self, script):
        self.script = script
        self.config = ModelConfig(src_vocab_size=self.V, tgt_vocab_size=self.V, max_positions=64)

    def encode(self, src):
        return torch.zeros(src.shape[0], src.shape[1], 1), None

    def init_cache(self, memory, mask, beam, max_steps):
        return ScriptedCache(memory.shape[0] * beam)

    def decode_step(self, tokens, cache):
        rows = []
        for prefix, tok in zip(cache.prefixes, tokens.tolist()):
            if tok != BOS:
                prefix.append(tok)
            probs = torch.full((self.V,), 1e-9)
            for t, p in self.script.get(tuple(prefix), {EOS: 1.0}).items():
                probs[t] = p
            rows.append(torch.log(probs / probs.sum()))
        cache.length += 1
        return torch.stack(rows)


A, B = 4, 5
SCRIPT = {(): {EOS: 0.5, A: 0.5}, (A,): {EOS: 0.3, B: 0.7}, (A, B): {EOS: 1.0}}
L = {(): math.log(0.5), (A,): math.log(0.5) + math.log(0.3), (A, B): math.log(0.5) + math.log(0.7)}


def run_scripted(**kw):
    cfg = DecodeConfig(**{"beam_size": 3, "nbest": 3, "max_length_a": 0.0, "max_length_b": 10, **kw})
    hyps = beam_search(ScriptedModel(SCRIPT), torch.tensor([[A, EOS]]), cfg)[0].hypotheses
    return [(tuple(h.tokens), h.score, h.hit_max_length) for h in hyps]


def test_scripted_no_length_penalty_ranks_by_logprob():
    got = run_scripted(length_penalty=0.0)
    assert [g[0] for g in got] == [(), (A, B), (A,)]
    for tokens, score, _ in got:
        assert score == pytest.approx(L[tokens], abs=1e-6)


def test_scripted_average_length_normalisation_prefers_the_long_hypothesis():
    got = run_scripted(length_penalty=1.0, length_norm="average")
    assert [g[0] for g in got] == [(A, B), (), (A,)]
    assert got[0][1] == pytest.approx(L[(A, B)] / 3, abs=1e-6)


def test_scripted_gnmt_penalty_values():
    got = run_scripted(length_penalty=1.0, length_norm="gnmt")
    expected = sorted(((L[t] / ((5 + len(t) + 1) / 6), t) for t in L), reverse=True)
    assert [g[0] for g in got] == [t for _, t in expected]
    for (tokens, score, _), (want, _) in zip(got, expected):
        assert score == pytest.approx(want, abs=1e-6)


def test_scripted_min_length_bans_early_end():
    got = run_scripted(length_penalty=0.0, min_length=2)
    assert got[0][0] == (A, B)
    assert all(len(t) >= 2 for t, _, _ in got)


def test_scripted_max_length_forces_end_and_flags_it():
    # cap = 0·len + 2 tokens: "a" must end at its second token, scored with the real EOS probability
    got = run_scripted(length_penalty=0.0, max_length_b=2)
    assert {g[0] for g in got[:2]} == {(), (A,)}  # the third is one of the 1e-9 symbols
    by_tokens = {g[0]: g for g in got}
    assert by_tokens[(A,)][1] == pytest.approx(L[(A,)], abs=1e-6)
    assert by_tokens[(A,)][2] is True and by_tokens[()][2] is False


# -- sampling, against a fixed distribution ------------------------------------------------------

# A decoder whose next-token distribution never changes: P[t] for the 6 ordinary tokens 4..9,
# (almost) never EOS. With a length cap of 2 every hypothesis is one sampled token then the
# forced EOS, so a batch of N sentences is N independent draws from what the sampler makes of P.
P = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
RANKED = [4, 5, 6, 7, 8, 9]  # most probable first


class FixedCache:
    length = 0

    def reorder(self, rows, sentences=None):
        pass

    def keep_sentences(self, sentences, beam):
        pass


class FixedDecoder:
    def __init__(self, probs=P):
        self.logits = torch.log(probs.clamp(min=1e-12))
        self.config = ModelConfig(src_vocab_size=len(probs), tgt_vocab_size=len(probs), max_positions=64)

    def encode(self, src):
        return torch.zeros(src.shape[0], src.shape[1], 1), None

    def init_cache(self, memory, mask, beam, max_steps):
        return FixedCache()

    def decode_step(self, tokens, cache):
        return self.logits.expand(len(tokens), -1)

    def decode(self, prefix, memory, mask):  # for greedy_no_cache
        return self.logits.expand(prefix.shape[0], prefix.shape[1], -1)


def draws(n=4000, seed=0, **options) -> list[int]:
    cfg = DecodeConfig(beam_size=1, max_length_a=0.0, max_length_b=2, **options)
    results = sample(FixedDecoder(), torch.full((n, 2), 4), cfg, torch.Generator().manual_seed(seed))
    tokens = [r.hypotheses[0].tokens for r in results]
    assert all(len(t) == 1 for t in tokens)
    return [t[0] for t in tokens]


def frequencies(tokens: list[int]) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=len(P)).double() / len(tokens)


def test_top_k_never_emits_a_token_outside_the_k_best():
    tokens = draws(sampling_topk=3)
    assert set(tokens) == set(RANKED[:3])  # all of the 3 best, nothing else
    expected = P.double() * torch.tensor([t in RANKED[:3] for t in range(len(P))])
    assert torch.allclose(frequencies(tokens), expected / expected.sum(), atol=0.03)


def test_top_p_never_emits_a_token_outside_the_nucleus():
    # the nucleus for p = 0.6 is {0.40, 0.25}: the smallest set of most probable tokens reaching 0.6
    tokens = draws(sampling_topp=0.6)
    assert set(tokens) == set(RANKED[:2])
    assert torch.allclose(frequencies(tokens)[4:6], torch.tensor([0.40, 0.25]).double() / 0.65, atol=0.03)
    assert set(draws(n=500, sampling_topp=0.3)) == {RANKED[0]}  # the best token alone reaches 0.3


def test_temperature_sharpens_or_flattens_the_distribution_as_p_to_the_power_1_over_t():
    logp = torch.log(P.clamp(min=1e-12))[None]
    for t in (0.5, 1.0, 2.0):
        want = P.double() ** (1 / t)
        want = want / want.sum()
        got = sampling_probs(logp, DecodeConfig(temperature=t))[0].double()
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(frequencies(draws(temperature=t)), want, atol=0.03)
    flat, sharp = sampling_probs(logp, DecodeConfig(temperature=2.0))[0], sampling_probs(logp, DecodeConfig(temperature=0.5))[0]
    assert flat[4] < P[4] < sharp[4] and flat[9] > P[9] > sharp[9]


def test_different_seeds_give_different_samples_and_the_same_seed_the_same():
    a, b, c = draws(n=200, seed=1, sampling_topk=4), draws(n=200, seed=1, sampling_topk=4), draws(n=200, seed=2, sampling_topk=4)
    assert a == b and a != c


def test_top_1_sampling_is_greedy_on_a_real_model():
    model = tiny(seed=11)
    src = sources([5, 7])
    sampled = sample(model, src, DecodeConfig(beam_size=1, sampling_topk=1), torch.Generator().manual_seed(0))
    plain = greedy(model, src, DecodeConfig(beam_size=1))
    assert [r.hypotheses[0].tokens for r in sampled] == [r.hypotheses[0].tokens for r in plain]


# -- forced prefixes and the n-gram ban ---------------------------------------------------------


@pytest.mark.parametrize("search", ["greedy", "beam", "naive"])
def test_a_forced_prefix_starts_every_hypothesis_and_is_scored(search):
    """Each hypothesis starts with its sentence's prefix; the reported log-probability is the
    teacher-forced one of the whole hypothesis (prefix included); an empty prefix is no prefix."""
    model = tiny(seed=4)
    src = sources([5, 3, 7, 4], seed=5)
    prefixes = [[7, 8, 9], [], [10], [11, 12, 13, 14, 15]]
    cfg = DecodeConfig(beam_size=1 if search != "beam" else 3, nbest=1 if search != "beam" else 3,
                       length_penalty=0.0, max_length_a=0.0, max_length_b=8)
    run = {"greedy": greedy, "beam": beam_search, "naive": greedy_no_cache}[search]
    results = run(model, src, cfg, prefixes)
    plain = run(model, src, cfg)
    for i, (r, p) in enumerate(zip(results, prefixes)):
        for h in r.hypotheses:
            assert h.tokens[: len(p)] == p
            row = src[i, : int((src[i] != PAD).sum())]
            assert h.logprob == pytest.approx(teacher_forced_logprob(model, row, h.tokens), abs=1e-4)
    assert [h.tokens for h in results[1].hypotheses] == [h.tokens for h in plain[1].hypotheses]
    assert results[3].hypotheses[0].tokens[:5] == prefixes[3] and len(results[3].hypotheses[0].tokens) <= 7


def test_cached_greedy_equals_the_naive_decoder_with_prefix_and_ngram_ban():
    model = tiny(seed=6)
    src = sources([4, 6, 2], seed=7)
    cfg = DecodeConfig(beam_size=1, max_length_a=0.0, max_length_b=14, no_repeat_ngram=2)
    prefixes = [[5, 5], [], [9]]
    a, b = greedy(model, src, cfg, prefixes), greedy_no_cache(model, src, cfg, prefixes)
    assert [r.hypotheses[0].tokens for r in a] == [r.hypotheses[0].tokens for r in b]


def _brute_force_greedy_without_repeats(probs: torch.Tensor, n: int, steps: int) -> list[int]:
    """The most probable token at each step among those that repeat no n-gram (fixed distribution)."""
    out: list[int] = []
    ranked = probs.argsort(descending=True).tolist()
    for _ in range(steps):
        grams = {tuple(out[i : i + n]) for i in range(len(out) - n + 1)}
        out.append(next(t for t in ranked if tuple(out[len(out) - n + 1 :] + [t]) not in grams or n > len(out) + 1))
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("beam", [1, 2])
def test_no_repeat_ngram_bans_exactly_the_repeats(n, beam):
    """A decoder that always prefers token 4 loops on it; with the ban the output is what a
    brute-force choice among the non-repeating tokens gives, and never repeats an n-gram."""
    probs = torch.tensor([0.0, 0.0, 0.0, 1e-6, 0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
    cfg = DecodeConfig(beam_size=beam, max_length_a=0.0, max_length_b=7, length_penalty=0.0, no_repeat_ngram=n)
    search = greedy if beam == 1 else beam_search
    tokens = search(FixedDecoder(probs), torch.full((1, 2), 4), cfg)[0].hypotheses[0].tokens
    if beam == 1:
        assert tokens == _brute_force_greedy_without_repeats(probs, n, 6)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    assert len(grams) == len(set(grams)) and len(tokens) == 6
    assert search(FixedDecoder(probs), torch.full((1, 2), 4), DecodeConfig(beam_size=beam, max_length_a=0.0,
                  max_length_b=7, length_penalty=0.0))[0].hypotheses[0].tokens == [4] * 6


# -- the cap and a forced prefix win over the bans ------------------------------------------------

LOGP = torch.log(P.clamp(min=1e-12))  # FixedDecoder's log-probabilities, read independently


def _search(kind):
    return {"greedy": greedy, "beam": beam_search, "naive": greedy_no_cache,
            "sample": lambda m, s, c, p=None: sample(m, s, c, torch.Generator().manual_seed(0), p)}[kind]


@pytest.mark.parametrize("kind", ["greedy", "beam", "naive", "sample"])
def test_a_min_length_beyond_the_cap_still_ends_every_line_at_its_cap(kind):
    """EOS is banned before min_length and forced at the cap: when min_length is past the cap, the
    cap wins, with the real EOS probability in the score (no line is left without a translation)."""
    cfg = DecodeConfig(beam_size=2 if kind == "beam" else 1, max_length_a=0.0, max_length_b=4, min_length=10,
                       length_penalty=0.0)
    results = _search(kind)(FixedDecoder(), torch.full((3, 2), 4), cfg)
    for r in results:
        h = r.hypotheses[0]
        assert len(h.tokens) == 3 and h.hit_max_length  # 3 tokens and EOS: the cap of 4
        assert h.logprob == pytest.approx(sum(LOGP[t].item() for t in h.tokens) + LOGP[EOS].item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["greedy", "beam", "naive", "sample"])
def test_a_forced_prefix_that_repeats_an_ngram_is_kept_and_scored(kind):
    """The n-gram ban applies to the tokens the search chooses, not to a prefix the user forces:
    a prefix of four 4s under a ban of repeated unigrams starts every hypothesis, scored by the
    model's own log-probabilities."""
    cfg = DecodeConfig(beam_size=2 if kind == "beam" else 1, max_length_a=0.0, max_length_b=7, no_repeat_ngram=1,
                       length_penalty=0.0)
    prefix = [4, 4, 4, 4]
    results = _search(kind)(FixedDecoder(), torch.full((2, 2), 4), cfg, [prefix, [5]])
    for r, p in zip(results, (prefix, [5])):
        h = r.hypotheses[0]
        assert h.tokens[: len(p)] == p and math.isfinite(h.logprob)
        rest = h.tokens[len(p):]
        assert len(set(rest)) == len(rest) and not set(rest) & set(p)  # the chosen tokens repeat nothing
        assert h.logprob == pytest.approx(sum(LOGP[t].item() for t in h.tokens) + LOGP[EOS].item(), rel=1e-5)


def test_a_huge_length_cap_is_the_models_positions_not_an_overflow():
    """--max-length-a 1e19 (meaning "no cap") overflowed int64 into a cap of 1, and a huge b was an
    internal error: both are capped by the model's positions like any other."""
    from nmt.search import max_lengths

    lengths = torch.tensor([3, 10])
    assert max_lengths(lengths, 1e19, 10, 64).tolist() == [63, 63]
    assert max_lengths(lengths, 1.5, 10**20, 64).tolist() == [63, 63]
    assert max_lengths(lengths, 1.5, 10, 64).tolist() == [14, 25]  # ⌊1.5·|x| + 10⌋ as before
    assert max_lengths(lengths, 0.0, 0, 64).tolist() == [1, 1]
