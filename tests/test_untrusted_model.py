"""A model directory is untrusted input: every field of config.json is checked for type and range,
the weights' header against the config, and config.json / tokenizer.json are read boundedly, all
before anything is built; each problem is one line naming the file and the field.

The directory here is made in-process (a tiny tokenizer and model, no `nmt train`), so each case
takes milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from conftest import DATA, error_line, run_nmt
from nmt import checkpoint
from nmt.config import ModelConfig, TokenizerConfig, to_dict
from nmt.errors import NmtError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from nmt.model import Transformer
    from nmt.tokenizer import train_vocabs

    directory = tmp_path_factory.mktemp("model")
    src = (DATA / "train.es").read_text(encoding="utf-8").splitlines()[:300]
    tgt = (DATA / "train.en").read_text(encoding="utf-8").splitlines()[:300]
    vocabs = train_vocabs(iter(src), iter(tgt), TokenizerConfig(vocab_size=400))
    config = ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1, max_positions=64,
                         src_vocab_size=vocabs.src.get_vocab_size(), tgt_vocab_size=vocabs.tgt.get_vocab_size())
    vocabs.save(directory)
    checkpoint.write_config(directory, {"model": to_dict(config)})
    checkpoint.save_weights(Transformer(config), directory / checkpoint.WEIGHTS)
    return directory


@pytest.fixture
def copy(model_dir, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def _edit_model(directory: Path, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data["model"].update(changes)
    path.write_text(json.dumps(data))


def test_the_fixture_loads(model_dir):
    model, vocabs, _ = checkpoint.load_for_inference(model_dir)
    assert model.config.d_model == 16


@pytest.mark.parametrize("changes, field", [
    (dict(d_model=10**9), "d_model"),
    (dict(encoder_layers=10**6), "encoder_layers"),
    (dict(decoder_layers=-1), "decoder_layers"),
    (dict(max_positions=10**9), "max_positions"),
    (dict(max_positions=1 << 20, d_model=1024, n_heads=4), "max_positions × d_model"),
    (dict(n_heads=0), "n_heads"),
    (dict(n_heads="4"), "n_heads must be int"),
    (dict(d_model=True), "d_model must be int"),
    (dict(d_model=16.0), "d_model must be int"),
    (dict(d_ff=None), "d_ff must be int"),
    (dict(d_model=18, n_heads=4), "not divisible by n_heads"),
    (dict(d_model=15, n_heads=5), "must be even"),
    (dict(src_vocab_size=0), "src_vocab_size"),
    (dict(tgt_vocab_size=10**12), "tgt_vocab_size"),
    (dict(pad_id=10**6), "pad_id"),
    (dict(eos_id=-1), "eos_id"),
    (dict(bos_id=0), "pad_id, bos_id and eos_id must differ"),
    (dict(bos_id=5), "nmt's tokenizers use"),
    (dict(dropout=2.0), "dropout"),
    (dict(attention_dropout="x"), "attention_dropout must be float"),
    (dict(dropout=float("nan")), "dropout must be float"),
    (dict(tie_embeddings="yes"), "tie_embeddings must be bool"),
    (dict(pre_norm=1), "pre_norm must be bool"),
])
def test_a_config_field_of_the_wrong_type_or_range_is_one_error_naming_it(copy, changes, field, monkeypatch):
    import nmt.model

    monkeypatch.setattr(nmt.model, "Transformer", _never_built)
    _edit_model(copy, **changes)
    with pytest.raises(NmtError) as e:
        checkpoint.load_for_inference(copy)
    assert field in str(e.value) and "config.json" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_model_section_that_is_not_an_object_is_refused(copy):
    data = json.loads((copy / "config.json").read_text())
    data["model"] = [1, 2]
    (copy / "config.json").write_text(json.dumps(data))
    with pytest.raises(NmtError, match="model: missing or not a JSON object"):
        checkpoint.load_for_inference(copy)


def _never_built(*args, **kwargs):
    raise AssertionError("the model was built on the device before the config was checked")


def test_a_config_that_disagrees_with_the_weights_is_refused_before_building(copy, monkeypatch):
    import torch

    import nmt.model

    real = nmt.model.Transformer

    def meta_only(*args, **kwargs):  # the header check builds on the meta device, which allocates nothing
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a real model was built before the weights' header was checked")
        return real(*args, **kwargs)

    _edit_model(copy, encoder_layers=200, d_ff=4096)  # in range, but not what the weights hold
    monkeypatch.setattr(nmt.model, "Transformer", meta_only)
    with pytest.raises(NmtError, match=r"model.safetensors: weights do not match the config \(missing \['encoder.1"):
        checkpoint.load_for_inference(copy)


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_weights_of_another_shape_or_dtype_are_refused(copy):
    weights = copy / checkpoint.WEIGHTS

    def to_int8(header):
        name = next(k for k in header if k.endswith("w1.weight"))
        header[name]["dtype"] = "I8"

    _rewrite_header(weights, to_int8)
    with pytest.raises(NmtError, match=r"w1.weight is \('I8', \[32, 16\]\), the config needs a float tensor"):
        checkpoint.load_for_inference(copy)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_holding_nan_or_infinity_are_refused_in_one_line(copy, value):
    """What a diverged training wrote: `nmt translate` crashed on it (an IndexError in the loop
    guard), `nmt attention` too, and `nmt score` printed nan for every line."""
    from safetensors.torch import load_file, save_file

    weights = copy / checkpoint.WEIGHTS
    tensors = load_file(str(weights))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name].view(-1)[-1] = value
    save_file(tensors, str(weights))
    with pytest.raises(NmtError) as e:
        checkpoint.load_for_inference(copy)
    assert str(e.value) == f"{weights}: {name} holds NaN or infinite values (the training that wrote them diverged)"
    msg = error_line(run_nmt("translate", "-m", str(copy), "--beam-size", "1", input="hola\n"), 1)
    assert msg == f"nmt: error: {e.value}"


def test_a_header_whose_offsets_leave_the_file_is_refused(copy):
    weights = copy / checkpoint.WEIGHTS

    def beyond(header):
        name = next(k for k in header if k.endswith("w1.weight"))
        begin = header[name]["data_offsets"][0] + 10**9
        header[name]["data_offsets"] = [begin, begin + 32 * 16 * 4]

    _rewrite_header(weights, beyond)
    with pytest.raises(NmtError, match="lies outside the file"):
        checkpoint.load_for_inference(copy)


def test_a_header_length_beyond_the_file_is_refused(copy):
    (copy / checkpoint.WEIGHTS).write_bytes(struct.pack("<Q", 10**15) + b"{}")
    with pytest.raises(NmtError, match="not a safetensors file"):
        checkpoint.load_for_inference(copy)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_file_linked_to_dev_zero_is_refused_without_reading_it(copy, name):
    (copy / name).unlink()
    (copy / name).symlink_to("/dev/zero")
    with pytest.raises(NmtError, match=f"{name}: not a regular file"):
        checkpoint.load_for_inference(copy)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_fifo_is_refused_without_waiting_for_a_writer(copy, name):
    (copy / name).unlink()
    os.mkfifo(copy / name)
    with pytest.raises(NmtError, match=f"{name}: not a regular file"):
        checkpoint.load_for_inference(copy)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_huge_file_is_refused_without_reading_it(copy, name):
    with open(copy / name, "r+b") as f:
        f.truncate(1 << 40)  # sparse: a terabyte that takes no disk
    with pytest.raises(NmtError, match=f"{name}: .* too large"):
        checkpoint.load_for_inference(copy)


def test_a_tokenizer_with_a_regular_expression_is_refused(copy):
    path = copy / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["pre_tokenizer"]["pretokenizers"].append(
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False})
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(NmtError, match=r"tokenizer.json: uses a regular expression \('\(a\+\)\+\$'\)"):
        checkpoint.load_for_inference(copy)


def test_resume_state_needs_a_torch_whose_weights_only_loading_holds(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(NmtError, match="CVE-2025-32434"):
        checkpoint.load_state(tmp_path)


def test_nmt_info_refuses_an_impossible_config_in_one_line(copy):
    _edit_model(copy, d_model=10**9)
    message = error_line(run_nmt("info", str(copy)), 1)
    assert "d_model = 1000000000 is out of range" in message
