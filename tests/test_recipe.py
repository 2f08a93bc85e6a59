"""The recipe chosen from the budget: the rules (shape by the tokens a budget buys, dropout by
epochs, warm-up and evaluations as shares), the speed measurement, hand-set options kept, and
`nmt train` with a budget and no preset: the recipe printed, stored, and reused on resume."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import replace

import pytest
import sacrebleu
import torch

from conftest import error_line, run_nmt, tiny_configs, without_paths, write_slice
from nmt import recipe
from nmt import train as train_mod
from nmt.config import ModelConfig, TrainConfig
from nmt.errors import NmtError, UsageError

os.environ.setdefault("OMP_NUM_THREADS", "1")

EPOCH = 830_000  # target tokens of one epoch of the embedded corpus (8k BPE)


RATES = {"micro": 2400.0, "mini": 1500.0, "compact": 1000.0, "small": 800.0}


def _seconds_for_steps(rate: float, steps: int, batch: int = 1500) -> float:
    return steps * recipe.REAL_SHARE * batch / (rate * (1 - recipe.EVAL_SHARE))


def test_a_short_budget_gets_the_fastest_shape():
    # 10 minutes at these speeds buy every shape far fewer than MIN_STEPS steps
    r = recipe.choose(RATES, EPOCH, 600, None, 1500, 30.0)
    assert r.shape == "micro" and r.model["d_model"] == 128 and r.model["encoder_layers"] == 2
    assert r.budget_tokens == pytest.approx(2400 * 600 * (1 - recipe.EVAL_SHARE))
    assert r.epochs == pytest.approx(r.budget_tokens / EPOCH)
    assert "mini would get" in r.reason


def test_the_largest_shape_that_gets_enough_steps_is_chosen():
    just = _seconds_for_steps(RATES["compact"], int(1.01 * recipe.MIN_STEPS))  # compact: just enough
    assert recipe.choose(RATES, EPOCH, just, None, 1500, 30.0).shape == "compact"
    assert recipe.choose(RATES, EPOCH, 0.98 * just, None, 1500, 30.0).shape == "mini"
    assert recipe.choose(RATES, EPOCH, 60, None, 1500, 30.0).shape == "micro"
    plenty = _seconds_for_steps(RATES["small"], 4 * recipe.MIN_STEPS)
    assert recipe.choose(RATES, EPOCH, plenty, None, 1500, 30.0).shape == "small"  # medium not measured


def test_a_deeper_shape_needs_more_steps():
    by_name = {s.name: s for s in recipe.SHAPES}
    assert recipe.steps_needed(by_name["compact"]) == recipe.MIN_STEPS  # 2+2 layers
    assert recipe.steps_needed(by_name["small"]) == 13500 and recipe.steps_needed(by_name["medium"]) == 108000
    # enough steps for compact but not for small (3+3): compact, and the reason says why; 5,855
    # steps is what small got in the 30-minute run where it lost to compact by 1.5 dev BLEU
    between = _seconds_for_steps(RATES["small"], 5855)
    r = recipe.choose(RATES, EPOCH, between, None, 1500, 30.0)
    assert r.shape == "compact" and "small would get 5,855 steps, under the 13,500 it needs" in r.reason
    assert recipe.choose(RATES, EPOCH, _seconds_for_steps(RATES["small"], 13501), None, 1500, 30.0).shape == "small"
    one_step = recipe.REAL_SHARE * 1500 / (1 - recipe.EVAL_SHARE)  # seconds per step at 1 token/s
    assert recipe.worth_measuring_next("compact", 1.0, 13400 * one_step, 1500) is False  # small would need 13,500
    assert recipe.worth_measuring_next("compact", 1.0, 13501 * one_step, 1500) is True


def test_a_step_budget_needs_no_speed():
    assert recipe.choose({}, EPOCH, None, 108000, 1500, 0.0).shape == "medium"  # 6+6 layers: 108,000 steps
    assert recipe.choose({}, EPOCH, None, 107999, 1500, 0.0).shape == "small"
    assert recipe.choose({}, EPOCH, None, 13499, 1500, 0.0).shape == "compact"
    assert recipe.choose({}, EPOCH, None, recipe.MIN_STEPS, 1500, 0.0).shape == "compact"
    assert recipe.choose({}, EPOCH, None, recipe.MIN_STEPS - 1, 1500, 0.0).shape == "micro"
    with pytest.raises(UsageError, match="give --max-time or --max-steps"):
        recipe.choose({}, EPOCH, None, None, 1500, 0.0)


def test_steps_are_optimizer_steps_of_every_batch_they_take():
    # --update-freq 4 on batches of 1,500 buys what batches of 6,000 buy: the same steps and shape
    by_freq = recipe.choose(RATES, EPOCH, 25_000, None, 1500, 30.0, update_freq=4)
    by_size = recipe.choose(RATES, EPOCH, 25_000, None, 6000, 30.0)
    assert by_freq.shape == by_size.shape and by_freq.budget_tokens == by_size.budget_tokens
    assert by_freq.train["eval_every"] == by_size.train["eval_every"]
    assert by_freq.train["warmup_steps"] == by_size.train["warmup_steps"]
    one = recipe.choose(RATES, EPOCH, 25_000, None, 1500, 30.0)
    assert one.shape == "small" and by_freq.shape == "compact"  # a quarter of the steps: under small's 13,500
    assert "batch 1500 × 4 per step" in by_freq.reason
    # two ranks at the rate measured on one: twice the tokens in twice the batches per step, so the same steps
    two = recipe.choose(RATES, EPOCH, 25_000, None, 1500, 30.0, ranks=2)
    assert two.shape == one.shape and two.budget_tokens == pytest.approx(2 * one.budget_tokens)
    assert two.epochs == pytest.approx(2 * one.epochs) and two.train["eval_every"] == one.train["eval_every"]
    assert "on each of 2 ranks" in two.reason
    # a step budget: each step takes update_freq x ranks batches
    r = recipe.choose({}, EPOCH, None, 1000, 1500, 0.0, update_freq=2, ranks=3)
    assert r.budget_tokens == pytest.approx(1000 * recipe.REAL_SHARE * 1500 * 6)
    assert not recipe.worth_measuring_next("compact", RATES["compact"], 20_000, 1500, update_freq=4)
    assert recipe.worth_measuring_next("compact", RATES["compact"], 20_000, 1500)


def test_an_epoch_cap_caps_the_tokens_and_the_shape():
    capped = recipe.choose(RATES, EPOCH, 3600, None, 1500, 30.0, max_epochs=3)
    assert capped.budget_tokens == pytest.approx(3 * EPOCH) and capped.epochs == pytest.approx(3)
    steps = 3 * EPOCH / (recipe.REAL_SHARE * 1500)  # ~1,950 steps: micro, the only shape that needs no more
    assert capped.shape == "micro" and capped.model["dropout"] == 0.0
    run = 3 * EPOCH / (RATES["micro"] * (1 - recipe.EVAL_SHARE))  # ~18 minutes: the cap ends the hour early
    evals = max(2, int(recipe.EVAL_SHARE * run / 30.0))  # 2, the fewest (an hour's 6 would take 16% of the run)
    assert evals == 2 and capped.train["eval_every"] == int(1.1 * int(steps)) // evals  # spread over the capped steps


def test_shapes_that_a_step_or_epoch_cap_rules_out_are_not_timed():
    """--max-epochs 3 with an hour: the choice is capped at ~1,950 steps (micro, above), so after
    micro nothing larger is timed, however fast; without the cap mini would be."""
    cap = recipe.step_cap_of(None, 3, EPOCH, 1500)
    assert cap == pytest.approx(3 * EPOCH / (recipe.REAL_SHARE * 1500))
    assert recipe.step_cap_of(500, 3, EPOCH, 1500) == 500 and recipe.step_cap_of(None, None, EPOCH, 1500) is None
    assert recipe.step_cap_of(None, 3, EPOCH, 1500, update_freq=2, ranks=2) == pytest.approx(cap / 4)
    assert recipe.worth_measuring_next("micro", RATES["micro"], 3600, 1500)
    assert not recipe.worth_measuring_next("micro", RATES["micro"], 3600, 1500, step_cap=cap)
    assert recipe.worth_measuring_next("micro", RATES["micro"], 3600, 1500, step_cap=recipe.MIN_STEPS)
    capped = recipe.choose(RATES, EPOCH, 3600, None, 1500, 30.0, max_epochs=3)
    assert capped.shape == "micro"  # what the cap lets the recipe choose: the shape timed alone


def test_evaluations_are_a_share_of_the_run_when_its_steps_end_it_before_its_time():
    """--max-time 8h --max-steps 3000: the steps end the run after ~28 minutes, so its evaluations
    fit in 5% of those, not of 8 hours (20 of 30 s each would take a third of the run)."""
    r = recipe.choose(RATES, EPOCH, 8 * 3600, 3000, 1500, 30.0)
    run = 3000 * recipe.REAL_SHARE * 1500 / RATES[r.shape]  # seconds of training at the measured rate
    during = math.ceil(3000 / r.train["eval_every"]) - 1  # evaluations inside the run (one more ends it)
    assert 1 <= during and during * 30.0 <= recipe.EVAL_SHARE * run
    # where the time ends the run, the steps cap changes nothing
    assert recipe.choose(RATES, EPOCH, 1800, 10**9, 1500, 30.0) == recipe.choose(RATES, EPOCH, 1800, None, 1500, 30.0)


def test_a_short_run_warms_up_for_at_most_half_its_steps():
    for steps, warmup in ((1, 0), (10, 5), (150, 75), (300, 100), (1000, 250), (10_000, 400)):
        assert recipe.choose({}, EPOCH, None, steps, 1500, 0.0).train["warmup_steps"] == warmup, steps


def test_time_and_steps_together_the_smaller_budget_decides():
    r = recipe.choose(RATES, EPOCH, 10_000, 200, 1500, 10.0)
    assert r.budget_tokens == pytest.approx(200 * recipe.REAL_SHARE * 1500)


def test_dropout_grows_with_the_epochs_the_budget_buys_and_comes_sooner_for_a_wider_model():
    for d_model in (128, 192, 256, 512):
        values = [recipe.dropout_for(e, d_model) for e in (0.5, 2, 5, 7, 10, 20, 50)]
        assert values == sorted(values) and values[0] == 0.0 and values[-1] > 0
    assert [recipe.dropout_for(6, d) for d in (128, 256)] == [0.0, 0.1]
    # the measured points: micro at ~5 epochs, compact at ~7 and ~9
    assert (recipe.dropout_for(5.3, 128), recipe.dropout_for(7.0, 256), recipe.dropout_for(9.0, 256)) == (0.0, 0.1, 0.1)


def test_learning_rate_falls_with_the_width_and_the_vocabulary_with_the_corpus():
    assert [recipe.lr_for(d) for d in (128, 256, 512)] == pytest.approx([4e-3, 2e-3, 1e-3])
    for steps in (100, recipe.steps_needed(recipe.SHAPES[-1])):  # the smallest shape, then the largest
        r = recipe.choose({}, EPOCH, None, steps, 1500, 0.0)
        assert r.train["lr"] == pytest.approx(recipe.lr_for(r.model["d_model"]))
    assert [recipe.vocabulary(n) for n in (27_000, 500_000, 5_000_000)] == [4000, 16000, 32000]


def test_warmup_and_evaluations_are_shares_of_the_budget():
    r = recipe.choose(RATES, EPOCH, 600, None, 1500, 30.0)
    steps = r.budget_tokens / (recipe.REAL_SHARE * 1500)
    assert 100 <= r.train["warmup_steps"] <= max(100, 0.3 * steps)
    during = math.ceil(steps / r.train["eval_every"]) - 1  # evaluations inside the budget (one more ends it)
    assert 1 <= during and during * 30.0 <= max(recipe.EVAL_SHARE * 600, 30.0)  # within the share, or one
    assert r.train["lr_schedule"] == "cosine"


def test_a_long_budget_evaluates_and_saves_about_hourly_within_the_share():
    week = 7 * 86400
    for eval_seconds in (30.0, 0.0):  # a dev set, or none (each "evaluation" then only saves)
        r = recipe.choose(RATES, EPOCH, week, None, 1500, eval_seconds)
        steps = r.budget_tokens / (recipe.REAL_SHARE * 1500)
        interval = week * r.train["eval_every"] / steps  # seconds between checkpoints at the measured speed
        assert 3600 <= interval <= 1.1 * 3600 + 1, eval_seconds
    # a dev set whose evaluation costs 10 minutes: hourly would spend 17%, so the share decides
    r = recipe.choose(RATES, EPOCH, week, None, 1500, 600.0)
    steps = r.budget_tokens / (recipe.REAL_SHARE * 1500)
    during = math.ceil(steps / r.train["eval_every"]) - 1
    assert during * 600.0 <= recipe.EVAL_SHARE * week
    # a 30-minute budget is unchanged by the rule: up to 20 in its share
    assert recipe._evaluations(1800, 1.0) == 20 and recipe._evaluations(1800, 30.0) == 3


def test_measure_stops_at_a_shape_that_runs_out_of_memory_and_names_the_batch_when_the_smallest_does():
    def step_failing_at(name):
        def step(shape):
            def run(i):
                if shape.name == name:
                    raise recipe.DoesNotFit()
                return 1000
            return run
        return step

    too_large: list[str] = []
    rates = recipe.measure(recipe.SHAPES, step_failing_at("compact"), seconds=0.01, out_of_memory=too_large)
    assert set(rates) == {"micro", "mini"} and too_large == ["compact"]
    # the reason names what stopped the larger shape: its memory, not a step count it was never timed for
    long = dict(max_time=36000, max_steps=None, batch_tokens=1500, eval_seconds=0.0)
    chosen = recipe.choose({"micro": 9000.0, "mini": 6000.0}, EPOCH, **long, out_of_memory="compact")
    assert chosen.shape == "mini" and chosen.reason.endswith("; compact runs out of memory at this batch size")
    untimed = recipe.choose({"micro": 9000.0, "mini": 6000.0}, EPOCH, **long)
    assert untimed.shape == "mini" and untimed.reason.endswith("compact would get fewer than the 4,000 steps it needs")
    with pytest.raises(NmtError, match=r"^the recipe's smallest model \(micro\) runs out of memory at this batch "
                                       r"size: lower --batch-tokens$"):
        recipe.measure(recipe.SHAPES, step_failing_at("micro"), seconds=0.01)


def test_a_shape_out_of_memory_in_its_trial_step_stops_the_probe_there(tmp_path, monkeypatch):
    """`torch.OutOfMemoryError` in a real trial step (`train._shape_trial`) is the probe's
    `DoesNotFit`: the shapes before it keep their rates; the smallest not fitting names the batch."""
    from nmt.model import Transformer
    from nmt.runtime import setup

    config, model_config, tok_config = tiny_configs(write_slice(tmp_path / "d", "train", 40), vocab_size=324)
    p = train_mod.prepare(config, model_config, tok_config, tmp_path / "run")
    runtime = setup("cpu", "float32", 1)
    forward = Transformer.forward

    def forward_out_of_memory_from(width):
        def patched(self, *args, **kwargs):
            if self.config.d_model >= width:
                raise torch.OutOfMemoryError("simulated")
            return forward(self, *args, **kwargs)
        return patched

    monkeypatch.setattr(Transformer, "forward", forward_out_of_memory_from(192))  # mini and larger
    rates = recipe.measure(recipe.SHAPES, train_mod._shape_trial(p, config, runtime, 512), seconds=0.01)
    assert list(rates) == ["micro"] and rates["micro"] > 0
    monkeypatch.setattr(Transformer, "forward", forward_out_of_memory_from(0))
    with pytest.raises(NmtError, match=r"^the recipe's smallest model \(micro\) runs out of memory at this batch "
                                       r"size: lower --batch-tokens$"):
        recipe.measure(recipe.SHAPES, train_mod._shape_trial(p, config, runtime, 512), seconds=0.01)


def test_measure_times_each_shape_and_stops_when_larger_ones_cannot_be_chosen():
    built = []

    def step(shape):
        built.append(shape.name)
        return lambda i: 1000

    rates = recipe.measure(recipe.SHAPES, step, seconds=0.01, keep_going=lambda name, rate: name != "mini")
    assert built == ["micro", "mini"] and set(rates) == {"micro", "mini"}
    assert all(rate > 0 for rate in rates.values())
    one_step = recipe.REAL_SHARE * 1500 / (1 - recipe.EVAL_SHARE)  # seconds per step at 1 token/s
    assert recipe.worth_measuring_next("micro", 1.0, 0.99 * recipe.MIN_STEPS * one_step, 1500) is False
    assert recipe.worth_measuring_next("micro", 1.0, 1.01 * recipe.MIN_STEPS * one_step, 1500) is True
    assert recipe.worth_measuring_next("medium", 1e9, 1e6, 1500) is False  # nothing after the largest


def test_options_set_by_hand_are_kept(caplog):
    from nmt.train import _apply_recipe

    chosen = recipe.choose(RATES, EPOCH, 600, None, 1500, 30.0)
    config = TrainConfig(lr=5e-4, fixed=["train.lr", "model.dropout"])
    with caplog.at_level(logging.INFO, logger="nmt.train"):
        new_config, model = _apply_recipe(chosen, config, ModelConfig(dropout=0.3))
    assert new_config.lr == 5e-4 and model.dropout == 0.3  # set by hand
    said = [r.getMessage() for r in caplog.records if "set by hand" in r.getMessage()]
    assert said == [f"recipe: set by hand, kept: lr 0.0005 (recipe: {chosen.train['lr']}), "
                    f"dropout 0.3 (recipe: {chosen.model['dropout']})"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nmt.train"):  # a torchrun rank other than 0: same settings, no line
        assert _apply_recipe(chosen, config, ModelConfig(dropout=0.3), quiet=True) == (new_config, model)
    assert not [r for r in caplog.records if "set by hand" in r.getMessage()]
    assert new_config.warmup_steps == chosen.train["warmup_steps"] and model.d_model == 128  # the recipe's
    assert recipe.from_record(json.loads(json.dumps(recipe.describe(chosen))), "recipe.json") == chosen


def _settings(model=(), train=()) -> dict:
    """A recipe record as `choose` writes it, with some settings changed."""
    record = recipe.describe(recipe.choose({}, EPOCH, None, 1000, 1500, 0.0))
    record["model"].update(model)
    record["train"].update(train)
    return record


def test_a_recipe_sets_the_settings_a_record_may_hold():
    r = recipe.choose(RATES, EPOCH, 1800, None, 1500, 30.0)
    assert sorted(r.model) == sorted(recipe.MODEL_SETTINGS) and sorted(r.train) == sorted(recipe.TRAIN_SETTINGS)
    assert recipe.from_record(_settings(), "recipe.json") == recipe.choose({}, EPOCH, None, 1000, 1500, 0.0)


@pytest.mark.parametrize("record, problem", [
    ([], "not a JSON object"), ({"shape": "micro"}, "no model, train, budget_tokens, epochs"),
    ({"shape": "micro", "model": {}, "train": {}, "budget_tokens": 1.0, "epochs": "2"}, 'epochs must be float, not "2"'),
    ({"shape": "micro", "model": [], "train": {}, "budget_tokens": 1.0, "epochs": 2}, "model must be dict[str, Any], not []"),
    ({"shape": "micro", "model": {}, "train": {}, "budget_tokens": 1.0, "epochs": 2, "colour": 1}, "unexpected colour"),
    # the settings: each would otherwise reach the run's configuration (a TypeError, a division by 0)
    (_settings(train={"label_smoothing": 0.1}), "train setting label_smoothing is not a recipe's"),
    (_settings(model={"colour": 1}), "model setting colour is not a recipe's"),
    (_settings(train={"eval_every": 0}), "train eval_every = 0 is under 1"),
    (_settings(train={"eval_every": 2.5}), "train eval_every must be int, not 2.5"),
    (_settings(train={"batch_tokens": "3000"}), "train batch_tokens must be int, not '3000'"),
    (_settings(train={"lr": -1.0}), "train lr = -1.0 is not > 0"),
    (_settings(train={"lr_schedule": "step"}), "train lr_schedule 'step' is not one of inverse-sqrt, cosine, linear"),
    (_settings(model={"dropout": 1.0}), "model dropout = 1.0 is not in [0, 1)"),
    (_settings(model={"d_model": 0}), "model d_model = 0 is out of range [2, 65536]"),
    (_settings(model={"n_heads": 3}), "model d_model = 128 is not divisible by n_heads = 3"),
    # what it was chosen for: compared with this run's and said in a warning, so numbers and a dtype name
    ({**_settings(), "budget": {"max_time": "30m", "max_steps": None}}, "budget max_time must be a number, not '30m'"),
    ({**_settings(), "budget": {"threads": True}}, "budget threads must be a number, not True"),
    ({**_settings(), "budget": {"dtype": 16}}, "budget dtype must be a name, not 16"),
])
def test_a_recipe_record_of_another_shape_is_one_error_naming_the_file(tmp_path, record, problem):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(record))
    fix = "delete it: a run restores it from its config.json, a preparation chooses again"
    with pytest.raises(NmtError, match=rf"recipe.json: not a recipe record of this nmt \({re.escape(problem)}\); {fix}$"):
        train_mod._read_recipe(path)
    path.write_text("{ not json")
    with pytest.raises(NmtError, match=r"recipe.json: cannot be read as a recipe \("):
        train_mod._read_recipe(path)


def test_shape_options_set_by_hand_narrow_the_candidates_and_the_rest_fits_the_shape_that_trains():
    layers = recipe.candidates({"encoder_layers": 3, "decoder_layers": 3})
    assert [(s.d_model, s.encoder_layers, s.decoder_layers) for s in layers] == [(128, 3, 3), (192, 3, 3), (256, 3, 3), (512, 3, 3)]
    assert [s.name for s in layers] == ["micro with encoder_layers 3, decoder_layers 3",
                                        "mini with encoder_layers 3, decoder_layers 3", "small",  # compact with 3+3 is small
                                        "medium with encoder_layers 3, decoder_layers 3"]
    assert recipe.candidates({}) == recipe.SHAPES
    assert [s.d_model for s in recipe.candidates({"n_heads": 3})] == [192]  # 3 heads divide no other width
    small = {k: v for k, v in recipe.SHAPES[3].model_fields().items()}
    assert [(s.name, s.model_fields(), recipe.steps_needed(s)) for s in recipe.candidates(small)] == [("small", small, 13500)]
    alone = recipe.candidates({**small, "d_model": 320})
    assert [(s.name, s.d_model) for s in alone] == [("set by hand", 320)]
    # a shape made from another needs at least what that one needs: medium's width with 2+2 layers, 108,000
    two = recipe.candidates({"encoder_layers": 2, "decoder_layers": 2})
    assert [(s.name, recipe.steps_needed(s)) for s in two] == [
        ("micro", 4000), ("mini", 4000), ("compact", 4000), ("medium with encoder_layers 2, decoder_layers 2", 108000)]
    for by_hand, message in [
            ({"n_heads": 7}, "n_heads = 7 divides none of the recipe's widths (128, 192, 256, 512): set d_model too"),
            ({"n_heads": 0}, "model option n_heads = 0 is out of range [1, 1024]"),
            ({"d_model": "256"}, 'model option d_model must be int, not "256"'),
            ({"encoder_layers": True}, "model option encoder_layers must be int, not true"),
            ({"d_model": 255}, "d_model = 255 must be even (sinusoidal positions come in sin/cos pairs)"),
            ({"d_model": 250, "n_heads": 4}, "d_model = 250 is not divisible by n_heads = 4")]:
        with pytest.raises(UsageError) as e:
            recipe.candidates(by_hand)
        assert str(e.value) == message

    # every 3+3 candidate needs small's 13,500 steps: a budget that buys each shape ~6,000 gets the smallest,
    # with micro's rate and dropout for its epochs, not the ones of the shape the recipe would choose unasked
    rates = {s.name: rate for s, rate in zip(layers, (2000.0, 1300.0, 800.0))}
    seconds = _seconds_for_steps(2000.0, 6000)
    r = recipe.choose(rates, EPOCH, seconds, None, 1500, 30.0, layers)
    assert r.shape == layers[0].name and r.model["encoder_layers"] == 3 and r.model["d_model"] == 128
    assert r.train["lr"] == pytest.approx(recipe.lr_for(128)) and r.model["dropout"] == recipe.dropout_for(r.epochs, 128)
    assert "mini with encoder_layers 3, decoder_layers 3 would get" in r.reason and "under the 13,500 it needs" in r.reason
    assert recipe.choose(rates, EPOCH, _seconds_for_steps(800.0, 13501), None, 1500, 30.0, layers).shape == "small"
    assert recipe.worth_measuring_next(layers[1].name, 1300.0, seconds, 1500, layers) is False  # small cannot qualify

    # one candidate: chosen, and its settings follow from its own speed
    r = recipe.choose({"set by hand": 700.0}, EPOCH, 3600, None, 1500, 30.0, alone)
    assert r.shape == "set by hand" and r.model["d_model"] == 320
    assert r.reason.endswith("the only shape that fits the options set by hand")
    assert r.budget_tokens == pytest.approx(700 * 3600 * (1 - recipe.EVAL_SHARE))
    assert r.train["lr"] == pytest.approx(recipe.lr_for(320)) and r.model["dropout"] == recipe.dropout_for(r.epochs, 320)


def test_train_with_a_budget_and_no_preset_chooses_stores_and_reuses_the_recipe(tmp_path):
    train = write_slice(tmp_path / "d", "train", 200)
    dev = write_slice(tmp_path / "d", "dev", 4, split="dev")
    args = ("train", "--train", str(train), "--dev", str(dev), "--src", "es", "--tgt", "en", "--out",
            str(tmp_path / "run"), "--dtype", "float32", "--vocab-size", "324", "--batch-tokens", "400")
    r = run_nmt(*args, "--max-steps", "2", "--test", str(dev))
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "recipe: micro model" in err
    # --test: the final model's translations of the held-out set, scored as sacreBLEU scores them
    hyps = (tmp_path / "run" / "test.hyp").read_text(encoding="utf-8").splitlines()
    refs = (tmp_path / "d" / "dev.en").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs) == 4
    record = json.loads((tmp_path / "run" / "training.json").read_text())["test"]
    assert record["lines"] == 4 and record["beam_size"] == 5
    assert record["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert record["bleu"]["signature"].startswith("nrefs:1|") and "test BLEU" in err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["preset"] == "auto" and config["recipe"]["shape"] == "micro"
    assert config["model"]["d_model"] == 128 and config["model"]["dropout"] == 0.0
    assert config["tokenizer"]["vocab_size"] == 324 and config["train"]["batch_tokens"] == 400  # set by hand
    r = run_nmt(*args, "--max-steps", "3")  # resume: the same recipe, not measured again
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "recipe (stored)" in err and "resuming from step-" in err
    # recipe.json lost: config.json's copy restores it
    stored = json.loads((tmp_path / "run" / "recipe.json").read_text())
    (tmp_path / "run" / "recipe.json").unlink()
    r = run_nmt(*args, "--max-steps", "4")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "recipe (stored)" in err and "trains at" not in err
    assert json.loads((tmp_path / "run" / "recipe.json").read_text()) == stored
    # both copies unusable: the error names config.json's, which deleting recipe.json would only restore
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["recipe"]["train"]["eval_every"] = 0
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    (tmp_path / "run" / "recipe.json").unlink()
    r = run_nmt(*args, "--max-steps", "5")
    assert error_line(r, 1, only_line=False).endswith("config.json: its recipe: not a recipe record of this nmt (train eval_every = 0 is "
                                  "under 1); use a new --out")
    assert not (tmp_path / "run" / "recipe.json").exists()


def test_force_over_a_run_with_no_checkpoint_chooses_its_recipe_again(tmp_path):
    """A run that saved no checkpoint, and another width asked for: refused, with --force named as
    the way to replace it; --force then fits the recipe to the new width, not the old run's."""
    train = write_slice(tmp_path / "d", "train", 200)
    args = ("train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--out",
            str(tmp_path / "run"), "--dtype", "float32", "--vocab-size", "324", "--batch-tokens", "400")
    r = run_nmt(*args, "--max-steps", "2")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == pytest.approx(recipe.lr_for(128))
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if stopped before its first checkpoint
    (tmp_path / "run" / "model.safetensors").unlink()  # (nor its model: written with the first checkpoint)
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({"model": {"d_model": 192}}))
    r = run_nmt(*args, "--max-steps", "2", "--config", str(wider))
    assert r.returncode != 0 and "holds an nmt run of another configuration" in r.stderr.decode()
    assert "--force to replace it" in r.stderr.decode()
    r = run_nmt(*args, "--max-steps", "2", "--config", str(wider), "--force")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "recipe (stored)" not in err and "does not fit the shape options set by hand; choosing again" in err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["d_model"] == 192 and config["recipe"]["model"]["d_model"] == 192
    assert config["train"]["lr"] == pytest.approx(recipe.lr_for(192))  # the old run's was lr_for(128)


def test_a_recipe_without_a_budget_is_refused_before_any_work(tmp_path):
    train = write_slice(tmp_path / "d", "train", 20)
    r = run_nmt("train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--out",
                str(tmp_path / "run"), "--preset", "auto")
    assert error_line(r, 2) == "nmt: error: --preset auto chooses the recipe from a budget: give --max-time or --max-steps"
    assert not (tmp_path / "run").exists()


def test_batch_tokens_auto_on_cpu_trains_with_the_recipes_batch(tmp_path):
    train = write_slice(tmp_path / "d", "train", 200)
    r = run_nmt("train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--out",
                str(tmp_path / "run"), "--dtype", "float32", "--vocab-size", "324", "--batch-tokens", "auto",
                "--max-steps", "1")
    assert r.returncode == 0, r.stderr.decode()
    assert "batch 1500," in r.stderr.decode()  # the batch the recipe planned with
    [saved] = (tmp_path / "run" / "checkpoints").glob("step-*/state.pt")
    progress = json.loads(torch.load(saved, weights_only=True)["progress"])
    assert progress["batch_tokens"] == recipe.batch_tokens_for("cpu") == 1500


def test_train_fits_the_recipe_to_the_layers_set_by_hand_and_refuses_a_shape_nothing_fits(tmp_path):
    train = write_slice(tmp_path / "d", "train", 200)
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"model": {"encoder_layers": 3, "decoder_layers": 3}}))
    args = ("train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--dtype", "float32",
            "--vocab-size", "324", "--batch-tokens", "400")
    # a preparation cut short left a recipe chosen for 2+2 layers (and no run): it is chosen again
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.json").write_text(json.dumps(recipe.describe(recipe.choose({}, EPOCH, None, 2, 400, 0.0))))
    # a time budget: the 3+3 candidates are timed (micro's width first; the wider ones cannot get their 13,500 steps)
    r = run_nmt(*args, "--out", str(tmp_path / "run"), "--config", str(layers), "--max-time", "3s")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "the stored one (micro) does not fit the shape options set by hand; choosing again" in err
    assert "recipe: micro with encoder_layers 3, decoder_layers 3 trains at" in err
    assert "recipe: micro with encoder_layers 3, decoder_layers 3 model" in err and "set by hand, kept" not in err
    assert "mini with encoder_layers 3, decoder_layers 3 trains at" not in err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["model"]["encoder_layers"], config["model"]["decoder_layers"], config["model"]["d_model"]) == (3, 3, 128)
    assert config["train"]["lr"] == pytest.approx(recipe.lr_for(128))
    assert config["recipe"]["shape"] == "micro with encoder_layers 3, decoder_layers 3"
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"model": {"n_heads": 7}}))
    r = run_nmt(*args, "--max-steps", "2", "--out", str(tmp_path / "run7"), "--config", str(heads))
    assert error_line(r, 2) == "nmt: error: n_heads = 7 divides none of the recipe's widths (128, 192, 256, 512): set d_model too"
    assert not (tmp_path / "run7").exists()  # refused before any work


def test_a_recipe_run_resumed_with_no_budget_is_told_to_give_one(tmp_path):
    """No --max-time/--max-steps would mean --preset small, another model than the recipe's: the
    resume is refused with what to give, before anything is touched."""
    train = write_slice(tmp_path / "d", "train", 200)
    out = tmp_path / "run"
    args = ("train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--dtype", "float32",
            "--vocab-size", "324", "--batch-tokens", "400", "--out", str(out))
    assert run_nmt(*args, "--max-steps", "2").returncode == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    msg = error_line(run_nmt(*args, "--max-epochs", "3"), 2)
    assert msg == (f"nmt: error: {out} was trained with the recipe chosen for its budget (--preset auto): give "
                   f"--max-time or --max-steps to resume it (its budget continues it, a larger one extends it)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_a_recipe_left_for_another_budget_before_any_checkpoint_is_chosen_again(tmp_path):
    """A preparation cut short (recipe.json, no run) under --max-steps 5,000, re-run with --max-steps 2:
    the recipe is chosen for the new budget (its warm-up, a share of the steps), not reused."""
    train = write_slice(tmp_path / "d", "train", 200)
    out = tmp_path / "run"
    out.mkdir()
    old = replace(recipe.choose({}, EPOCH, None, 5000, 400, 0.0),
                  budget={"max_time": None, "max_steps": 5000, "max_epochs": None})
    (out / "recipe.json").write_text(json.dumps(recipe.describe(old)))
    r = run_nmt("train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--dtype", "float32",
                "--vocab-size", "324", "--batch-tokens", "400", "--out", str(out), "--max-steps", "2")
    err = " ".join(r.stderr.decode().split())
    assert r.returncode == 0, err
    assert f"the stored one ({old.shape}) was chosen for another budget; choosing again" in err
    stored = json.loads((out / "recipe.json").read_text())
    assert stored["budget"]["max_steps"] == 2 and stored["train"]["warmup_steps"] < old.train["warmup_steps"]
    r = run_nmt("train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--dtype", "float32",
                "--vocab-size", "324", "--batch-tokens", "400", "--out", str(out), "--max-steps", "4")
    assert r.returncode == 0 and "recipe (stored)" in r.stderr.decode()  # a resume keeps its run's recipe
    shutil.rmtree(out / "checkpoints")  # a run stopped before its first checkpoint: its recipe kept, and said
    (out / "model.safetensors").unlink()  # (nor its model: written with the first checkpoint)
    r = run_nmt("train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--dtype", "float32",
                "--vocab-size", "324", "--batch-tokens", "400", "--out", str(out), "--max-steps", "3")
    err = " ".join(r.stderr.decode().split())
    assert r.returncode == 0 and "recipe (stored)" in err, err
    assert "its recipe was chosen for another budget (--max-steps 2) and no checkpoint is saved yet" in err


def test_a_recipe_left_for_another_step_size_before_any_run_is_chosen_again(tmp_path):
    """The recipe counts the target tokens of a step: one left by a preparation cut short is reused
    for the same budget and step (a record from before steps were recorded: one batch, one process),
    and chosen again when --update-freq makes each step twice as large."""
    train = write_slice(tmp_path / "d", "train", 200)
    out = tmp_path / "run"
    out.mkdir()
    old = replace(recipe.choose({}, EPOCH, None, 2, 400, 0.0), budget={"max_time": None, "max_steps": 2, "max_epochs": None})
    (out / "recipe.json").write_text(json.dumps(recipe.describe(old)))
    args = ["train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--dtype", "float32",
            "--vocab-size", "324", "--batch-tokens", "400", "--out", str(out), "--max-steps", "2"]
    r = run_nmt(*args, "--update-freq", "2")
    err = " ".join(r.stderr.decode().split())
    assert r.returncode == 0, err
    assert f"the stored one ({old.shape}) was chosen for another budget; choosing again" in err
    budget = json.loads((out / "recipe.json").read_text())["budget"]
    assert budget == {"max_time": None, "max_steps": 2, "max_epochs": None, "update_freq": 2, "processes": 1,
                      "dtype": "float32", "threads": budget["threads"]} and budget["threads"] >= 1
    shutil.rmtree(out)
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps(recipe.describe(old)))
    r = run_nmt(*args)
    assert r.returncode == 0 and "recipe (stored)" in r.stderr.decode()


def test_a_recipe_timed_with_another_dtype_or_thread_count_before_any_run_is_chosen_again(tmp_path):
    """The speeds a recipe timed depend on the dtype and the CPU threads: one left by a preparation cut
    short is chosen again when either differs (said, with what it was timed with), and reused when both
    are the same."""
    train = write_slice(tmp_path / "d", "train", 200)
    out = tmp_path / "run"
    args = ["train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--threads", "1",
            "--vocab-size", "324", "--batch-tokens", "400", "--out", str(out), "--max-steps", "2"]
    base = {"max_time": None, "max_steps": 2, "max_epochs": None, "update_freq": 1, "processes": 1}
    old = replace(recipe.choose({}, EPOCH, None, 2, 400, 0.0), budget={**base, "dtype": "bfloat16", "threads": 1})
    for left, dtype, said in [({"dtype": "bfloat16", "threads": 1}, "float32", "(bfloat16)"),
                              ({"dtype": "float32", "threads": 2}, "float32", "(threads 2)"),
                              ({"dtype": "float32", "threads": 1}, "float32", None)]:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / "recipe.json").write_text(json.dumps(recipe.describe(replace(old, budget={**base, **left}))))
        r = run_nmt(*args, "--dtype", dtype)
        err = " ".join(r.stderr.decode().split())
        assert r.returncode == 0, err
        if said:
            assert f"the stored one ({old.shape}) was timed with another dtype or thread count {said}; choosing again" in err
            assert json.loads((out / "recipe.json").read_text())["budget"] == {**base, "dtype": dtype, "threads": 1}
        else:
            assert "recipe (stored)" in err and "choosing again" not in err
    shutil.rmtree(out / "checkpoints")  # a run stopped before its first checkpoint keeps its recipe, and says so
    (out / "model.safetensors").unlink()  # (nor its model: written with the first checkpoint)
    r = run_nmt(*[("2" if a == "1" and args[i - 1] == "--threads" else a) for i, a in enumerate(args)], "--dtype", "float32")
    err = " ".join(r.stderr.decode().split())
    assert r.returncode == 0 and "recipe (stored)" in err, err
    assert ("its recipe was timed with another dtype or thread count (threads 1) and no checkpoint is saved yet: a new "
            "--out times the shapes again") in err


def test_a_missing_test_set_fails_before_training(tmp_path):
    train = write_slice(tmp_path / "d", "train", 20)
    r = run_nmt("train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--out",
                str(tmp_path / "run"), "--max-steps", "2", "--test", str(tmp_path / "nowhere" / "test"))
    assert without_paths(error_line(r, 1)) == "nmt: error: <path>: no such file (nor <path>)"
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("src, tgt, expected", [
    (b"", b"", "<path>, <path>: the test set is empty (give a test set with lines, or leave out --test)"),
    (b"uno\n\xff dos\n", b"one\ntwo\n", "<path>: line 2: invalid UTF-8 at byte 0"),
])
def test_an_empty_or_unreadable_test_set_fails_before_training(tmp_path, src, tgt, expected):
    train = write_slice(tmp_path / "d", "train", 20)
    (tmp_path / "d" / "test.es").write_bytes(src)
    (tmp_path / "d" / "test.en").write_bytes(tgt)
    r = run_nmt("train", "--train", str(train), "--dev", "none", "--src", "es", "--tgt", "en", "--out",
                str(tmp_path / "run"), "--max-steps", "2", "--test", str(tmp_path / "d" / "test"))
    assert without_paths(error_line(r, 1)).startswith(f"nmt: error: {expected}")
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_measure_times_the_same_batches_again_after_a_pass_that_makes_their_kernels(monkeypatch):
    """A batch costs more the first time its shapes are met (kernels made): the rate is read on the
    second pass over the same batches, so it is the rate a long run sees. The clock is the test's:
    a step advances it by 4 ms the first time it meets a batch, 1 ms after."""
    seen: list[int] = []
    clock = [0.0]
    monkeypatch.setattr(recipe, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))

    def step(shape):
        def run(i: int) -> int:
            clock[0] += 0.004 if i not in seen else 0.001
            seen.append(i)
            return 100
        return run

    rates = recipe.measure(recipe.SHAPES[:1], step, seconds=0.05)
    assert seen == list(range(13)) * 2  # untimed until 50 ms have passed (13 steps of 4 ms), then the same again
    assert rates["micro"] == pytest.approx(100 / 0.001)  # the 1 ms steps, not the 4 ms ones
