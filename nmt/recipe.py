"""The training recipe chosen from the budget: model shape, vocabulary, batch, learning rate,
warm-up, schedule, dropout and evaluation interval, for the machine at hand and the time given.

`nmt train --max-time 30m` (or `--max-steps N`) with no `--preset` asks this module. It works in
two moves, because the vocabulary must exist before a model can be timed on real batches:

1. `vocabulary(...)`: the subword vocabulary from the corpus size (before the tokenizer).
2. `choose(...)`: each candidate shape is timed for a few optimizer steps on real batches of
   the token cache (`measure`), the budget is turned into the target tokens each shape would see,
   and the rules below pick one shape and its training settings, with a one-line reason.

The rules were found by training on the embedded corpus and scoring on its dev set (never on
test); the README's "Choosing the recipe" section has the measurements behind each one. Every
choice can still be overridden by an explicit option; the recipe is stored in OUT/recipe.json (and
a copy in config.json, which restores it if recipe.json is lost), so a resume continues the same
run without measuring again.

Steps are optimizer steps: with `--update-freq K` a step takes K batches, and under torchrun each
of R ranks takes its own, so a step sees K·R batches; the rates are measured on one process,
and R ranks are taken to train R times as fast.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Callable

from nmt.config import (ModelConfig, TrainConfig, choices, limit_problem, model_config_problem, shape_problem,
                        type_problem)
from nmt.errors import NmtError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """One candidate model: the ModelConfig fields that change between candidates."""

    name: str
    d_model: int
    n_heads: int
    d_ff: int
    encoder_layers: int
    decoder_layers: int
    floor: int = 0  # steps needed at least: those of the shape it was made from (`candidates`)

    def model_fields(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k not in ("name", "floor")}


# Smallest first. While a budget buys few optimizer steps, every shape learns about as much per
# step (measured: the same training loss at step 200-250 for 3.6 M to 7.6 M parameters), so
# the fastest one ends best (10 minutes on one core: 2.0 M parameters and 1,170 steps, dev BLEU
# 6.2; 3.6 M and 784 steps, 4.6; 5.7 M and 495 steps, 1.6); a larger shape pays off once it
# gets enough steps to use its size.
SHAPES: tuple[Shape, ...] = (
    Shape("micro", d_model=128, n_heads=4, d_ff=512, encoder_layers=2, decoder_layers=2),
    Shape("mini", d_model=192, n_heads=4, d_ff=768, encoder_layers=2, decoder_layers=2),
    Shape("compact", d_model=256, n_heads=4, d_ff=1024, encoder_layers=2, decoder_layers=2),
    Shape("small", d_model=256, n_heads=4, d_ff=1024, encoder_layers=3, decoder_layers=3),
    Shape("medium", d_model=512, n_heads=8, d_ff=2048, encoder_layers=6, decoder_layers=6),
)

SHAPE_FIELDS = ("d_model", "n_heads", "d_ff", "encoder_layers", "decoder_layers")


def candidates(by_hand: dict[str, Any]) -> tuple[Shape, ...]:
    """The candidate shapes with the shape options set by hand (`by_hand`, e.g. the layers from a
    `--config` file) in place of their own: the recipe then chooses what was left open (the width,
    when the layers are set) by the same rules, and fits the learning rate, dropout and warm-up to
    the shape that will train, not to one it would have chosen. A candidate that becomes another
    is named after it (compact with 3+3 layers is small); repeats are dropped, and so are widths
    the heads set by hand do not divide. Each keeps the steps its original shape needs as a floor
    (`steps_needed`). All five set by hand leave one candidate, timed alone. A value that cannot
    make a model is refused with a one-line `UsageError`."""
    if not by_hand:
        return SHAPES
    unknown = set(by_hand) - set(SHAPE_FIELDS)
    if unknown:
        raise ValueError(f"not shape options: {sorted(unknown)}")
    for k, v in by_hand.items():
        problem = limit_problem(k, v)
        if problem:
            raise UsageError(f"model option {problem}")
    d_model, n_heads = by_hand.get("d_model"), by_hand.get("n_heads")
    problem = shape_problem(d_model, n_heads) if d_model is not None else None
    if problem:
        raise UsageError(problem)
    known = {tuple(s.model_fields().values()): s.name for s in SHAPES}
    said = ", ".join(f"{k} {v}" for k, v in by_hand.items())
    shapes: list[Shape] = []
    seen: set[tuple[int, ...]] = set()
    for base in SHAPES:
        fields = {**base.model_fields(), **by_hand}
        key = tuple(fields.values())
        if shape_problem(fields["d_model"], fields["n_heads"]) or key in seen:
            continue
        seen.add(key)
        name = known.get(key) or ("set by hand" if len(by_hand) == len(SHAPE_FIELDS) else f"{base.name} with {said}")
        shapes.append(Shape(name, **fields, floor=steps_needed(base)))
    if not shapes:
        widths = ", ".join(str(d) for d in sorted({s.d_model for s in SHAPES}))
        raise UsageError(f"n_heads = {n_heads} divides none of the recipe's widths ({widths}): set d_model too")
    return tuple(shapes)


# The largest shape that the budget buys the steps it needs (`steps_needed`: MIN_STEPS optimizer
# steps of CPU batches of 1,500 tokens for a 2+2-layer stack, ~5 M target tokens, ~6 epochs of
# the embedded corpus) is chosen, else the smallest. In every 10-minute run the faster shape with
# more steps won (micro at 1,442 steps: dev BLEU 10.5), and `small` with batches of 3,000 tokens
# still gained 3.3 dev BLEU between its steps 1,500 and 2,500 (3,000-5,000 steps of 1,500
# tokens; README): a larger shape with fewer steps than that is still learning what the smaller
# one already knows.
MIN_STEPS = 4000


def steps_needed(shape: Shape) -> int:
    """Optimizer steps a shape needs before it beats the faster one below it: MIN_STEPS for a
    2+2-layer stack, with the cube of its layers beyond that (small, 3+3: 13,500; medium, 6+6:
    108,000, not measured). Measured as small against compact (2+2, same width, ~1.4 times the
    steps), dev BLEU: small behind by 2.3 with 4,766 steps (30 minutes, bf16, AMD Zen 4), by 1.5
    with 5,855 (30 minutes, bf16, Intel Xeon with AMX), by 0.9 with 7,071 (90 minutes, float32, one
    thread), by 0.3 and 0.4 with ~11,700 against ~16,500 (60 minutes, bf16, one thread each, side
    by side, two seeds), and ahead by 0.1 with 12,980 against 18,473 (90 minutes, bf16, one thread
    each, side by side; on test still 0.8 behind greedy): the shapes score alike from about 13,000.
    The square of the layers (9,000) chose small where compact, in another session, scored 1.7 dev
    BLEU more (30 minutes, bf16, a fast machine: 9,342 steps against 12,756). The rule reads the
    probe's rate; runs trained at 0.67-1.12 times it. A shape made from another by
    options set by hand needs at least what that one needs (`Shape.floor`): medium's width with 2+2
    layers was never measured against the shapes below it."""
    return max(shape.floor, MIN_STEPS * max(4, shape.encoder_layers + shape.decoder_layers) ** 3 // 64)


EVAL_SHARE = 0.05  # at most this share of the budget goes to dev evaluations
CHECKPOINT_SECONDS = 3600  # a long budget evaluates (and saves) about this often, within EVAL_SHARE
REAL_SHARE = 0.85  # real target tokens per padded batch token: 0.83-0.86 measured on the embedded corpus


@dataclass
class Recipe:
    shape: str
    model: dict[str, Any]  # ModelConfig overrides
    train: dict[str, Any]  # TrainConfig overrides
    budget_tokens: float  # target tokens the budget buys with this shape (estimate)
    epochs: float  # the same, in passes over the training data
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # measured, per shape
    reason: str = ""
    budget: dict[str, Any] = field(default_factory=dict)  # what it was chosen for: max_time, max_steps,
    # max_epochs, the size of a step (update_freq, processes), and what set the speeds timed (dtype, threads)


def vocabulary(corpus_pairs: int) -> int:
    """Joint BPE size from the number of training pairs: small corpora learn better with fewer,
    more frequent pieces (Sennrich & Zhang 2019); large ones afford more."""
    if corpus_pairs < 100_000:  # 27k pairs, micro, lr 4e-3, 10 min on one core: dev BLEU 7.5 at 8k, 10.5 at 4k, 9.8 at 2k
        return 4000
    if corpus_pairs < 1_000_000:
        return 16000
    return 32000


def lr_for(d_model: int) -> float:
    """Adam's peak rate, inversely proportional to the width (as muP scales it for Adam): 4e-3 at
    d_model 128, 2e-3 at 256, 1e-3 at 512. Measured at 128 (BPE 4k: 4e-3 dev BLEU 10.5, 2e-3 8.1; 8k: 7.5, 6.2) and at
    256 (2e-3 beat 3e-3); 1e-3 at 512 is the rate the `base` preset trains with."""
    return 4e-3 * 128 / d_model


def dropout_for(epochs: float, d_model: int) -> float:
    """No dropout while the model sees each pair only a few times (it cannot overfit yet, and
    dropout slows learning); more as the budget buys more passes over the data, and sooner for a
    wider model, which overfits a small corpus sooner. Measured on dev (README): micro (d_model
    128) at ~5 epochs, dropout 0 beat 0.1 by 1.3 BLEU; compact (256) at ~7 epochs lost by 0.2 with
    12% more steps (dev loss 2.64 against 2.57), at ~9 by 2.1. The 12 epochs for 0.2 are the fixed presets' figure."""
    if epochs < (8 if d_model <= 128 else 4):
        return 0.0
    if epochs < 12:
        return 0.1
    return 0.2


def batch_tokens_for(device_type: str) -> int:
    """Padded target tokens per batch. On CPU small batches learn more per second in short
    budgets (more updates per token, and no slower per token here); a GPU needs large ones to be busy."""
    return 1500 if device_type == "cpu" else 12000


def _next_larger(name: str, shapes: tuple[Shape, ...] = SHAPES) -> Shape | None:
    """The shape after `name` in `shapes` (smallest first), None after the largest."""
    names = [s.name for s in shapes]
    i = names.index(name) + 1
    return shapes[i] if i < len(shapes) else None


def worth_measuring_next(name: str, rate: float, max_time: float | None, batch_tokens: int,
                         shapes: tuple[Shape, ...] = SHAPES, update_freq: int = 1,
                         step_cap: float | None = None) -> bool:
    """After timing `name` at `rate` tokens/s (one process): could the next, larger shape get the
    steps it needs? A larger shape is never faster, so if this one cannot, neither can it. (Ranks
    cancel out: R of them see R times the tokens in R times the batches per step.) `step_cap`: the
    steps --max-steps or --max-epochs allow whatever the speed (`step_cap_of`)."""
    larger = _next_larger(name, shapes)
    if larger is None or (step_cap is not None and step_cap < steps_needed(larger)):
        return False
    return max_time is None or \
        rate * max_time * (1 - EVAL_SHARE) >= steps_needed(larger) * REAL_SHARE * batch_tokens * update_freq


def step_cap_of(max_steps: int | None, max_epochs: int | None, corpus_tokens: int, batch_tokens: int,
                update_freq: int = 1, ranks: int = 1) -> float | None:
    """The optimizer steps that --max-steps and --max-epochs allow (the smaller), None without either."""
    caps = [float(max_steps)] if max_steps else []
    if max_epochs:
        caps.append(max_epochs * corpus_tokens / (REAL_SHARE * batch_tokens * update_freq * ranks))
    return min(caps, default=None)


def measure(shapes: tuple[Shape, ...], step: Callable[[Shape], Callable[[int], int]], seconds: float = 2.0,
            keep_going: Callable[[str, float], bool] = lambda name, rate: True,
            out_of_memory: list[str] | None = None) -> dict[str, float]:
    """Target tokens/s of each shape, smallest first: `step(shape)` builds it and returns a function
    that runs one optimizer step on real batch i (the same batches for every shape) and returns its
    target tokens. Batches 0, 1, 2, … run for `seconds` (at least two), untimed; then the same
    batches again, timed. The first pass makes the kernels for the batches' matrix shapes, which a
    long run makes once and reuses; timed, it charged them to whichever shape met a width first:
    measured with bf16 on an AMX Xeon, compact read 5,051 target tokens/s on new batches and 5,952
    on the same ones again, small (same width, timed after it) 4,459 and 4,508, and the 30-minute
    runs trained at 5,459 and 4,055. Stops early when `keep_going(name, rate)` says the larger
    shapes cannot be chosen anyway, or when a shape's step raises `DoesNotFit` (out of memory: the
    larger ones would too: its name is appended to `out_of_memory`, for `choose`'s reason); the
    smallest not fitting is a one-line error."""
    rates: dict[str, float] = {}
    for shape in shapes:
        try:
            rates[shape.name] = _rate(step(shape), seconds)  # the shape's model is freed before the next is built
        except DoesNotFit:
            if not rates:
                raise NmtError(f"the recipe's smallest model ({shape.name}) runs out of memory at this batch size: "
                               f"lower --batch-tokens") from None
            log.info("recipe: %s runs out of memory here; larger shapes are not timed", shape.name)
            if out_of_memory is not None:
                out_of_memory.append(shape.name)
            break
        log.info("recipe: %s trains at %s target tokens/s here", shape.name, f"{rates[shape.name]:,.0f}")
        if not keep_going(shape.name, rates[shape.name]):
            break
    return rates


class DoesNotFit(Exception):
    """Raised by a `measure` step function whose shape runs out of memory."""


def _rate(run: Callable[[int], int], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        run(n)
        n += 1
    t0 = time.perf_counter()
    tokens = sum(run(i) for i in range(n))
    return tokens / (time.perf_counter() - t0)


def choose(rates: dict[str, float], corpus_tokens: int, max_time: float | None, max_steps: int | None,
           batch_tokens: int, eval_seconds: float, shapes: tuple[Shape, ...] = SHAPES, *,
           update_freq: int = 1, ranks: int = 1, max_epochs: int | None = None,
           out_of_memory: str | None = None) -> Recipe:
    """Pick the shape and settings for a budget of `max_time` seconds and/or `max_steps` steps
    (and at most `max_epochs` passes over the data, when set).

    rates: measured target tokens/s per shape, on one process; corpus_tokens: target tokens in one
    epoch; batch_tokens: the padded token budget per batch; eval_seconds: estimated cost of one
    dev evaluation (0 without a dev set); shapes: the candidates, smallest first (`candidates`);
    update_freq: batches per optimizer step on each rank; ranks: processes training together;
    out_of_memory: the shape whose trial ran out of memory (`measure`), for the reason."""
    per_step = REAL_SHARE * batch_tokens * update_freq * ranks  # real target tokens per optimizer step

    if not max_time and not max_steps:
        raise UsageError("--preset auto chooses the recipe from a budget: give --max-time or --max-steps")

    def tokens_of(name: str) -> float:
        budget = []
        if max_time:
            budget.append(rates[name] * ranks * max_time * (1 - EVAL_SHARE))
        if max_steps:
            budget.append(max_steps * per_step)
        if max_epochs:
            budget.append(max_epochs * corpus_tokens)
        return min(budget)

    candidates = [s for s in shapes if s.name in rates] if max_time else list(shapes)
    shape = candidates[0]
    for s in candidates[1:]:
        if tokens_of(s.name) >= steps_needed(s) * per_step:
            shape = s
    tokens = tokens_of(shape.name)
    epochs = tokens / max(corpus_tokens, 1)
    steps = max(1, int(tokens / per_step))
    # shorter warm-ups learned slower (README); at most half of a run of under 200 steps, so the peak is reached
    warmup = int(min(400, max(100, 0.25 * steps), 0.5 * steps))
    lr = lr_for(shape.d_model)
    dropout = dropout_for(epochs, shape.d_model)
    seconds = max_time  # the run's length: the time budget, or less where its steps or epochs end it sooner
    if max_time and tokens < rates[shape.name] * ranks * max_time * (1 - EVAL_SHARE):
        seconds = tokens / (rates[shape.name] * ranks * (1 - EVAL_SHARE))
    evals = _evaluations(seconds, eval_seconds)
    eval_every = max(50, int(1.1 * steps) // evals)  # the last one inside the budget not right before its end
    speed = f" at {rates[shape.name]:,.0f} tokens/s" if shape.name in rates else f" in {max_steps:,} steps"
    if ranks > 1:
        speed += f" on each of {ranks} ranks"
    per = f" × {update_freq * ranks} per step" if update_freq * ranks > 1 else ""
    reason = (f"{shape.name} model, dropout {dropout}, lr {lr:g}, batch {batch_tokens}{per}, cosine to 0: the budget "
              f"buys ~{tokens / 1e6:.2f} M target tokens (~{epochs:.1f} epochs, ~{steps:,} steps){speed}; "
              + _why(shape, candidates, tokens_of, per_step, shapes, out_of_memory))
    return Recipe(
        shape=shape.name,
        model={**shape.model_fields(), "dropout": dropout},
        train={"batch_tokens": batch_tokens, "lr": lr, "warmup_steps": warmup, "lr_schedule": "cosine",
               "eval_every": eval_every, "average_last": 0},
        budget_tokens=tokens, epochs=epochs, tokens_per_s=rates, reason=reason)


def _evaluations(max_time: float | None, eval_seconds: float) -> int:
    """How many dev evaluations a run of `max_time` seconds (None: of a step budget) affords within
    EVAL_SHARE (2 to 20; the last one comes when the budget is spent, so at least one falls inside
    it: it also saves a checkpoint). A long budget gets one about every CHECKPOINT_SECONDS, as long
    as they still fit in the share: each saves a checkpoint, and a run killed without one (SIGKILL,
    a power cut) loses what came after the last."""
    if not max_time:
        return 10
    hourly = math.ceil(max_time / CHECKPOINT_SECONDS)
    if eval_seconds <= 0:
        return max(10, hourly)
    return int(min(max(20, hourly), max(2, EVAL_SHARE * max_time / eval_seconds)))


def _why(shape: Shape, candidates: list[Shape], tokens_of, per_step: float, shapes: tuple[Shape, ...],
         out_of_memory: str | None = None) -> str:
    if len(shapes) == 1:
        return "the only shape that fits the options set by hand"
    b = _next_larger(shape.name, shapes)
    if b is None:
        return "the largest candidate"
    if b.name == out_of_memory:
        return f"{b.name} runs out of memory at this batch size"
    if b in candidates:
        steps = tokens_of(b.name) / per_step
        return f"{b.name} would get {steps:,.0f} steps, under the {steps_needed(b):,} it needs"
    return f"{b.name} would get fewer than the {steps_needed(b):,} steps it needs"


def describe(recipe: Recipe) -> dict[str, Any]:
    """The JSON record stored in OUT/recipe.json and, with the run's configuration, in config.json."""
    return asdict(recipe)


MODEL_SETTINGS = (*SHAPE_FIELDS, "dropout")  # what a recipe sets (`choose`), of ModelConfig
TRAIN_SETTINGS = ("batch_tokens", "lr", "warmup_steps", "lr_schedule", "eval_every", "average_last")  # of TrainConfig


def _settings_problem(chosen: Recipe) -> str | None:
    """Why a record's settings cannot configure a run (an option a recipe does not set, a value of
    the wrong type or out of range), or None: a record is read from a file, which can hold anything.
    The model's are checked as a model directory's config is (`model_config_problem`)."""
    for section, known in (("model", MODEL_SETTINGS), ("train", TRAIN_SETTINGS)):
        if unknown := sorted(set(getattr(chosen, section)) - set(known)):
            return f"{section} setting {', '.join(unknown)} is not a recipe's"
    # the vocabulary sizes come from the tokenizer, not from a recipe: any valid one stands in for them
    if problem := model_config_problem(replace(ModelConfig(src_vocab_size=4, tgt_vocab_size=4), **chosen.model)):
        return f"model {problem}"
    train = chosen.train
    if problem := type_problem(replace(TrainConfig(), **train)):
        return f"train {problem}"
    lowest = {"batch_tokens": 1, "eval_every": 1, "warmup_steps": 0, "average_last": 0}
    for name in set(lowest) & set(train):
        if not isinstance(train[name], int) or isinstance(train[name], bool):  # batch_tokens: a run's may be "auto"
            return f"train {name} must be int, not {train[name]!r}"
        if train[name] < lowest[name]:
            return f"train {name} = {train[name]} is under {lowest[name]}"
    if not train.get("lr", 1) > 0:
        return f"train lr = {train['lr']} is not > 0"
    if train.get("lr_schedule", "cosine") not in choices(TrainConfig, "lr_schedule"):
        return f"train lr_schedule {train['lr_schedule']!r} is not one of {', '.join(choices(TrainConfig, 'lr_schedule'))}"
    return None


def _budget_problem(chosen: Recipe) -> str | None:
    """Why a record's budget (what it was chosen for: `Recipe.budget`) cannot be compared or said,
    or None: each value a number or none, the dtype a name."""
    for name, value in chosen.budget.items():
        if name == "dtype":
            if value is not None and not isinstance(value, str):
                return f"budget dtype must be a name, not {value!r}"
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"budget {name} must be a number, not {value!r}"
    return None


def from_record(record: Any, where: str, fix: str = "use a new --out") -> Recipe:
    """The recipe a record (recipe.json, or config.json's copy) describes; a record of another
    shape is an error naming `where`."""
    names = [f.name for f in fields(Recipe)]
    required = [f.name for f in fields(Recipe) if f.default is MISSING and f.default_factory is MISSING]
    chosen = None
    if not isinstance(record, dict):
        problem = "not a JSON object"
    elif missing := [k for k in required if k not in record]:
        problem = f"no {', '.join(missing)}"
    elif unknown := [k for k in record if k not in names]:
        problem = f"unexpected {', '.join(unknown)}"
    else:
        chosen = Recipe(**record)
        problem = type_problem(chosen) or _settings_problem(chosen) or _budget_problem(chosen)  # as a --config file's are
    if problem is not None:
        raise NmtError(f"{where}: not a recipe record of this nmt ({problem}); {fix}")
    return chosen  # type: ignore[return-value]


