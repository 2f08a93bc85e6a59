"""Subword tokenizers (HuggingFace `tokenizers`): train, save, load, encode and decode.

BPE by default (unigram as an option); NFC normalisation; Metaspace-style word boundaries
(`▁`) so decoding restores the text exactly (NFC-normalised, outer whitespace stripped; the one
exception is a literal `▁` U+2581 in the input, which decodes as a space, as in SentencePiece); byte fallback with all 256 byte tokens in the
vocabulary, so no character is ever `<unk>`. One joint vocabulary by default, or one per
language. Special ids are fixed: <pad>=0, <unk>=1, <s>=2, </s>=3.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from nmt import atomic
from nmt.config import LEAST_MERGES, TokenizerConfig, smallest_vocabulary
from nmt.errors import NmtError

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
SPACE = "▁"


def _skeleton(config: TokenizerConfig) -> Tokenizer:
    if config.kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    elif config.kind == "unigram":
        tok = Tokenizer(models.Unigram())
    else:
        raise NmtError(f"unknown tokenizer kind {config.kind!r} (bpe or unigram)")
    norms = [normalizers.NFC(), normalizers.Strip()]
    if config.lowercase:
        norms.append(normalizers.Lowercase())
    tok.normalizer = normalizers.Sequence(norms)
    # Splitting off "<" keeps the unigram model (which matches any vocabulary piece) from reading
    # literal "</s>" or "<0x41>" in text as special or byte tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Split("<", behavior="isolated"),
    ])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def _trainer(config: TokenizerConfig, vocab_size: int, tags: Sequence[str] = ()):
    specials = [*SPECIALS, *tags]  # tags (`directions.tag`) right after the four fixed ids
    if config.kind == "bpe":
        # limit_alphabet keeps rare characters out of the base vocabulary: they fall back to bytes.
        return trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=config.min_frequency, special_tokens=specials,
            limit_alphabet=1000, show_progress=False,
        )
    return trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )


def _add_byte_fallback(tok: Tokenizer) -> Tokenizer:
    """Append the 256 byte tokens to the model's own vocabulary (not as added tokens, which
    would match literal text like "<0x41>") and switch byte fallback on."""
    data = json.loads(tok.to_str())
    model = data["model"]
    if model["type"] == "BPE":
        vocab = model["vocab"]
        for piece in BYTE_TOKENS:
            vocab.setdefault(piece, len(vocab))
    else:  # Unigram: a list of [piece, log-probability]
        floor = min(score for _, score in model["vocab"]) - 1.0
        known = {piece for piece, _ in model["vocab"]}
        model["vocab"].extend([piece, floor] for piece in BYTE_TOKENS if piece not in known)
        model["unk_id"] = UNK_ID
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(data))


def train_tokenizer(lines: Iterable[str], config: TokenizerConfig, tags: Sequence[str] = ()) -> Tokenizer:
    """Train one subword model on `lines` (an iterator; it is consumed once); `tags` become special
    tokens at ids 4, 5, … (target-language tags of a multi-direction model)."""
    tok = _skeleton(config)
    smallest = smallest_vocabulary(len(tags))
    if config.vocab_size < smallest:
        log.warning("--vocab-size %d is below the smallest vocabulary, %d (%d byte tokens, %d special ones and %d "
                    "pieces): training that one", config.vocab_size, smallest, len(BYTE_TOKENS),
                    len(SPECIALS) + len(tags), LEAST_MERGES)
    # The byte tokens are added after training, so ask for that many fewer pieces.
    tok.train_from_iterator(lines, trainer=_trainer(config, max(config.vocab_size, smallest) - len(BYTE_TOKENS), tags))
    for i, special in enumerate([*SPECIALS, *tags]):
        if tok.token_to_id(special) != i:
            raise NmtError(f"tokenizer training put {special} at id {tok.token_to_id(special)}, expected {i}")
    return _prepare(_add_byte_fallback(tok))


def _prepare(tok: Tokenizer) -> Tokenizer:
    # Literal "</s>" in a user's text is text, not the end-of-sentence symbol.
    tok.encode_special_tokens = True
    tok.no_padding()
    tok.no_truncation()
    return tok


JOINT_FILE = "tokenizer.json"  # one vocabulary for both languages
SEPARATE_FILES = ("tokenizer.src.json", "tokenizer.tgt.json")  # one per language


@dataclass
class Vocabs:
    """The source and target tokenizers (the same object when the vocabulary is joint)."""

    src: Tokenizer
    tgt: Tokenizer

    @property
    def joint(self) -> bool:
        return self.src is self.tgt

    def files(self) -> dict[str, str]:
        return {JOINT_FILE: self.src.to_str()} if self.joint else {
            SEPARATE_FILES[0]: self.src.to_str(), SEPARATE_FILES[1]: self.tgt.to_str()}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, text in sorted(self.files().items()):
            h.update(name.encode() + b"\0" + text.encode("utf-8"))
        return h.hexdigest()

    def save(self, directory: Path) -> None:
        for name, text in self.files().items():
            atomic.write_text(directory / name, text)

    @staticmethod
    def load(directory: Path) -> "Vocabs":
        joint = directory / JOINT_FILE
        if joint.exists():
            tok = _load_one(joint)
            return Vocabs(tok, tok)
        src, tgt = (directory / name for name in SEPARATE_FILES)
        if not (src.exists() and tgt.exists()):
            raise NmtError(f"{directory}: no tokenizer.json (nor tokenizer.src.json and tokenizer.tgt.json)")
        return Vocabs(_load_one(src), _load_one(tgt))

    @staticmethod
    def exists(directory: Path) -> bool:
        """A whole saved tokenizer: the joint file, or both separate ones (one alone is a save cut
        short, trained again)."""
        return (directory / JOINT_FILE).exists() or all((directory / name).exists() for name in SEPARATE_FILES)

    @staticmethod
    def half_saved(directory: Path) -> str | None:
        """The one separate tokenizer file present without its pair (a save cut short), else None."""
        present = [name for name in SEPARATE_FILES if (directory / name).exists()]
        return present[0] if len(present) == 1 else None


TOKENIZER_LIMIT = 256 << 20  # bytes; a 32k-piece tokenizer.json is about 2 MB


def _load_one(path: Path) -> Tokenizer:
    from nmt.textio import read_small_file

    try:
        text = read_small_file(path, TOKENIZER_LIMIT, "a tokenizer").decode("utf-8")
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NmtError(f"{path}: not a valid tokenizer file (not JSON: {e})") from None
    check_no_regex(data, path)
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the library raises a bare Exception on bad JSON
        raise NmtError(f"{path}: not a valid tokenizer file ({str(e).splitlines()[0][:200]})") from None
    if [tok.token_to_id(s) for s in SPECIALS] != list(range(len(SPECIALS))):
        raise NmtError(f"{path}: special tokens are not {SPECIALS} at ids 0-3")
    return _prepare(tok)


def check_no_regex(data: object, path: Path) -> None:
    """Refuse a tokenizer whose normalizer, pre-tokenizer or decoder uses a regular expression.

    nmt writes none (its splits and replacements are literal strings), and the library's regex
    engine (Oniguruma) backtracks: a crafted pattern such as `(a+)+$` takes exponential time on
    one line, so a tokenizer.json from elsewhere could hang translation. Bounding the time of a
    regex inside the library is not possible from here, so such a file is refused outright."""
    sections = [data.get(k) for k in ("normalizer", "pre_tokenizer", "decoder", "post_processor")] \
        if isinstance(data, dict) else []
    stack = list(sections)
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "Regex" in node:
                raise NmtError(f"{path}: uses a regular expression ({str(node['Regex'])[:40]!r}); nmt writes "
                               "none and does not run one from an untrusted file (it could take exponential time)")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def train_vocabs(src_lines: Iterable[str], tgt_lines: Iterable[str], config: TokenizerConfig) -> Vocabs:
    """Train the joint vocabulary on both sides, or one per side when config.joint is False."""
    if config.joint:
        tok = train_tokenizer(_chain(src_lines, tgt_lines), config)
        return Vocabs(tok, tok)
    return Vocabs(train_tokenizer(src_lines, config), train_tokenizer(tgt_lines, config))


TRAIN_BATCH = 64  # lines per item handed to the trainer


def train_vocabs_streamed(sample: Callable[[], Iterable[tuple[list[str], list[str]]]], config: TokenizerConfig,
                          what: str = "training data", tags: Sequence[str] = ()) -> Vocabs:
    """Train like `train_vocabs` on (sources, targets) chunks that `sample()` streams (called once
    per tokenizer, so it must give the same chunks each time). BPE learns exactly what
    `train_vocabs` learns from the same pairs (its word counts do not depend on their order; the
    unigram trainer is not deterministic even on one input). The chunks go to the trainer
    in small batches and are dropped: memory holds the trainer's word counts, one chunk and its
    read-ahead, not the sample (2 M pairs as Python strings took 3 GB). A side with no text is an error naming `what`.
    `tags` (target-language tags) become special tokens of the source side's tokenizer."""
    seen = [0, 0]  # lines with text, per side

    def batches(sides: tuple[int, ...]) -> Iterator[list[str]]:
        for chunk in sample():
            for side in sides:
                lines = chunk[side]
                seen[side] += sum(1 for line in lines if line.strip())
                # Small batches: the library reads ahead 256 items of this iterator at a time
                # (PyBufferedIterator), which at 10,000 lines a chunk would be 2.5 M lines.
                for i in range(0, len(lines), TRAIN_BATCH):
                    yield lines[i : i + TRAIN_BATCH]

    def checked(tok_of: Callable[[], Tokenizer], sides: tuple[int, ...]) -> Tokenizer:
        tok = tok_of()
        if not all(seen[side] for side in sides):
            raise NmtError(f"{what} is empty (no line with text on the {'source' if not seen[0] else 'target'} side)")
        return tok

    if config.joint:
        tok = checked(lambda: train_tokenizer(batches((0, 1)), config, tags), (0, 1))
        return Vocabs(tok, tok)
    return Vocabs(checked(lambda: train_tokenizer(batches((0,)), config, tags), (0,)),
                  checked(lambda: train_tokenizer(batches((1,)), config), (1,)))


def _chain(*iterables: Iterable[str]) -> Iterator[str]:
    for it in iterables:
        yield from it


def encode_batch(tok: Tokenizer, lines: list[str]) -> list[list[int]]:
    """Ids without special tokens; encoding runs on all cores inside the library."""
    return [e.ids for e in tok.encode_batch_fast(lines, add_special_tokens=False)]


def decode_batch(tok: Tokenizer, ids: list[list[int]]) -> list[str]:
    return tok.decode_batch(ids, skip_special_tokens=True)
