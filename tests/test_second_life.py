"""A trained model's second life: fine-tuning (`--init-from`), several directions in one model
(`--pairs`, target-language tags, `--tgt-lang`) and corpus weights (`--weights`).

Each property is checked against an independent computation: the first fine-tuning step's loss
against the parent model's loss on that batch computed here with `F.cross_entropy`; a resumed
fine-tune against one run in one go (weights compared); the realised shares of a weighted plan
counted here from its batches; the weighted plan of one corpus against `plan_epoch` itself; the
output language of a tiny model on a synthetic task (digits → letters in order, or reversed)
against the two rules."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT, error_line, ok, run_nmt, without_paths, write_slice
from nmt.batching import collate, plan_epoch
from nmt.config import TokenizerConfig
from nmt.directions import Directions, parse_pairs, source_prefix, tag_ids
from nmt.errors import UsageError
from nmt.mixing import Mixture, Part
from nmt.tokenizer import PAD_ID, decode_batch, encode_batch, train_tokenizer

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = ["--preset", "tiny", "--dtype", "float32", "--device", "cpu", "--threads", "1", "--batch-tokens", "512"]


def logs(r: subprocess.CompletedProcess) -> str:
    ok(r)
    return r.stderr.decode("utf-8", "replace")


def last_error(r: subprocess.CompletedProcess, code: int) -> str:
    return without_paths(error_line(r, code, only_line=False))


# -- tags ---------------------------------------------------------------------------------------


def test_tags_are_single_special_tokens_never_made_from_text_nor_decoded_into_it():
    lines = [line for line in Path(__file__).parent.parent.joinpath("data/bible-es-en/train.en")
             .read_text(encoding="utf-8").splitlines()[:1500]]
    tok = train_tokenizer(iter(lines), TokenizerConfig(vocab_size=600), ["<2en>", "<2es>"])
    ids = tag_ids(tok, Directions((("es", "en"), ("en", "es"))), "test")
    assert ids == {"en": 4, "es": 5}  # right after <pad> <unk> <s> </s>
    specials = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    assert set(ids.values()) <= specials
    text = [*lines[:300], "a literal <2en> and <2es> in a user's line", "<2en>"]
    encoded = encode_batch(tok, text)
    assert not {4, 5} & {i for seq in encoded for i in seq}, "text never turns into a tag"
    assert decode_batch(tok, [[ids["es"], *seq] for seq in encoded]) == decode_batch(tok, encoded)


def test_tgt_lang_choices():
    both = Directions((("es", "en"), ("en", "es")))
    with pytest.raises(UsageError, match="--tgt-lang.*en, es"):
        source_prefix(both, {"en": 4, "es": 5}, None)
    with pytest.raises(UsageError, match="fr"):
        source_prefix(both, {"en": 4, "es": 5}, "fr")
    assert source_prefix(both, {"en": 4, "es": 5}, "es") == (5,)
    one = Directions((("es", "en"),))
    assert source_prefix(one, {}, None) == () and source_prefix(one, {}, "en") == ()
    with pytest.raises(UsageError, match="es-en only"):
        source_prefix(one, {}, "es")
    assert parse_pairs("es-en,en-es").pairs == (("es", "en"), ("en", "es"))


# -- corpus weights -----------------------------------------------------------------------------


class FakeCache:
    """What a Mixture reads from a TokenCache: lengths, and ids (pair i of corpus c: [c, i])."""

    def __init__(self, n: int, corpus: int, seed: int):
        rng = np.random.default_rng(seed)
        self.src_len = rng.integers(1, 60, n).astype(np.int32)
        self.tgt_len = rng.integers(1, 60, n).astype(np.int32)
        self.corpus = corpus

    def __len__(self):
        return len(self.src_len)

    def gather(self, indices):
        return [np.array([self.corpus, i]) for i in indices], [np.array([i, self.corpus, 7]) for i in indices]


def test_weighted_shares_follow_the_weights():
    big, small = FakeCache(2000, 0, 1), FakeCache(150, 1, 2)
    mix = Mixture([Part(big, False, None, 0, "big"), Part(small, False, None, 1, "small")], [0.7, 0.3])
    n = len(big) + len(small)
    for epoch in (0, 1):
        plan = mix.plan(1000, seed=3, epoch=epoch)
        served = np.concatenate([plan[b] for b in range(len(plan))])
        assert len(served) == n  # an epoch holds as many pairs as the corpora together
        from_small = served >= len(big)  # mixture indices: big's pairs first, then small's
        # largest-remainder rounding: each share within one pair of its weight
        assert abs(from_small.mean() - 0.3) <= 1 / n and abs((~from_small).mean() - 0.7) <= 1 / n
        counts = np.bincount(served[from_small] - len(big), minlength=len(small))
        assert counts.min() >= int(0.3 * n) // len(small) and counts.max() <= int(0.3 * n) // len(small) + 1
        assert np.bincount(served[~from_small]).max() == 1, "the larger corpus is sampled without replacement"
    again = mix.plan(1000, seed=3, epoch=1)
    assert np.array_equal(np.concatenate(list(again)), np.concatenate(list(mix.plan(1000, seed=3, epoch=1))))
    assert not np.array_equal(np.sort(np.concatenate(list(mix.plan(1000, 3, 0)))), np.sort(served)), \
        "each epoch draws its own sample"
    shares = mix.shares(mix.plan(1000, 3, 0))
    assert [round(s["pairs"], 3) for s in shares] == [0.7, 0.3]


def test_one_corpus_weighted_is_todays_plan_exactly():
    cache = FakeCache(3000, 0, 5)
    for weights in (None, [1.0], [0.25]):
        mix = Mixture([Part(cache, False, None, 0, "only")], weights)
        for epoch in (0, 1, 2):
            ours, today = mix.plan(800, 11, epoch), plan_epoch(cache.src_len, cache.tgt_len, 800, 11, epoch)
            assert len(ours) == len(today)
            assert all(np.array_equal(a, b) for a, b in zip(ours, today))


def test_a_swapped_tagged_part_serves_the_reverse_direction():
    cache = FakeCache(10, 3, 0)
    mix = Mixture([Part(cache, False, 4, -1, "es→en"), Part(cache, True, 5, -1, "en→es")])
    src, tgt = mix.gather(np.array([12, 2]))
    assert src[0].tolist() == [5, 2, 3, 7] and tgt[0].tolist() == [3, 2]  # pair 2, sides swapped, <2es> first
    assert src[1].tolist() == [4, 3, 2] and tgt[1].tolist() == [2, 3, 7]
    assert mix.src_len[12] == cache.tgt_len[2] + 1 and mix.tgt_len[12] == cache.src_len[2]


# -- bad inputs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("life-data")
    return {"a": write_slice(base, "a", 200), "b": write_slice(base, "b", 120, start=5000),
            "dev": write_slice(base, "dev", 5, split="dev")}


@pytest.mark.parametrize("args, code, words", [
    (["--weights", "0.7"], 2, "1 weight(s) for 2 --train corpora"),
    (["--weights", "1,-1"], 2, "negative"),
    (["--weights", "0,0"], 2, "sums to zero"),
    (["--weights", "a,b"], 2, "cannot read 'a,b'"),
    (["--pairs", "es-en,es"], 2, "cannot read 'es'"),
    (["--seed", "-1"], 2, "--seed must be in [0, 9223372036854775807] (got -1)"),
    (["--preset", "finetune"], 2, "unknown preset 'finetune' (choose from"),
    (["--pairs", "es-en", "--src", "es"], 2, "--pairs or --src/--tgt"),
    (["--pairs", "es-en,en-fr"], 1, "no training data for en-fr"),
    (["--pairs", "es-en,en-es", "--separate-vocab"], 2, "joint vocabulary"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, corpora, args, code, words):
    r = run_nmt("train", *TINY, "--train", str(corpora["a"]), "--train", str(corpora["b"]), "--dev", "none",
                "--out", str(tmp_path / "run"), "--max-steps", "1", *args)
    assert words in last_error(r, code)


def test_a_resume_given_the_corpora_in_another_order_is_refused_before_a_cache_is_built(tmp_path, corpora):
    """The epoch's plan indexes the cache, whose pairs follow the --train order: another order is
    another run, and the refusal says so before tokenising the data again."""
    out = tmp_path / "run"
    args = [*TINY, "--dev", "none", "--src", "es", "--tgt", "en", "--vocab-size", "400", "--out", str(out)]
    logs(run_nmt("train", *args, "--train", str(corpora["a"]), "--train", str(corpora["b"]), "--max-steps", "1"))
    built = lambda: sorted(p for p in (out / "cache").iterdir() if p.is_dir())  # noqa: E731 (not the hash memo)
    caches = built()
    msg = last_error(run_nmt("train", *args, "--train", str(corpora["b"]), "--train", str(corpora["a"]),
                             "--max-steps", "2"), 1)
    assert msg == ("nmt: error: <path>: cannot resume, the order of the --train corpora changed (it was trained "
                   "with --train <path> --train <path>); give them in that order, or use a new --out")
    assert built() == caches
    # the same corpora moved elsewhere (other prefixes), given in the other order: refused as early
    moved = tmp_path / "moved"
    moved.mkdir()
    for name, lang in ((n, l) for n in ("a", "b") for l in ("es", "en")):
        shutil.copy(f"{corpora[name]}.{lang}", moved / f"{name}2.{lang}")
    msg = last_error(run_nmt("train", *args, "--train", str(moved / "b2"), "--train", str(moved / "a2"),
                             "--max-steps", "2"), 1)
    assert "cannot resume, the order of the --train corpora changed (it was trained with --train" in msg
    assert built() == caches
    # in the order it was trained in, the moved corpora resume it
    logs(run_nmt("train", *args, "--train", str(moved / "a2"), "--train", str(moved / "b2"), "--max-steps", "2"))
    assert json.loads((out / "training.json").read_text())["steps"] == 2


def test_translate_tgt_lang_on_a_one_direction_model(tiny_model_dir):
    msg = last_error(run_nmt("translate", "-m", str(tiny_model_dir), "--tgt-lang", "fr", input="hola\n"), 2)
    assert "--tgt-lang fr" in msg and "es-en only" in msg
    assert ok(run_nmt("translate", "-m", str(tiny_model_dir), "--tgt-lang", "en", "--beam-size", "1",
                      input="hola\n")).count("\n") == 1


def test_one_corpus_serves_both_directions_cached_once_and_weights_are_reported(tmp_path, corpora):
    out = tmp_path / "both"
    err = logs(run_nmt("train", *TINY, "--train", str(corpora["a"]), "--dev", str(corpora["dev"]), "--pairs",
                       "es-en,en-es", "--vocab-size", "400", "--max-steps", "2", "--eval-every", "2", "--out", str(out)))
    assert len([p for p in (out / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]) == 1
    assert "cache" in err and err.count("building") == 1
    config = json.loads((out / "config.json").read_text())
    assert config["directions"] == ["es-en", "en-es"] and len(config["data"]) == 2
    assert [round(p["pairs"], 2) for p in config["mixing"]["parts"]] == [0.5, 0.5]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert set(evals[-1]["directions"]) == {"es→en", "en→es"}  # dev BLEU on both directions

    weighted = tmp_path / "weighted"
    err = logs(run_nmt("train", *TINY, "--train", str(corpora["a"]), "--train", str(corpora["b"]), "--weights",
                       "3,1", "--dev", "none", "--src", "es", "--tgt", "en", "--vocab-size", "400", "--max-steps", "2",
                       "--out", str(weighted)))
    parts = json.loads((weighted / "config.json").read_text())["mixing"]["parts"]
    assert [round(p["pairs"], 2) for p in parts] == [0.75, 0.25] and [p["weight"] for p in parts] == [0.75, 0.25]
    assert "share of pairs 0.750" in err and "share of pairs 0.250" in err


def test_train_tokenizer_with_pairs_makes_the_tags_that_train_then_reuses(tmp_path, corpora):
    out = tmp_path / "both"
    logs(run_nmt("train-tokenizer", "--train", str(corpora["a"]), "--pairs", "es-en,en-es", "--vocab-size", "400",
                 "--out", str(out)))
    tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t["special"] for t in tok["added_tokens"]}
    assert added.get("<2en>") is True and added.get("<2es>") is True
    err = logs(run_nmt("train", *TINY, "--train", str(corpora["a"]), "--dev", "none", "--pairs", "es-en,en-es",
                       "--vocab-size", "400", "--max-steps", "1", "--out", str(out)))
    assert "tokenizer: reusing" in err
    assert "training ended: " in err and "-1.00" not in err  # no dev set, no best score to report
    assert json.loads((out / "tokenizer.json").read_text(encoding="utf-8")) == tok
    # a trained model's tokenizer is not replaced: its ids are what the model was trained on
    before = (out / "tokenizer.json").read_bytes()
    msg = without_paths(error_line(run_nmt("train-tokenizer", "--train", str(corpora["a"]), "--vocab-size", "324",
                                           "--out", str(out)), 1))
    assert msg.startswith("nmt: error: <path>: holds an nmt run (config.json")
    assert msg.endswith("whose model is trained or being trained on the ids of the tokenizer there; write a new "
                        "tokenizer to another --out")
    assert (out / "tokenizer.json").read_bytes() == before
    untagged = tmp_path / "one"
    logs(run_nmt("train-tokenizer", "--train", str(corpora["a"]), "--vocab-size", "400", "--out", str(untagged)))
    msg = last_error(run_nmt("train", *TINY, "--train", str(corpora["a"]), "--dev", "none", "--pairs", "es-en,en-es",
                             "--vocab-size", "400", "--max-steps", "1", "--out", str(untagged)), 1)
    assert "no special token <2en>" in msg or "no special token <2es>" in msg
    assert "--pairs or --src/--tgt" in last_error(run_nmt("train-tokenizer", "--train", str(corpora["a"]), "--pairs",
                                                          "es-en", "--src", "es", "--out", str(tmp_path / "x")), 2)
    assert "joint vocabulary" in last_error(run_nmt("train-tokenizer", "--train", str(corpora["a"]), "--pairs",
                                                    "es-en,en-es", "--separate-vocab", "--out", str(tmp_path / "x")), 2)
    assert not (tmp_path / "x").exists()


# -- fine-tuning --------------------------------------------------------------------------------


FT = [*TINY, "--dev", "none", "--log-every", "1", "--eval-every", "100", "--keep-last", "5"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory, corpora) -> Path:
    out = tmp_path_factory.mktemp("parent") / "run"
    logs(run_nmt("train", *TINY, "--train", str(corpora["a"]), "--dev", str(corpora["dev"]), "--src", "es",
                 "--tgt", "en", "--vocab-size", "400", "--max-steps", "20", "--eval-every", "20", "--out", str(out)))
    return out


def train_losses(run: Path) -> list[float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def weights_at(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


MIXED = [*TINY, "--dev", "none", "--log-every", "1", "--eval-every", "100", "--keep-last", "5", "--dropout", "0.1",
         "--pairs", "es-en,en-es", "--weights", "3,1", "--vocab-size", "400"]


@pytest.fixture(scope="module")
def small_corpora(tmp_path_factory) -> list[str]:
    """Two small corpora (an epoch of both directions is a few batches of 512 tokens) as --train options."""
    base = tmp_path_factory.mktemp("small")
    return ["--train", str(write_slice(base, "c", 20)), "--train", str(write_slice(base, "d", 16, start=3000))]


def test_a_weighted_two_direction_run_resumes_exactly(small_corpora, tmp_path):
    """Two corpora, weights 3:1, both directions, dropout on, across an epoch: 8 + resume + 8 = 16."""
    opts = [*MIXED, *small_corpora]
    one_go, split = tmp_path / "one", tmp_path / "split"
    logs(run_nmt("train", *opts, "--out", str(one_go), "--max-steps", "16"))
    logs(run_nmt("train", *opts, "--out", str(split), "--max-steps", "8"))
    assert "resuming from step-00000008" in logs(run_nmt("train", *opts, "--out", str(split), "--max-steps", "16"))
    assert json.loads((one_go / "training.json").read_text())["epochs"] >= 1, "the test should cross an epoch"
    a, b = weights_at(one_go, 16), weights_at(split, 16)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(one_go) == train_losses(split)


@pytest.mark.slow
def test_a_weighted_two_direction_run_under_torchrun_follows_one_process(small_corpora, tmp_path):
    """2 ranks × 1 batch = 1 process × 2 batches (--update-freq 2), on the weighted, tagged mixture,
    across an epoch."""
    opts = [*MIXED, "--dropout", "0", *small_corpora, "--max-steps", "6"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    logs(run_nmt("train", *opts, "--out", str(single), "--update-freq", "2"))
    ddp.mkdir()
    (ddp / "tokenizer.json").write_bytes((single / "tokenizer.json").read_bytes())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29523",
                        "-m", "nmt", "train", *opts, "--out", str(ddp)], cwd=ROOT, capture_output=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    a, b = train_losses(single), train_losses(ddp)
    assert len(a) == len(b) == 6 and a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert json.loads((ddp / "config.json").read_text())["mixing"] == json.loads((single / "config.json").read_text())["mixing"]
    wa, wb = weights_at(single, 6), weights_at(ddp, 6)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-4)


def test_fine_tune_starts_from_the_parent_and_resumes_exactly(parent, corpora, tmp_path):
    """6 + resume + 6 steps = 12 in one go; the first step's loss is the parent's loss on that batch;
    the vocabulary and model are the parent's. The schedule is set to inverse-sqrt: the fine-tuning
    default with a budget, cosine, stretches to the new --max-steps of a resume, as for any run."""
    opts = [*FT, "--init-from", str(parent), "--train", str(corpora["b"]), "--lr-schedule", "inverse-sqrt"]
    one_go, split = tmp_path / "one", tmp_path / "split"
    assert "fine-tuning" in logs(run_nmt("train", *opts, "--out", str(one_go), "--max-steps", "12"))
    logs(run_nmt("train", *opts, "--out", str(split), "--max-steps", "6"))
    assert "resuming from step-00000006" in logs(run_nmt("train", *opts, "--out", str(split), "--max-steps", "12"))
    a, b = weights_at(one_go, 12), weights_at(split, 12)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(one_go) == train_losses(split)

    # the vocabulary never changes: the same tokenizer file
    assert (one_go / "tokenizer.json").read_bytes() == (parent / "tokenizer.json").read_bytes()
    config, parent_config = (json.loads((d / "config.json").read_text()) for d in (one_go, parent))
    assert config["model"] == parent_config["model"]
    lineage = config["parent"]
    assert lineage["directory"] == str(parent.resolve()) and lineage["best_step"] == 20
    import hashlib

    assert lineage["weights_sha256"] == hashlib.sha256((parent / "model.safetensors").read_bytes()).hexdigest()
    assert config["train"]["warmup_steps"] == 50 and config["train"]["lr"] == pytest.approx(0.5 * parent_config["train"]["lr"])
    info = json.loads(ok(run_nmt("info", str(one_go), "--format", "json")))
    assert info["parent"]["directory"] == str(parent.resolve())

    # the first step's loss, recomputed here from the parent's weights on the fine-tune's first batch
    from nmt.cache import open_cache
    from nmt.checkpoint import load_for_inference

    model, _, _ = load_for_inference(parent)
    cache = open_cache(next(p for p in (one_go / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")))
    first = plan_epoch(cache.src_len, cache.tgt_len, 512, config["train"]["seed"], 0)[0]
    batch = collate(cache, first)
    with torch.no_grad():
        logits = model(batch.src, batch.tgt_in)
        loss = F.cross_entropy(logits.float().transpose(1, 2), batch.tgt_out, ignore_index=PAD_ID,
                               label_smoothing=config["train"]["label_smoothing"], reduction="sum") / batch.n_tgt_tokens
    assert config["model"]["dropout"] == 0.0  # the tiny preset's: the training step computes the same loss
    assert train_losses(one_go)[0] == pytest.approx(float(loss), rel=1e-4)
    scratch = float(np.log(config["model"]["tgt_vocab_size"]))
    assert abs(float(loss) - scratch) > 0.05, "the parent has learned something, so the check can fail"


def test_fine_tune_refuses_other_model_or_tokenizer_options(parent, corpora, tmp_path):
    base = ["train", *FT, "--init-from", str(parent), "--train", str(corpora["b"]), "--out", str(tmp_path / "ft"),
            "--max-steps", "1"]
    msg = last_error(run_nmt(*base, "--post-norm"), 2)
    assert "pre_norm" in msg and "parent" in msg
    msg = last_error(run_nmt(*base, "--preset", "small"), 2)
    assert "model option" in msg and "parent's is" in msg
    msg = last_error(run_nmt(*base, "--vocab-size", "900"), 2)
    assert "--vocab-size 900 differs from the parent's 400" in msg
    msg = last_error(run_nmt(*base[:-2], "--init-from", str(tmp_path / "nowhere")), 1)
    assert msg.startswith("nmt: error: --init-from: <path>: no such model directory")
    assert not (tmp_path / "ft" / "config.json").exists()


def test_a_fine_tune_given_one_side_takes_the_other_from_the_parent_and_names_a_new_direction(parent, corpora, tmp_path):
    reverse = tmp_path / "en-es"  # a parent whose source is not the default --src (es)
    logs(run_nmt("train", *FT, "--train", str(corpora["a"]), "--src", "en", "--tgt", "es", "--vocab-size", "400",
                 "--max-steps", "2", "--out", str(reverse)))
    err = logs(run_nmt("train", *FT, "--init-from", str(reverse), "--train", str(corpora["b"]), "--max-steps", "1",
                       "--out", str(tmp_path / "tgt"), "--tgt", "es"))
    config = json.loads((tmp_path / "tgt" / "config.json").read_text())
    assert (config["src"], config["tgt"]) == ("en", "es") and "not among the directions" not in err
    base = ["train", *FT, "--init-from", str(parent), "--train", str(corpora["b"]), "--max-steps", "1"]
    err = logs(run_nmt(*base, "--out", str(tmp_path / "swap"), "--src", "en", "--tgt", "es"))
    assert "fine-tune: en-es not among the directions the parent was trained on (es-en)" in err
    assert json.loads((tmp_path / "swap" / "config.json").read_text())["directions"] == ["en-es"]


def _stand_in_parent(tmp_path, directions: str):
    from nmt import config as cfg
    from nmt.finetune import Parent

    model_config, tok_config, _ = cfg.preset("tiny")
    return Parent(tmp_path / "parent", {"train": {}}, model_config, tok_config, parse_pairs(directions))


@pytest.mark.parametrize("directions, given, expected", [
    ("de-en,en-de", {"tgt": "en"}, ("de", "en")),
    ("de-en,en-de", {"src": "en"}, ("en", "de")),
    ("de-en,fr-en", {"src": "fr"}, ("fr", "en")),
    ("es-en", {"tgt": "fr"}, ("es", "fr")),  # one direction: a new one, es → fr (the log names it)
    ("es-en", {"src": "fr"}, ("fr", "en")),
    ("es-en", {"src": "es"}, ("es", "en")),
    ("es-en", {"src": "en"}, ("en", "es")),  # the side it had on the other end: the reverse
    ("es-en", {"tgt": "es"}, ("en", "es")),
    ("de-en,fr-en", {"tgt": "en"}, "--tgt en: the parent was trained on de-en,fr-en, so the other side is not known: "
                                   "give --src too"),
    ("de-en,en-de", {"tgt": "fr"}, "--tgt fr: the parent was trained on de-en,en-de, so the other side is not known: "
                                   "give --src too"),
])
def test_a_fine_tune_given_one_side_of_a_parent_with_several_directions(tmp_path, monkeypatch, directions, given,
                                                                         expected):
    """The other side is the one of the parent's direction with the side given; where none or
    several have it, a usage error asks for it (it was taken from the defaults: es)."""
    from nmt import config as cfg
    from nmt import finetune

    parent = _stand_in_parent(tmp_path, directions)
    monkeypatch.setattr(finetune, "read_parent", lambda directory: parent)
    model_config, tok_config, train_preset = cfg.preset("tiny")
    config = cfg.TrainConfig(preset="finetune", init_from=str(parent.directory), **train_preset,
                             **given, fixed=[f"train.{k}" for k in given])
    if isinstance(expected, str):
        with pytest.raises(UsageError) as e:
            finetune.configs(config, model_config, tok_config, tmp_path / "ft")
        assert str(e.value) == expected
    else:
        _, config, _, _ = finetune.configs(config, model_config, tok_config, tmp_path / "ft")
        assert (config.src, config.tgt, config.pairs) == (*expected, [])


# -- several directions: the tag decides the output language ---------------------------------------


LETTERS = "abcdefghij"


def digit_task(directory: Path, name: str, n: int, seed: int) -> Path:
    """PREFIX.d: digit strings; PREFIX.c: the same as letters, in order; PREFIX.r: reversed."""
    rng = random.Random(seed)
    rows = [[rng.randrange(10) for _ in range(rng.randint(2, 5))] for _ in range(n)]
    for lang, f in (("d", lambda s: map(str, s)), ("c", lambda s: (LETTERS[x] for x in s)),
                    ("r", lambda s: (LETTERS[x] for x in reversed(s)))):
        (directory / f"{name}.{lang}").write_text("".join(" ".join(f(s)) + "\n" for s in rows), encoding="utf-8")
    return directory / name


@pytest.mark.slow
def test_the_tag_decides_the_output_language(tmp_path):
    train = digit_task(tmp_path, "train", 3000, 0)
    test = digit_task(tmp_path, "test", 60, 1)
    out = tmp_path / "run"
    err = logs(run_nmt("train", *TINY, "--batch-tokens", "1024", "--train", str(train), "--dev", "none",
                       "--pairs", "d-c,d-r", "--vocab-size", "324", "--max-steps", "200", "--lr", "3e-3",
                       "--warmup", "50", "--out", str(out)))
    assert "data mix" in err
    info = json.loads(ok(run_nmt("info", str(out), "--format", "json")))
    assert info["directions"] == ["d-c", "d-r"] and info["tags"] == ["<2c>", "<2r>"]
    msg = last_error(run_nmt("translate", "-m", str(out), input="1 2\n"), 2)
    assert "--tgt-lang (c, r)" in msg
    sources = Path(f"{test}.d").read_text().splitlines()
    expected = {lang: Path(f"{test}.{lang}").read_text().splitlines() for lang in "cr"}
    distinct = [i for i in range(len(sources)) if expected["c"][i] != expected["r"][i]]
    for lang, other in (("c", "r"), ("r", "c")):
        hyps = ok(run_nmt("translate", "-m", str(out), "--tgt-lang", lang, "--beam-size", "1",
                          input=Path(f"{test}.d").read_bytes())).splitlines()
        assert len(hyps) == len(sources) and not any("<2" in h for h in hyps)
        right = sum(hyps[i] == expected[lang][i] for i in distinct) / len(distinct)
        wrong = sum(hyps[i] == expected[other][i] for i in distinct) / len(distinct)
        assert right >= 0.6 and wrong <= 0.1, (lang, right, wrong)
    import nmt

    model = nmt.load(out, device="cpu")
    assert model.translate("1 2 3", tgt_lang="c", beam_size=1) == "b c d"
    assert model.translate("1 2 3", tgt_lang="r", beam_size=1) == "d c b"
    with pytest.raises(UsageError, match=r"^this model translates several directions \(d-c,d-r\): choose the output "
                                         r"language with --tgt-lang \(c, r\)$"):
        model.translate("1 2 3")
    # `nmt attention` puts the same tag before the source: its translation, and the tag in its maps
    r = run_nmt("attention", "-m", str(out), "--tgt-lang", "r", "1 2 3")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().splitlines()[0] == "d c b" and "<2r>" in r.stdout.decode()
    assert "--tgt-lang (c, r)" in last_error(run_nmt("attention", "-m", str(out), "1 2 3"), 2)
    caches = [p for p in (out / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(caches) == 2  # d-c and d-r: two pairs of files, two caches

    # the same model exported to CTranslate2: the tag reaches it, under the same options and errors
    pytest.importorskip("ctranslate2")
    ct2 = tmp_path / "ct2"
    ok(run_nmt("export", "-m", str(out), "--format", "ctranslate2", "--out", str(ct2)))
    assert "--tgt-lang (c, r)" in last_error(run_nmt("translate", "-m", str(ct2), input="1 2\n"), 2)
    for lang in "cr":
        ours, theirs = (ok(run_nmt("translate", "-m", str(m), "--tgt-lang", lang, "--beam-size", "1",
                                   input=Path(f"{test}.d").read_bytes())) for m in (out, ct2))
        assert theirs == ours, lang
