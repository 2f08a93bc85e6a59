"""Unit tests of `nmt.batching`: epoch plans checked for coverage, token budget, determinism and
the split across ranks; `collate` checked against tensors built by hand from the cache's own
flat arrays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import head_lines, tiny_configs, write_slice
from nmt.batching import _cut, collate, plan_epoch, training_pad_multiple
from nmt.cache import Filters, load_or_build
from nmt.config import ModelConfig, TokenizerConfig
from nmt.corpus import ParallelCorpus
from nmt.model import Transformer
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_vocabs

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "bible-es-en"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A real token cache of 1,000 Bible pairs."""
    directory = tmp_path_factory.mktemp("batching")
    src, tgt = head_lines("train.es", 1000), head_lines("train.en", 1000)
    (directory / "c.es").write_text("".join(x + "\n" for x in src), encoding="utf-8")
    (directory / "c.en").write_text("".join(x + "\n" for x in tgt), encoding="utf-8")
    vocabs = train_vocabs(iter(src), iter(tgt), TokenizerConfig(vocab_size=600))
    corpus = ParallelCorpus.from_prefix(directory / "c", "es", "en")
    return load_or_build([corpus], vocabs, Filters(max_length=10**6, max_ratio=1e9, dedupe=False), directory / "cache")


def synthetic_lengths(n: int, seed: int, high: int = 200, dtype=np.uint16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, high + 1, n, dtype=dtype), rng.integers(1, high + 1, n, dtype=dtype)


def padded_costs(batches: list[np.ndarray], src_len: np.ndarray, tgt_len: np.ndarray) -> np.ndarray:
    """count × (longest side in the batch + 1, rounded up to a multiple of 8), per batch: the
    padded size of either tensor."""
    return np.array([len(b) * math.ceil((int(max(src_len[b].max(), tgt_len[b].max())) + 1) / 8) * 8 for b in batches])


def as_set(batches: list[np.ndarray]) -> set[tuple[int, ...]]:
    out = {tuple(sorted(int(i) for i in b)) for b in batches}
    assert len(out) == len(batches)  # no batch twice
    return out


# --- plan_epoch -----------------------------------------------------------------------------

CASES = [
    # (number of pairs, max length, batch_tokens)
    (1, 10, 100),
    (2000, 200, 4096),
    (3000, 50, 1000),
    (500, 200, 150),  # many pairs are over the budget on their own: single-pair batches
    (1000, 5, 7),
]


@pytest.mark.parametrize("n, high, batch_tokens", CASES)
@pytest.mark.parametrize("epoch", [0, 3])
def test_plan_covers_every_pair_once_within_budget(n, high, batch_tokens, epoch):
    src_len, tgt_len = synthetic_lengths(n, seed=n + high, high=high)
    copies = src_len.copy(), tgt_len.copy()
    batches = plan_epoch(src_len, tgt_len, batch_tokens, seed=11, epoch=epoch)
    np.testing.assert_array_equal(src_len, copies[0])  # inputs untouched
    np.testing.assert_array_equal(tgt_len, copies[1])
    assert all(len(b) > 0 for b in batches)
    flat = np.concatenate(batches)
    assert len(flat) == n
    np.testing.assert_array_equal(np.sort(flat), np.arange(n))
    costs = padded_costs(batches, src_len, tgt_len)
    sizes = np.array([len(b) for b in batches])
    over = (costs > batch_tokens) & (sizes > 1)
    assert not over.any(), [(c, s) for c, s, o in zip(costs, sizes, over) if o][:5]
    # a pair over the budget on its own is alone in its batch
    alone = np.maximum(src_len, tgt_len).astype(np.int64) + 1 > batch_tokens
    for b in batches:
        if alone[b].any():
            assert len(b) == 1


def test_plan_on_the_real_cache(cache):
    n = len(cache)
    assert n == 1000
    batches = plan_epoch(cache.src_len, cache.tgt_len, 600, seed=1, epoch=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))
    costs, sizes = padded_costs(batches, cache.src_len, cache.tgt_len), np.array([len(b) for b in batches])
    assert ((costs <= 600) | (sizes == 1)).all()
    # buckets are reasonably full: fewer batches than twice the ideal number
    ideal = (np.maximum(cache.src_len, cache.tgt_len).astype(np.int64) + 1).sum() / 600
    assert len(batches) < 2 * ideal + 50


def test_plan_is_a_function_of_seed_and_epoch():
    src_len, tgt_len = synthetic_lengths(3000, seed=5)

    def plan(seed, epoch):
        return [b.tolist() for b in plan_epoch(src_len, tgt_len, 2000, seed=seed, epoch=epoch)]

    assert plan(1, 0) == plan(1, 0)
    assert plan(1, 4) == plan(1, 4)
    assert plan(1, 0) != plan(1, 1)  # a new order every epoch...
    assert plan(1, 0) != plan(2, 0)  # ...and for every seed
    # the order of batches changes, and so does which pairs share a batch (random tie-break)
    first, second = plan(1, 0), plan(1, 1)
    assert [b[:1] for b in first] != [b[:1] for b in second]
    assert {tuple(sorted(b)) for b in first} != {tuple(sorted(b)) for b in second}


def test_plan_shuffles_batches_across_lengths():
    """Batches are not served shortest first: the sequence of batch lengths is not sorted."""
    src_len, tgt_len = synthetic_lengths(3000, seed=6)
    batches = plan_epoch(src_len, tgt_len, 2000, seed=1, epoch=0)
    longest = [int(np.maximum(src_len[b], tgt_len[b]).max()) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n, batch_tokens", [(3000, 2000), (2001, 300), (41, 100)])
def test_ranks_split_one_plan(world_size, n, batch_tokens):
    src_len, tgt_len = synthetic_lengths(n, seed=n)
    whole = as_set(plan_epoch(src_len, tgt_len, batch_tokens, seed=3, epoch=2))
    ranks = [plan_epoch(src_len, tgt_len, batch_tokens, seed=3, epoch=2, rank=r, world_size=world_size)
             for r in range(world_size)]
    sets = [as_set(r) for r in ranks]
    assert len({len(r) for r in ranks}) == 1  # equal counts keep collectives in step
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not sets[a] & sets[b]
    union = set().union(*sets)
    assert union <= whole
    assert len(whole) - len(union) <= world_size - 1
    assert len(union) == len(whole) // world_size * world_size
    # a rank's plan is deterministic too
    again = plan_epoch(src_len, tgt_len, batch_tokens, seed=3, epoch=2, rank=1, world_size=world_size)
    assert [b.tolist() for b in again] == [b.tolist() for b in ranks[1]]


def greedy_cut_pair_by_pair(sorted_cost: np.ndarray, budget: int) -> tuple[list[int], list[int]]:
    """The plain greedy loop: each batch takes pairs while count × cost of the newest ≤ budget."""
    starts, ends, i = [], [], 0
    while i < len(sorted_cost):
        count = 1
        while i + count < len(sorted_cost) and (count + 1) * int(sorted_cost[i + count]) <= budget:
            count += 1
        starts.append(i)
        ends.append(i + count)
        i += count
    return starts, ends


def test_cut_equals_the_pair_by_pair_greedy_loop():
    rng = np.random.default_rng(0)
    for _ in range(1500):
        n, high, budget = int(rng.integers(0, 200)), int(rng.integers(1, 300)), int(rng.integers(1, 1500))
        costs = np.sort(rng.integers(1, high + 1, n)).astype(np.int64)
        starts, ends = _cut(costs, budget)
        assert (starts.tolist(), ends.tolist()) == greedy_cut_pair_by_pair(costs, budget), (n, high, budget)


def test_empty_lengths_give_no_batches():
    empty = np.zeros(0, dtype=np.int32)
    assert len(plan_epoch(empty, empty, 1000, seed=1, epoch=0)) == 0


@pytest.mark.slow
def test_plan_five_million_pairs_covers_each_pair_once():
    """Correct at this size (checked vectorised); its speed is benchmarks/bench_plan.py's to show."""
    n, batch_tokens = 5_000_000, 4096
    src_len, tgt_len = synthetic_lengths(n, seed=0)
    batches = plan_epoch(src_len, tgt_len, batch_tokens, seed=1, epoch=0)
    flat = np.concatenate(batches)
    assert len(flat) == n and np.bincount(flat, minlength=n).max() == 1
    sizes = np.array([len(b) for b in batches])
    cost = np.maximum(src_len, tgt_len).astype(np.int64) + 1
    longest = np.maximum.reduceat(cost[flat], np.concatenate(([0], np.cumsum(sizes)[:-1])))
    assert ((sizes * longest <= batch_tokens) | (sizes == 1)).all()


# --- collate --------------------------------------------------------------------------------


def expected_tensors(cache, indices, multiple: int = 8) -> tuple[list[list[int]], list[list[int]], list[list[int]], int]:
    """The batch built by hand from the flat arrays: src = ids+EOS, tgt_in = BOS+ids,
    tgt_out = ids+EOS, each padded with PAD_ID to its longest row rounded up to `multiple`."""
    srcs, tgts = [], []
    for i in indices:
        s0, sn = int(cache.src_start[i]), int(cache.src_len[i])
        t0, tn = int(cache.tgt_start[i]), int(cache.tgt_len[i])
        srcs.append([int(x) for x in cache.src[s0:s0 + sn]])
        tgts.append([int(x) for x in cache.tgt[t0:t0 + tn]])
    width_s = math.ceil((max(len(s) for s in srcs) + 1) / multiple) * multiple
    width_t = math.ceil((max(len(t) for t in tgts) + 1) / multiple) * multiple

    def pad(row, width):
        return row + [PAD_ID] * (width - len(row))

    src = [pad(s + [EOS_ID], width_s) for s in srcs]
    tgt_in = [pad([BOS_ID] + t, width_t) for t in tgts]
    tgt_out = [pad(t + [EOS_ID], width_t) for t in tgts]
    return src, tgt_in, tgt_out, sum(len(t) + 1 for t in tgts)


def _check_collate(cache, indices, multiple: int = 8):
    batch = collate(cache, np.asarray(indices), multiple=multiple)
    src, tgt_in, tgt_out, n_tgt = expected_tensors(cache, indices, multiple)
    for tensor in (batch.src, batch.tgt_in, batch.tgt_out):
        assert tensor.dtype == torch.long
    assert batch.src.tolist() == src
    assert batch.tgt_in.tolist() == tgt_in
    assert batch.tgt_out.tolist() == tgt_out
    assert batch.n_tgt_tokens == n_tgt == int((batch.tgt_out != PAD_ID).sum())
    assert not (batch.tgt_in == EOS_ID).any()  # EOS is never an input
    assert (batch.tgt_in[:, 0] == BOS_ID).all() and not (batch.tgt_out == BOS_ID).any()


def test_collate_matches_hand_built_tensors(cache):
    lengths = np.asarray(cache.tgt_len)
    shortest, longest = int(lengths.argmin()), int(lengths.argmax())
    _check_collate(cache, [longest, shortest, 5, 17, 999])
    _check_collate(cache, [shortest])  # one row: no padding at all
    _check_collate(cache, [longest])
    _check_collate(cache, [3, 3])  # the same pair twice


@pytest.mark.parametrize("multiple", [8, 1])
def test_collate_every_batch_of_a_plan(cache, multiple):
    batches = plan_epoch(cache.src_len, cache.tgt_len, 800, seed=2, epoch=0)
    for b in batches:
        _check_collate(cache, b, multiple)


def test_training_batches_keep_exact_lengths_only_on_cpu_in_float32():
    """Padding to 8 is for bf16 (oneDNN keeps a kernel per shape) and GPUs; in fp32 on CPU it is
    only wasted work."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert training_pad_multiple(cpu, torch.float32) == 1
    assert training_pad_multiple(cpu, torch.bfloat16) == 8
    assert training_pad_multiple(cuda, torch.float32) == training_pad_multiple(cuda, torch.bfloat16) == 8


def test_exact_lengths_train_like_lengths_padded_to_8(cache):
    """The same pairs collated at exact lengths and padded to 8 give the training loss and every
    gradient alike: padding is masked out of attention and skipped by the loss."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=2, decoder_layers=2, dropout=0.0,
                                    src_vocab_size=600, tgt_vocab_size=600)).train()
    batch_of = plan_epoch(cache.src_len, cache.tgt_len, 800, seed=3, epoch=0)
    indices = max(batch_of, key=len)  # many rows of different lengths
    results = []
    for multiple in (8, 1):
        batch = collate(cache, indices, multiple=multiple)
        model.zero_grad()
        keep = batch.tgt_out != PAD_ID
        loss = model(batch.src, batch.tgt_in, keep, batch.tgt_out[keep], 0.1)
        loss.backward()
        results.append((batch.src.shape, loss.item(), [q.grad.clone() for q in model.parameters()]))
    (shape8, loss8, grads8), (shape1, loss1, grads1) = results
    assert shape1[1] < shape8[1], "the batch should have padding to drop"
    assert loss1 == pytest.approx(loss8, rel=1e-6)
    for g8, g1 in zip(grads8, grads1):
        torch.testing.assert_close(g1, g8, rtol=1e-4, atol=1e-5)  # sums over other row counts: rounding


def test_batch_to_keeps_everything(cache):
    batch = collate(cache, np.arange(8))
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.src, batch.src) and torch.equal(moved.tgt_in, batch.tgt_in)
    assert torch.equal(moved.tgt_out, batch.tgt_out) and moved.n_tgt_tokens == batch.n_tgt_tokens


def test_curriculum_serves_short_batches_first_in_the_first_epoch_only():
    rng = np.random.default_rng(3)
    src = rng.integers(1, 120, 5000)
    tgt = np.clip(src + rng.integers(-5, 5, 5000), 1, None)
    plain = plan_epoch(src, tgt, 2000, seed=1, epoch=0)
    soft = plan_epoch(src, tgt, 2000, seed=1, epoch=0, curriculum=1.0)
    # the same batches, each pair once, only served in another order
    assert sorted(map(tuple, map(sorted, soft))) == sorted(map(tuple, map(sorted, plain)))
    longest = np.array([max(np.max(src[b]), np.max(tgt[b])) for b in soft])
    fifth = len(longest) // 5
    assert longest[:fifth].mean() < 0.7 * longest[-fifth:].mean()  # short first, long last
    shuffled = np.array([max(np.max(src[b]), np.max(tgt[b])) for b in plain])
    assert abs(shuffled[:fifth].mean() - shuffled[-fifth:].mean()) < 0.2 * shuffled.mean()
    later = plan_epoch(src, tgt, 2000, seed=1, epoch=1, curriculum=1.0)
    assert [list(b) for b in later] == [list(b) for b in plan_epoch(src, tgt, 2000, seed=1, epoch=1)]


@pytest.mark.parametrize("dtype, multiple", [("float32", 1), ("bfloat16", 8)])
def test_the_trainer_pads_its_batches_as_its_runtime_wants(tmp_path, monkeypatch, dtype, multiple):
    """Training steps on CPU collate to exact lengths in float32 and to multiples of 8 in bf16."""
    import nmt.train
    from nmt.runtime import setup
    from nmt.train import Distributed, Trainer, prepare

    train_config, model_config, tok_config = tiny_configs(write_slice(tmp_path, "train", 60), dtype=dtype)
    p = prepare(train_config, model_config, tok_config, tmp_path / "run")
    trainer = Trainer(p, train_config, setup("cpu", dtype, 1), Distributed("cpu"))
    widths = []

    def spy(cache, indices, *args, **kwargs):
        batch = collate(cache, indices, *args, **kwargs)
        longest = max(int(cache.src_len[indices].max()), int(cache.tgt_len[indices].max())) + 1
        widths.append((batch.src.shape[1], batch.tgt_in.shape[1], longest))
        return batch

    monkeypatch.setattr(nmt.train, "collate", spy)
    batches = plan_epoch(p.cache.src_len, p.cache.tgt_len, train_config.batch_tokens, 1, 0)
    for b in batches[:3]:
        trainer.train_step([b])
    assert len(widths) == 3
    for src_width, tgt_width, longest in widths:
        assert src_width % multiple == 0 and tgt_width % multiple == 0
        assert max(src_width, tgt_width) == -(-longest // multiple) * multiple
