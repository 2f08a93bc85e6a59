"""Unit tests of `nmt.tokenizer`: round trips over arbitrary Unicode checked against an
independent normalisation (unicodedata NFC + a strip of Unicode White_Space), byte fallback,
fixed special ids, and saving/loading of the vocabularies.

Tokenizers are small (800 pieces on 2,000 sentence pairs of the Bible corpus) and trained once
per module.
"""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path

import pytest

from nmt.config import TokenizerConfig
from nmt.errors import NmtError
from nmt.tokenizer import (BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Vocabs, decode_batch, encode_batch,
                           train_vocabs)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "bible-es-en"
N_LINES = 2000
VOCAB_SIZE = 800


def _head(name: str, n: int = N_LINES) -> list[str]:
    with open(DATA / name, encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


# --- independent model of the expected normalisation -------------------------------------------

# Characters with the Unicode White_Space property: what the library's Strip normalizer removes
# (Rust's char::is_whitespace). Python's str.strip() would also remove U+001C..U+001F, which are
# not White_Space, so the set is spelled out instead.
WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
               + "\u2028\u2029\u202f\u205f\u3000")


def expected_text(text: str) -> str:
    """What decode(encode(text)) must give: NFC, then leading/trailing White_Space removed."""
    return unicodedata.normalize("NFC", text).strip(WHITE_SPACE)


RANGES = {
    "ascii": (0x20, 0x7E),
    "c0-controls": (0x00, 0x1F),
    "latin-1": (0xA0, 0xFF),
    "latin-ext": (0x100, 0x24F),
    "combining": (0x300, 0x36F),
    "greek": (0x370, 0x3FF),
    "cyrillic": (0x400, 0x4FF),
    "hangul-jamo": (0x1100, 0x11FF),  # NFC composes runs of jamo into syllables
    "cjk": (0x4E00, 0x9FFF),
    "hangul": (0xAC00, 0xD7A3),
    "emoji": (0x1F300, 0x1FAFF),
}
MARKUP = ["</s>", "<s>", "<pad>", "<unk>", "<0x41>", "<0xFF>", "<0x00>"]
FRAGMENTS = ["  ", "   ", "\t", " \t ", " ", "\u3000", "\xa0", "e\u0301", "A\u030a", "\ufeff", "\u200b"]


def random_texts(n: int, seed: int, markup: bool = True) -> list[str]:
    """n strings mixing characters from many scripts, whitespace runs and (optionally) text that
    looks like the tokenizer's own symbols."""
    rng = random.Random(seed)
    fragments = FRAGMENTS + (MARKUP if markup else [])
    ranges = list(RANGES.values())
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.3:
                parts.append(rng.choice(fragments))
            else:
                lo, hi = rng.choice(ranges)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 5))))
        texts.append("".join(parts))
    return texts


def test_random_texts_cover_the_ranges():
    """The generator really produces what the round-trip tests claim to cover."""
    texts = random_texts(400, seed=0)
    joined = "".join(texts)
    for name, (lo, hi) in RANGES.items():
        assert any(lo <= ord(c) <= hi for c in joined), name
    for piece in ["  ", "\t", "</s>", "<0x41>", "e\u0301"]:
        assert piece in joined
    assert any(expected_text(t) != t for t in texts)  # some texts do change under normalisation


def test_expected_text_model():
    assert expected_text("  e\u0301 \t") == "\xe9"
    assert expected_text("\x1fa\x1c") == "\x1fa\x1c"  # not White_Space: kept
    assert expected_text("\u3000a  b\xa0") == "a  b"


# --- tokenizers, trained once -------------------------------------------------------------------

KINDS = {
    "bpe-joint": dict(kind="bpe", joint=True),
    "unigram-joint": dict(kind="unigram", joint=True),
    "bpe-separate": dict(kind="bpe", joint=False),
    "unigram-separate": dict(kind="unigram", joint=False),
}


@pytest.fixture(scope="module")
def corpus_lines():
    return _head("train.es"), _head("train.en")


@pytest.fixture(scope="module")
def trained(corpus_lines):
    cache: dict[str, Vocabs] = {}

    def get(name: str) -> Vocabs:
        if name not in cache:
            src, tgt = corpus_lines
            config = TokenizerConfig(vocab_size=VOCAB_SIZE, **KINDS[name])
            cache[name] = train_vocabs(iter(src), iter(tgt), config)
        return cache[name]

    return get


def _sides(vocabs: Vocabs):
    return [vocabs.src] if vocabs.joint else [vocabs.src, vocabs.tgt]


def _kind_params(unigram_mark=None):
    params = []
    for name in KINDS:
        marks = [unigram_mark] if unigram_mark is not None and name.startswith("unigram") else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def test_vocab_kinds_and_sizes(trained):
    for name in KINDS:
        vocabs = trained(name)
        assert vocabs.joint == KINDS[name]["joint"]
        for tok in _sides(vocabs):
            assert 256 + len(SPECIALS) < tok.get_vocab_size() <= VOCAB_SIZE
            assert tok.get_vocab_size() > VOCAB_SIZE - 50  # asked-for size, give or take


def test_separate_vocabularies_differ(trained, corpus_lines):
    vocabs = trained("bpe-separate")
    assert vocabs.src is not vocabs.tgt
    assert vocabs.src.get_vocab() != vocabs.tgt.get_vocab()

    # each side learned its own language: it spells that language in fewer pieces than the other
    def n_pieces(tok, lines):
        return sum(map(len, encode_batch(tok, lines)))

    src, tgt = corpus_lines
    assert n_pieces(vocabs.src, src) < n_pieces(vocabs.tgt, src)
    assert n_pieces(vocabs.tgt, tgt) < n_pieces(vocabs.src, tgt)


@pytest.mark.parametrize("name", _kind_params())
def test_round_trip_random_unicode(trained, name):
    texts = random_texts(400, seed=1)
    for tok in _sides(trained(name)):
        decoded = decode_batch(tok, encode_batch(tok, texts))
        bad = [(t, d) for t, d in zip(texts, decoded) if d != expected_text(t)]
        assert not bad, f"{len(bad)} of {len(texts)} texts changed, e.g. {bad[:3]}"


@pytest.mark.parametrize("name", _kind_params())
def test_round_trip_random_unicode_without_markup(trained, name):
    """The same round trip without text that looks like <...> symbols: passes for all kinds."""
    texts = random_texts(400, seed=2, markup=False)
    for tok in _sides(trained(name)):
        decoded = decode_batch(tok, encode_batch(tok, texts))
        bad = [(t, d) for t, d in zip(texts, decoded) if d != expected_text(t)]
        assert not bad, f"{len(bad)} of {len(texts)} texts changed, e.g. {bad[:3]}"


@pytest.mark.parametrize("name", _kind_params())
def test_round_trip_real_text(trained, name, corpus_lines):
    src, tgt = corpus_lines
    vocabs = trained(name)
    for tok, lines in ((vocabs.src, src[:500]), (vocabs.tgt, tgt[:500])):
        assert decode_batch(tok, encode_batch(tok, lines)) == [expected_text(x) for x in lines]


@pytest.mark.parametrize("name", _kind_params())
@pytest.mark.parametrize("text", ["</s>", "<s> x", "a <pad> b", "<unk>", "<0x41>", "x<0xFF>y", "<0x00>"])
def test_literal_markup_is_text(trained, name, text):
    for tok in _sides(trained(name)):
        ids = encode_batch(tok, [text])[0]
        assert not set(ids) & {PAD_ID, UNK_ID, BOS_ID, EOS_ID}, ids
        assert decode_batch(tok, [ids]) == [text]


@pytest.mark.parametrize("name", _kind_params())
def test_no_special_or_unk_ids_in_encodings(trained, name):
    """Byte fallback: no character is ever <unk>, and plain text never yields a special id."""
    texts = random_texts(400, seed=3)
    for tok in _sides(trained(name)):
        for text, ids in zip(texts, encode_batch(tok, texts)):
            assert UNK_ID not in ids, (text, ids)
            assert not set(ids) & {PAD_ID, BOS_ID, EOS_ID}, (text, ids)


@pytest.mark.parametrize("name", _kind_params())
def test_no_unk_without_markup_and_unseen_characters_use_bytes(trained, name):
    texts = random_texts(400, seed=4, markup=False)
    for tok in _sides(trained(name)):
        for text, ids in zip(texts, encode_batch(tok, texts)):
            assert not set(ids) & {PAD_ID, UNK_ID, BOS_ID, EOS_ID}, (text, ids)
        # a character absent from the training text is spelled in its UTF-8 bytes
        ids = encode_batch(tok, ["\u4e2d"])[0]  # 中 = E4 B8 AD
        pieces = [tok.id_to_token(i) for i in ids]
        assert pieces[-3:] == ["<0xE4>", "<0xB8>", "<0xAD>"], pieces


@pytest.mark.parametrize("name", _kind_params())
def test_all_256_byte_tokens_in_vocab(trained, name):
    for tok in _sides(trained(name)):
        ids = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
        assert None not in ids
        assert len(set(ids)) == 256


@pytest.mark.parametrize("name", ["bpe-joint", "unigram-joint"])
def test_metaspace_symbol_in_text_is_the_documented_exception(trained, name):
    """U+2581 is the word-boundary symbol: in input text it comes back as a space (as in
    SentencePiece); the module docstring says so."""
    tok = trained(name).src
    assert decode_batch(tok, encode_batch(tok, ["x\u2581y"])) == ["x y"]


def test_empty_and_whitespace_only_lines(trained):
    tok = trained("bpe-joint").src
    ids = encode_batch(tok, ["", " ", "\t \u3000"])
    assert ids == [[], [], []]
    assert decode_batch(tok, ids) == ["", "", ""]


def test_lowercase_option(corpus_lines):
    src, tgt = corpus_lines
    vocabs = train_vocabs(iter(src[:500]), iter(tgt[:500]), TokenizerConfig(vocab_size=500, lowercase=True))
    texts = ["Dios Y La TIERRA", "ÉL ΘΕΌ ΚΑΙ", "ДОМ"]  # (no Σ: Python lowercases a final one to ς)
    assert decode_batch(vocabs.src, encode_batch(vocabs.src, texts)) == [expected_text(t).lower() for t in texts]


# --- special ids ------------------------------------------------------------------------------


def test_special_id_constants():
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert SPECIALS == ["<pad>", "<unk>", "<s>", "</s>"]


@pytest.mark.parametrize("name", _kind_params())
def test_special_ids_fixed(trained, name, tmp_path):
    vocabs = trained(name)
    vocabs.save(tmp_path)
    for tok in _sides(vocabs) + _sides(Vocabs.load(tmp_path)):
        assert [tok.token_to_id(s) for s in SPECIALS] == [PAD_ID, UNK_ID, BOS_ID, EOS_ID]
        assert [tok.id_to_token(i) for i in range(4)] == SPECIALS


def test_unknown_kind_is_an_error():
    with pytest.raises(NmtError, match="kind"):
        train_vocabs(iter(["a"]), iter(["b"]), TokenizerConfig(kind="wordpiece"))  # type: ignore[arg-type]


# --- save / load / fingerprint --------------------------------------------------------------------


@pytest.mark.parametrize("name", _kind_params())
def test_save_load_round_trip(trained, name, tmp_path, corpus_lines):
    vocabs = trained(name)
    vocabs.save(tmp_path)
    expected_files = {"tokenizer.json"} if vocabs.joint else {"tokenizer.src.json", "tokenizer.tgt.json"}
    assert {p.name for p in tmp_path.iterdir()} == expected_files
    assert Vocabs.exists(tmp_path)
    loaded = Vocabs.load(tmp_path)
    assert loaded.joint == vocabs.joint
    assert loaded.files() == vocabs.files()
    assert loaded.fingerprint() == vocabs.fingerprint()
    src, tgt = corpus_lines
    texts = random_texts(100, seed=5, markup=False) + src[:100]
    assert encode_batch(loaded.src, texts) == encode_batch(vocabs.src, texts)
    assert encode_batch(loaded.tgt, tgt[:100]) == encode_batch(vocabs.tgt, tgt[:100])
    # what load adds (literal specials are text) survives the round trip
    assert loaded.src.encode_special_tokens


def test_fingerprint_changes_with_the_tokenizer(trained, corpus_lines):
    prints = {name: trained(name).fingerprint() for name in KINDS}
    assert len(set(prints.values())) == len(KINDS)
    src, tgt = corpus_lines
    other_size = train_vocabs(iter(src), iter(tgt), TokenizerConfig(vocab_size=VOCAB_SIZE - 100))
    assert other_size.fingerprint() != prints["bpe-joint"]
    other_data = train_vocabs(iter(src[:1000]), iter(tgt[:1000]), TokenizerConfig(vocab_size=VOCAB_SIZE))
    assert other_data.fingerprint() != prints["bpe-joint"]
    # and it is a function of the saved files only
    again = Vocabs(trained("bpe-joint").src, trained("bpe-joint").src)
    assert again.fingerprint() == prints["bpe-joint"]


def test_load_broken_json_names_the_file(tmp_path, trained):
    path = tmp_path / "tokenizer.json"
    text = trained("bpe-joint").src.to_str()
    path.write_text(text[: len(text) // 2])  # cut short
    with pytest.raises(NmtError) as err:
        Vocabs.load(tmp_path)
    assert str(path) in str(err.value)
    path.write_text("{not json")
    with pytest.raises(NmtError) as err:
        Vocabs.load(tmp_path)
    assert str(path) in str(err.value)


def test_load_broken_separate_file_names_it(tmp_path, trained):
    trained("bpe-separate").save(tmp_path)
    (tmp_path / "tokenizer.tgt.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(NmtError) as err:
        Vocabs.load(tmp_path)
    assert str(tmp_path / "tokenizer.tgt.json") in str(err.value)


def test_load_wrong_special_ids_names_the_file(tmp_path, trained):
    import json

    data = json.loads(trained("bpe-joint").src.to_str())
    vocab = data["model"]["vocab"]
    a, b = vocab["<pad>"], vocab["</s>"]
    vocab["<pad>"], vocab["</s>"] = b, a
    for added in data["added_tokens"]:
        added["id"] = {a: b, b: a}.get(added["id"], added["id"])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(NmtError) as err:
        Vocabs.load(tmp_path)
    assert str(path) in str(err.value)


def test_load_missing_files_names_the_directory(tmp_path, trained):
    missing = f"{tmp_path}: no tokenizer.json (nor tokenizer.src.json and tokenizer.tgt.json)"
    with pytest.raises(NmtError) as err:
        Vocabs.load(tmp_path)
    assert str(err.value) == missing
    assert not Vocabs.exists(tmp_path)
    trained("bpe-separate").save(tmp_path)
    (tmp_path / "tokenizer.tgt.json").unlink()
    with pytest.raises(NmtError) as err:
        Vocabs.load(tmp_path)
    assert str(err.value) == missing  # one separate file is not a tokenizer
    assert not Vocabs.exists(tmp_path)  # a save cut short between the two files: trained again, not reused


# --- training on a streamed sample ------------------------------------------------------------


@pytest.mark.parametrize("joint", [True, False])
def test_streamed_training_learns_what_training_on_the_whole_sample_learns(corpus_lines, joint):
    from nmt.tokenizer import train_vocabs_streamed

    src, tgt = corpus_lines
    config = TokenizerConfig(vocab_size=VOCAB_SIZE, joint=joint)
    chunks = lambda: ((src[i : i + 300], tgt[i : i + 300]) for i in range(0, len(src), 300))  # noqa: E731
    whole = train_vocabs(iter(src), iter(tgt), config)
    assert train_vocabs_streamed(chunks, config).fingerprint() == whole.fingerprint()


def test_streamed_training_never_holds_the_sample():
    """Each chunk is released once the trainer has read it: when chunk k is made, no chunk before
    k − 1 is alive (a trainer fed the whole sample as one list would hold them all)."""
    import weakref

    from nmt.tokenizer import train_vocabs_streamed

    class Lines(list):  # a list that can be weakly referenced
        pass

    refs: list[weakref.ref] = []
    alive_before: list[int] = []

    def chunks():
        for c in range(40):
            alive_before.append(sum(r() is not None for r in refs[:-1]))
            lines = Lines(f"palabra{c % 7} otra{i % 13} cosa {c}" for i in range(300))
            refs.append(weakref.ref(lines))
            yield lines, lines
            del lines

    train_vocabs_streamed(chunks, TokenizerConfig(vocab_size=300))
    assert len(alive_before) == 40 and max(alive_before) == 0, alive_before


def test_streamed_training_on_a_side_without_text_names_it():
    from nmt.tokenizer import train_vocabs_streamed

    chunks = lambda: iter([(["hola mundo", "otra vez"], ["", "  "])])  # noqa: E731
    with pytest.raises(NmtError, match="corpus X is empty .no line with text on the target side"):
        train_vocabs_streamed(chunks, TokenizerConfig(vocab_size=300), "corpus X")


def test_a_vocabulary_size_below_the_smallest_is_said_and_the_smallest_trained(caplog):
    """--vocab-size 300 (or 10) cannot be met: 256 byte tokens, the 4 specials and 64 pieces are the
    least; that one is trained, and the log says so (it was silent)."""
    import logging

    from nmt.tokenizer import train_tokenizer

    lines = (DATA / "train.es").read_text(encoding="utf-8").splitlines()[:300]
    with caplog.at_level(logging.WARNING, logger="nmt.tokenizer"):
        tok = train_tokenizer(iter(lines), TokenizerConfig(vocab_size=10))
    assert [r.getMessage() for r in caplog.records] == [
        "--vocab-size 10 is below the smallest vocabulary, 324 (256 byte tokens, 4 special ones and 64 pieces): "
        "training that one"]
    assert tok.get_vocab_size() >= 324
    from nmt.config import BYTE_PIECES, SPECIAL_TOKENS
    from nmt.tokenizer import BYTE_TOKENS

    assert (SPECIAL_TOKENS, BYTE_PIECES) == (len(SPECIALS), len(BYTE_TOKENS))  # what config counts the smallest with
    caplog.clear()
    train_tokenizer(iter(lines), TokenizerConfig(vocab_size=400))
    assert not caplog.records
