"""The Python API: `nmt.load(directory)` → a `Model` that translates and scores lines.

    import nmt
    model = nmt.load("runs/es-en")                     # a model directory or a CTranslate2 export
    model.translate(["Y dijo Dios: Sea la luz."], beam_size=5)   # → ["And God said, …"]
    model.score(["Y dijo Dios: Sea la luz."], ["And God said, Let there be light."])

The keyword options are the CLI's decoding options, named like `config.DecodeConfig`'s fields
(`beam_size`, `nbest`, `length_penalty`, …): given to `load` they become the model's defaults,
given to a call they apply to that call. An unknown name is a `UsageError` naming it.

This module is the one place a directory becomes something that translates: `nmt translate`
and `nmt score` call `load` and `Model.translator` too, so the CLI and the API give the same
output. The line contract, batching and scoring are `Translator`'s (`nmt.translate`), the
searches the engines' (`nmt.engines`). torch is imported by `load`, not by `import nmt`.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from nmt.config import DecodeConfig, apply, check_decode, check_threads
from nmt.directions import of_model
from nmt.errors import UsageError
from nmt.textio import in_step


class Model:
    """A loaded model directory (or CTranslate2 export) and its default decoding options."""

    def __init__(self, engine_for: Callable[[DecodeConfig], Any], vocabs: Any, defaults: DecodeConfig,
                 directory: Path, src_language: str | None = None, directions: Any = None):
        from nmt import directions as d

        self._engine_for, self.vocabs, self.defaults, self.directory = engine_for, vocabs, defaults, directory
        self.src_language = src_language  # for split_sentences' sentence splitter
        self.directions = directions if directions is not None else d.Directions(())  # `directions.Directions`
        self._tag_ids = d.tag_ids(vocabs.src, self.directions, str(directory))

    def __repr__(self) -> str:
        return f"nmt.Model({str(self.directory)!r})"

    def options(self, **options: Any) -> DecodeConfig:
        """The defaults with these options applied and checked."""
        return decode_config(self.defaults, options, "Model")

    def translator(self, tgt_lang: str | None = None, **options: Any):
        """A `Translator` (the line contract around this model's engine) for these options;
        `tgt_lang` picks the output language of a multi-direction model (its tag)."""
        from nmt.directions import source_prefix
        from nmt.translate import Translator

        config = self.options(**options)
        prefix = source_prefix(self.directions, self._tag_ids, tgt_lang)
        return Translator(self._engine_for(config), self.vocabs, config, self._source_language(tgt_lang), prefix)

    def _source_language(self, tgt_lang: str | None) -> str | None:
        """The source language of the chosen direction (the sentence splitter's language)."""
        for src, tgt in self.directions.pairs:
            if tgt_lang is None or tgt == tgt_lang:
                return src
        return self.src_language

    def translate(self, lines: str | Iterable[str], prefix: str | Iterable[str] | None = None,
                  **options: Any) -> str | list[str]:
        """The 1-best translation of each line (one string per line, in order; "" for an empty
        line). A single string in gives a single string out. `prefix`: the start forced on each
        line's translation (a string per line, "" for none; one string for one line).
        With `alignment=True` each translation comes as `text ||| 0-0 1-2`, as `nmt translate
        --alignment` prints it. `tgt_lang="es"` chooses the output language of a model trained
        on several directions (required there)."""
        from nmt.translate import to_text

        if isinstance(lines, str):
            return self.translate([lines], None if prefix is None else [_one(prefix)], **options)[0]
        aligned = bool(options.get("alignment", self.defaults.alignment))
        return [to_text(t, aligned) for t in self.translations(lines, prefix, **options)]

    def translations(self, lines: Iterable[str], prefix: Iterable[str] | None = None, **options: Any) -> Iterator:
        """The full records (`translate.Translation`: n-best hypotheses with scores, flags,
        alignments, sentences), lazily; `prefix` as for `translate`."""
        if isinstance(lines, str) or isinstance(prefix, str):
            raise TypeError("translations(lines, prefix): give lists of strings")
        return self.translator(**options).translate(lines, prefix, names=("lines", "prefix"))

    def score(self, sources: str | Iterable[str], targets: str | Iterable[str], normalize: bool = True,
              **options: Any) -> float | None | list[float | None]:
        """log p(target | source) of each pair (teacher forcing, EOS included), divided by the
        length penalty of `length_penalty`/`length_norm` as beam search does for the score it
        reports, or summed only with `normalize=False`; None for a pair with both sides empty."""
        if isinstance(sources, str) and isinstance(targets, str):
            return self.score([sources], [targets], normalize, **options)[0]
        return [s.score for s in self.scores(sources, targets, normalize, **options)]

    def scores(self, sources: Iterable[str], targets: Iterable[str], normalize: bool = True,
               **options: Any) -> Iterator:
        """The full records (`translate.Score`: per-token log-probabilities, flags), lazily; a
        different number of sources and targets is an error once the shorter one ends."""
        if isinstance(sources, str) or isinstance(targets, str):
            raise TypeError("score(sources, targets): give two strings or two lists of strings")
        return self.translator(**options).score(in_step(sources, targets, ("sources", "targets")), normalize,
                                                 names=("sources", "targets"))


def _one(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise TypeError("translate(line, prefix): one line takes one prefix string")
    return prefix


def decode_config(defaults: DecodeConfig, options: dict[str, Any], what: str) -> DecodeConfig:
    """`defaults` with `options` (DecodeConfig field names) applied; unknown names and values
    that cannot work are usage errors naming them."""
    names = {f.name for f in dataclasses.fields(DecodeConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"{what}: unknown option(s) {', '.join(unknown)} (decoding options: {', '.join(sorted(names))})")
    config = apply(defaults, options, what)
    check_decode(config)
    return config


def load(directory: str | Path, *, device: str = "auto", dtype: str = "auto", threads: int = 0,
         **options: Any) -> Model:
    """A model directory written by `nmt train`, or a CTranslate2 export written by `nmt export`
    (recognised from the directory), ready to translate and score. `device`: auto, cpu or cuda;
    `dtype`: auto, float32, bfloat16 or int8 (CPU dynamic quantisation; for an export, its
    compute type); `threads`: CPU threads (0: all cores); `options`: default decoding options."""
    from nmt import engines

    directory = Path(directory)
    defaults = decode_config(DecodeConfig(), options, "load")
    check_threads(threads)  # (CTranslate2 takes it unsigned: -1 would be its internal error)
    if dtype not in ("auto", "float32", "bfloat16", "int8"):
        raise UsageError(f"--dtype: unknown value {dtype!r} (choose from auto, float32, bfloat16, int8)")
    if engines.is_ctranslate2_dir(directory):
        if device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device: unknown value {device!r} (choose from auto, cpu, cuda)")
        from nmt.export import EXPORT_META, ctranslate2_module

        if device == "auto":
            device = "cuda" if ctranslate2_module().get_cuda_device_count() > 0 else "cpu"
        compute_type = {"auto": "default"}.get(dtype, dtype)
        base = engines.CTranslate2.load(directory, defaults, compute_type=compute_type, threads=threads, device=device)
        # the directions its record names (an export from before they were: untagged)
        return Model(base.with_config, base.vocabs, defaults, directory, base.src_language,
                     of_model(base.record, str(directory / EXPORT_META)))
    import torch

    from nmt import checkpoint, runtime

    rt = runtime.setup(device, "float32" if dtype == "int8" else dtype, threads)
    model, vocabs, config = checkpoint.load_for_inference(directory, rt.device)
    if dtype == "int8":
        if rt.device.type != "cpu":
            raise UsageError("--dtype int8 is CPU-only (dynamic quantisation)")
        with warnings.catch_warnings():  # torch 2.13 says on every call that these tensors are deprecated:
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated", category=UserWarning)
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    src = config.get("src")
    return Model(lambda c: engines.for_model(model, rt, c), vocabs, defaults, directory,
                 src if isinstance(src, str) else None, of_model(config, str(directory / "config.json")))
