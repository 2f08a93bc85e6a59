"""Export a model directory to CTranslate2, and translate with the exported model.

`export_ctranslate2` maps our Transformer onto `ctranslate2.specs.TransformerSpec` weight by
weight and writes a CTranslate2 model directory atomically (built under a temporary name
beside the target, then renamed). Beside CTranslate2's own files (model.bin, config.json,
the vocabularies as token strings in id order) the directory holds a copy of our tokenizer
JSON file(s), so users can tokenize without the nmt model directory, and `nmt_export.json`
with what translation needs beyond the weights (max_positions, the length-cap defaults).

`translate_ctranslate2` runs the exported model under the line contract and the options of
`nmt translate`; its docstring says where CTranslate2's search differs from ours. The tests
and the benchmark use it; serving the model is left to CTranslate2 itself.

How our modules map onto the spec (D = d_model):

    src_embed / tgt_embed          encoder.embeddings[0] / decoder.embeddings (× √D: scale_embeddings)
    positions [P, D]               {encoder,decoder}.position_encodings.encodings (our interleaved
                                   sin/cos table; CTranslate2's built-in one is sin‖cos, so it is given)
    res1/res2/res3.norm            self_attention / attention / ffn .layer_norm (pre- or post-norm alike)
    SelfAttention.qkv [3D, D], out self_attention.linear[0] (fused q,k,v), linear[1]
    CrossAttention.q, kv [2D, D], out   attention.linear[0], linear[1] (fused k,v), linear[2]
    FeedForward.w1, w2 (ReLU)      ffn.linear_0, linear_1
    encoder_norm / decoder_norm    encoder.layer_norm / decoder.layer_norm (pre-norm only)
    output (no bias, maybe tied)   decoder.projection (tied copies become one aliased variable)

ctranslate2 is an optional dependency (`pip install 'nmt[ctranslate2]'`), imported lazily.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from nmt.config import DecodeConfig
from nmt.errors import NmtError, UsageError
from nmt.tokenizer import BOS_ID, EOS_ID, SPECIALS, UNK_ID, Vocabs, decode_batch, encode_batch
from nmt.translate import one_line

EXPORT_META = "nmt_export.json"
EXPORT_FORMAT = "nmt-ctranslate2"


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise NmtError("ctranslate2 is not installed: pip install 'nmt[ctranslate2]'") from None
    return ctranslate2


# -- export -------------------------------------------------------------------------------------


def export_ctranslate2(model_dir: Path, out_dir: Path, quantization: str | None = None) -> Path:
    """Convert an nmt model directory into a CTranslate2 model directory at `out_dir`.

    `quantization` is CTranslate2's weight type on disk (int8, int8_float32, int16, float16,
    bfloat16, float32; None keeps float32); the compute type can still be chosen when loading.
    An existing `out_dir` is replaced only if it is a CTranslate2 model directory."""
    ct2 = _ctranslate2()
    from nmt import __version__, checkpoint

    accepted = ct2.specs.model_spec.ACCEPTED_MODEL_TYPES
    if quantization is not None and quantization not in accepted:
        raise UsageError(f"unknown quantization {quantization!r} (choose from {', '.join(accepted)})")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_target(model_dir, out_dir)
    model, vocabs, _ = checkpoint.load_for_inference(model_dir)
    spec = build_spec(ct2, model, vocabs)
    spec.validate()
    spec.optimize(quantization=quantization)  # alias tied matrices, then quantize
    c = model.config
    meta = {
        "format": EXPORT_FORMAT, "version": 1, "source_model": str(model_dir.resolve()),
        "max_positions": c.max_positions, "quantization": quantization or "float32",
        "tokenizer_files": sorted(vocabs.files()), "vocab_fingerprint": vocabs.fingerprint(),
        "decode_defaults": {"max_length_a": DecodeConfig.max_length_a, "max_length_b": DecodeConfig.max_length_b},
        "versions": {"nmt": __version__, "ctranslate2": ct2.__version__},
    }
    _save_atomically(spec, [model_dir / name for name in vocabs.files()], meta, out_dir)
    return out_dir


def build_spec(ct2, model, vocabs: Vocabs):
    """A filled-in `TransformerSpec` (not yet validated) for our Transformer and vocabularies."""
    c = model.config
    specs = ct2.specs
    spec = specs.TransformerSpec.from_config(
        (c.encoder_layers, c.decoder_layers), c.n_heads, pre_norm=c.pre_norm, activation=specs.Activation.RELU)
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = _np(model.src_embed.weight)
    dec.embeddings.weight = _np(model.tgt_embed.weight)
    enc.position_encodings.encodings = _np(model.positions)  # [max_positions, D]
    dec.position_encodings.encodings = _np(model.positions)
    for layer_spec, layer in zip(enc.layer, model.encoder):
        _self_attention(layer_spec.self_attention, layer.attn, layer.res1.norm)
        _ffn(layer_spec.ffn, layer.ffn, layer.res2.norm)
    for layer_spec, layer in zip(dec.layer, model.decoder):
        _self_attention(layer_spec.self_attention, layer.self_attn, layer.res1.norm)
        _cross_attention(layer_spec.attention, layer.cross_attn, layer.res2.norm)
        _ffn(layer_spec.ffn, layer.ffn, layer.res3.norm)
    if c.pre_norm:  # post-norm stacks have no final norm, in our model and in the spec alike
        _layer_norm(enc.layer_norm, model.encoder_norm)
        _layer_norm(dec.layer_norm, model.decoder_norm)
    dec.projection.weight = _np(model.output.weight)
    src_tokens, tgt_tokens = vocab_tokens(vocabs.src), vocab_tokens(vocabs.tgt)
    spec.register_source_vocabulary(src_tokens)
    spec.register_target_vocabulary(tgt_tokens)
    # The special tokens are named by the strings at our fixed ids, so CTranslate2 finds the same ids.
    spec.config.unk_token, spec.config.bos_token, spec.config.eos_token = (
        tgt_tokens[UNK_ID], tgt_tokens[BOS_ID], tgt_tokens[EOS_ID])
    spec.config.decoder_start_token = tgt_tokens[BOS_ID]
    spec.config.add_source_bos = False
    spec.config.add_source_eos = True  # our sources end with EOS: users pass plain subword tokens
    spec.config.layer_norm_epsilon = model.encoder[0].res1.norm.eps  # CTranslate2 defaults to 1e-6
    return spec


def vocab_tokens(tok) -> list[str]:
    """The vocabulary as token strings in id order (CTranslate2 maps strings to ids by position)."""
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    if None in tokens or len(set(tokens)) != len(tokens) or tokens[: len(SPECIALS)] != SPECIALS:
        raise NmtError("tokenizer vocabulary has gaps, duplicate pieces or misplaced special tokens: "
                       "cannot export it as a token list")
    return tokens


def _np(t):
    return t.detach().to("cpu").float().numpy().copy()


def _layer_norm(spec, norm) -> None:
    spec.gamma, spec.beta = _np(norm.weight), _np(norm.bias)


def _linear(spec, linear) -> None:
    spec.weight = _np(linear.weight)  # [out, in], as in torch
    if linear.bias is not None:
        spec.bias = _np(linear.bias)


def _self_attention(spec, attn, norm) -> None:
    _layer_norm(spec.layer_norm, norm)
    _linear(spec.linear[0], attn.qkv)  # rows q, k, v: the order CTranslate2 splits them in
    _linear(spec.linear[1], attn.out)


def _cross_attention(spec, attn, norm) -> None:
    _layer_norm(spec.layer_norm, norm)
    _linear(spec.linear[0], attn.q)
    _linear(spec.linear[1], attn.kv)  # rows k, v
    _linear(spec.linear[2], attn.out)


def _ffn(spec, ffn, norm) -> None:
    _layer_norm(spec.layer_norm, norm)
    _linear(spec.linear_0, ffn.w1)
    _linear(spec.linear_1, ffn.w2)


def _check_target(model_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == model_dir.resolve():
        raise UsageError(f"{out_dir}: the export must not overwrite the model directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise NmtError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "model.bin").exists():
        raise NmtError(f"{out_dir}: exists and is not a CTranslate2 model directory (refusing to replace it)")


def _save_atomically(spec, tokenizer_files: list[Path], meta: dict[str, Any], out_dir: Path) -> None:
    """Build the whole directory under a temporary name beside `out_dir`, then rename it into
    place; a previous export is moved aside first and restored if the rename fails."""
    from nmt.checkpoint import atomic_write_text

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        spec.save(str(tmp))
        for path in tokenizer_files:
            shutil.copyfile(path, tmp / path.name)
        atomic_write_text(tmp / EXPORT_META, json.dumps(meta, indent=2))
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        if isinstance(e, OSError):
            raise NmtError(f"{out_dir}: cannot write the export ({e.strerror or e})") from None
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- translate with the exported model ---------------------------------------------------------


@dataclass
class CT2Model:
    """A loaded CTranslate2 translator with what our line contract needs around it."""

    translator: Any  # ctranslate2.Translator
    vocabs: Vocabs
    max_positions: int
    src_tokens: list[str] = field(init=False, repr=False)
    tgt_ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.src_tokens = vocab_tokens(self.vocabs.src)
        self.tgt_ids = {t: i for i, t in enumerate(vocab_tokens(self.vocabs.tgt))}


def load_ctranslate2(ct2_dir: Path, compute_type: str = "default", threads: int = 0,
                     device: str = "cpu") -> CT2Model:
    """Load an exported directory: the translator (`threads` = CTranslate2's intra_threads, 0 for
    its default) and the tokenizer(s) and max_positions saved beside it."""
    ct2 = _ctranslate2()
    ct2_dir = Path(ct2_dir)
    try:
        meta = json.loads((ct2_dir / EXPORT_META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise NmtError(f"{ct2_dir}: not an nmt CTranslate2 export (cannot read {EXPORT_META}: {e})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise NmtError(f"{ct2_dir / EXPORT_META}: format is not {EXPORT_FORMAT!r}")
    try:
        translator = ct2.Translator(str(ct2_dir), device=device, compute_type=compute_type,
                                    inter_threads=1, intra_threads=threads)
    except (RuntimeError, ValueError) as e:
        raise NmtError(f"{ct2_dir}: CTranslate2 cannot load it ({str(e).splitlines()[0][:200]})") from None
    return CT2Model(translator, Vocabs.load(ct2_dir), int(meta["max_positions"]))


@dataclass
class CT2Hypothesis:
    text: str
    tokens: list[int]  # target ids, without BOS and EOS
    score: float | None  # CTranslate2's score when asked for (see translate_ctranslate2)
    hit_max_length: bool


@dataclass
class CT2Translation:
    source: str
    hypotheses: list[CT2Hypothesis] = field(default_factory=list)  # best first
    empty_input: bool = False
    truncated: bool = False

    @property
    def text(self) -> str:
        return self.hypotheses[0].text if self.hypotheses else ""


def translate_ctranslate2(model: CT2Model | Path | str, lines: Iterable[str], config: DecodeConfig | None = None,
                          *, exact_caps: bool = True, return_scores: bool = False) -> Iterator[CT2Translation]:
    """Translate like `nmt translate`: one result per line, in order, empty lines never reach the
    model, over-long lines cut to max_positions - 2 tokens (+ EOS), window by window.

    Options map onto `Translator.translate_batch` as follows:

    - beam_size, nbest → beam_size, num_hypotheses; min_length → min_decoding_length (both ban
      EOS for the first min_length steps); batch_tokens → max_batch_size with batch_type="tokens".
    - The cap a·|source| + b (EOS counted, clamped to max_positions - 1) has no CTranslate2
      equivalent: max_decoding_length is one number per call and counts tokens without EOS, and
      at the cap CTranslate2 simply stops where we force EOS. So each call gets
      max_decoding_length = cap - 1: with `exact_caps` the lines of a window are grouped by cap
      (one call per distinct cap: exact, smaller batches); without it a window is one call
      with its largest cap and longer outputs are cut to their own cap afterwards (greedy
      tokens stay exact; beam search may rank differently on lines that reach their cap).
      Either way a capped hypothesis scores without the EOS we would force.
    - length_penalty α: CTranslate2 divides by |Y|^α. With return_end_token=True (used here,
      then stripped) |Y| counts EOS, which is our length_norm="average" exactly; our default
      "gnmt" ((5 + |Y|) / 6)^α has no CTranslate2 equivalent and is approximated by |Y|^α.
    - Beam search stops once K hypotheses have finished (CTranslate2's patience 1); ours goes on
      while a live beam could still win, so with a length penalty the two can differ. With
      α = 0 both return the most probable finished hypothesis.
    - Sampling maps to sampling_topk (0 = whole vocabulary), sampling_topp, sampling_temperature;
      the random streams differ, so samples do not match ours.
    - Scores (`return_scores`): CTranslate2's final score, the log-probability (EOS included)
      divided by |Y|^α; with α = 0 it is our Hypothesis.logprob.
    """
    if not isinstance(model, CT2Model):
        model = load_ctranslate2(Path(model))
    config = config or DecodeConfig()
    it = iter(lines)
    while window := list(itertools.islice(it, config.window)):
        yield from _window(model, window, config, exact_caps, return_scores)


def _window(model: CT2Model, lines: list[str], config: DecodeConfig, exact_caps: bool,
            return_scores: bool) -> list[CT2Translation]:
    import torch

    from nmt.search import max_lengths

    results = [CT2Translation(line, empty_input=not line.strip()) for line in lines]
    todo = [i for i, line in enumerate(lines) if line.strip()]
    ids = encode_batch(model.vocabs.src, [lines[i] for i in todo])
    max_src = model.max_positions - 2  # as Translator: room for EOS within the positions
    for i, seq in zip(todo, ids):
        if len(seq) > max_src:
            results[i].truncated = True
            del seq[max_src:]
    # The very function our search uses (float32 arithmetic included), on lengths with EOS.
    caps = max_lengths(torch.tensor([len(s) + 1 for s in ids]), config.max_length_a, config.max_length_b,
                       model.max_positions).tolist() if ids else []
    groups: dict[int, list[int]] = {}
    for j, cap in enumerate(caps):
        groups.setdefault(cap if exact_caps else 0, []).append(j)
    for group in groups.values():
        hyps = _search(model, [ids[j] for j in group], [caps[j] for j in group], config, return_scores)
        for j, sentence in zip(group, hyps):
            results[todo[j]].hypotheses = sentence
    return results


def _search(model: CT2Model, seqs: list[list[int]], caps: list[int], config: DecodeConfig,
            return_scores: bool) -> list[list[CT2Hypothesis]]:
    limit = max(caps) - 1  # CTranslate2 counts output tokens without EOS
    if limit < 1:  # a cap of 1 leaves room for EOS only: the empty translation
        return [[CT2Hypothesis("", [], None, True)] for _ in seqs]
    sampling = bool(config.sampling_topk or config.sampling_topp or config.temperature != 1.0)
    outputs = model.translator.translate_batch(
        [[model.src_tokens[i] for i in s] for s in seqs],
        max_batch_size=config.batch_tokens, batch_type="tokens",
        beam_size=1 if sampling else config.beam_size, num_hypotheses=1 if sampling else config.nbest,
        length_penalty=config.length_penalty, max_input_length=0, max_decoding_length=limit,
        min_decoding_length=min(config.min_length, limit), return_end_token=True, return_scores=return_scores,
        sampling_topk=(config.sampling_topk or 0) if sampling else 1, sampling_topp=config.sampling_topp or 1.0,
        sampling_temperature=config.temperature,
    )
    eos = SPECIALS[EOS_ID]
    results = []
    for out, cap in zip(outputs, caps):
        token_ids = []
        for tokens in out.hypotheses:
            if tokens and tokens[-1] == eos:
                tokens = tokens[:-1]
            token_ids.append([model.tgt_ids[t] for t in tokens[: cap - 1]])
        texts = [one_line(t) for t in decode_batch(model.vocabs.tgt, token_ids)]
        scores = out.scores if return_scores else [None] * len(token_ids)
        results.append([CT2Hypothesis(text, t, s, len(t) + 1 >= cap) for text, t, s in zip(texts, token_ids, scores)])
    return results
