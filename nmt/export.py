"""Export a model directory to CTranslate2.

`export_ctranslate2` maps our Transformer onto `ctranslate2.specs.TransformerSpec` weight by
weight and writes a CTranslate2 model directory atomically (built under a temporary name
beside the target, then renamed). Beside CTranslate2's own files (model.bin, config.json,
the vocabularies as token strings in id order) the directory holds a copy of our tokenizer
JSON file(s), so users can tokenize without the nmt model directory, and `nmt_export.json`
with what translation needs beyond the weights (max_positions, the length-cap defaults).

Translating with the export is `nmt translate -m EXPORT_DIR`: the `engines.CTranslate2` engine
behind the same `Translator`, whose docstring says where CTranslate2's search differs from ours.

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

import json
import shutil
from pathlib import Path
from typing import Any

from nmt import atomic
from nmt.config import DecodeConfig
from nmt.errors import NmtError, UsageError
from nmt.tokenizer import BOS_ID, EOS_ID, SPECIALS, UNK_ID, Vocabs

EXPORT_META = "nmt_export.json"
EXPORT_FORMAT = "nmt-ctranslate2"


def ctranslate2_module():
    """The optional ctranslate2 package, or one clear error."""
    try:
        import ctranslate2
    except ImportError:
        raise NmtError("ctranslate2 is not installed: pip install 'nmt[ctranslate2]'") from None
    return ctranslate2


def read_export_record(directory: Path) -> dict[str, Any]:
    """The record `nmt export` writes beside the model (format, max_positions, the tokenizer's
    fingerprint, directions), read as untrusted as config.json: a one-line error when it is
    missing or not a JSON object. What its fields must hold is the loader's to check."""
    from nmt import checkpoint

    record = checkpoint.read_record(directory, EXPORT_META)
    if record is None:
        raise NmtError(f"{directory}: not an nmt CTranslate2 export (no {EXPORT_META})")
    if not isinstance(record, dict):
        raise NmtError(f"{Path(directory) / EXPORT_META}: not a JSON object (export the model again)")
    return record


# -- export -------------------------------------------------------------------------------------


def export_ctranslate2(model_dir: Path, out_dir: Path, quantization: str | None = None) -> Path:
    """Convert an nmt model directory into a CTranslate2 model directory at `out_dir`.

    `quantization` is CTranslate2's weight type on disk (int8, int8_float32, int16, float16,
    bfloat16, float32; None keeps float32); the compute type can still be chosen when loading.
    An existing `out_dir` is replaced only if it is a CTranslate2 model directory."""
    ct2 = ctranslate2_module()
    from nmt import __version__, checkpoint

    accepted = ct2.specs.model_spec.ACCEPTED_MODEL_TYPES
    if quantization is not None and quantization not in accepted:
        raise UsageError(f"unknown quantization {quantization!r} (choose from {', '.join(accepted)})")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_target(model_dir, out_dir)
    model, vocabs, config = checkpoint.load_for_inference(model_dir)
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
        "src": config.get("src"), "tgt": config.get("tgt"),  # the directions and tags, for --tgt-lang
        **({"directions": config["directions"], "tagged": config.get("tagged")} if "directions" in config else {}),
    }
    _save_atomically(spec, [model_dir / name for name in vocabs.files()], meta, out_dir)
    return out_dir


def build_spec(ct2, model, vocabs: Vocabs):
    """A filled-in `TransformerSpec` (not yet validated) for our Transformer and vocabularies."""
    c = model.config
    specs = ct2.specs
    from nmt.attention_maps import alignment_layer

    # return_attention gives the layer and heads nmt's own alignments read (all heads averaged)
    spec = specs.TransformerSpec.from_config(
        (c.encoder_layers, c.decoder_layers), c.n_heads, pre_norm=c.pre_norm, activation=specs.Activation.RELU,
        alignment_layer=alignment_layer(c.decoder_layers), alignment_heads=c.n_heads)
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
    if out_dir.is_dir() and (out_dir / "model.bin").exists() and not (out_dir / EXPORT_META).exists():
        raise NmtError(f"{out_dir}: holds a CTranslate2 model that nmt did not export (no {EXPORT_META}; "
                       f"refusing to replace it)")


def _save_atomically(spec, tokenizer_files: list[Path], meta: dict[str, Any], out_dir: Path) -> None:
    """Build the whole directory under a temporary name beside `out_dir`, then rename it into
    place; a previous export is moved aside first and restored if the rename fails."""
    with atomic.directory(out_dir) as tmp:
        try:
            spec.save(str(tmp))  # CTranslate2 writes model.bin itself: its OSError names no file
        except OSError as e:
            raise NmtError(f"{out_dir}: cannot write the model ({e.strerror or e})") from None
        for path in tokenizer_files:
            shutil.copyfile(path, tmp / path.name)
        atomic.write_text(tmp / EXPORT_META, json.dumps(meta, indent=2), staged=True)
