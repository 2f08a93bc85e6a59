"""The package's seams, checked fast and in-process: no import cycle among nmt's modules; one
padded-batch builder with one source-length limit (and `nmt attention`'s over-long sentence
cut through it); the explicit softmax(QKᵀ/√d)·V equal to the fused kernel; every engine behind
the same Translator; a bug exits with its own code (3), distinct from user (1) and usage (2)."""

from __future__ import annotations

import ast
import sys

import pytest
import torch

from conftest import ROOT, tiny_transformer
from nmt.batching import cut_source, max_source_tokens, pad_batch
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID


def nmt_imports() -> dict[str, set[str]]:
    """module → the nmt modules it imports anywhere in its body (lazy imports included)."""
    modules = {p.stem for p in (ROOT / "nmt").glob("*.py")}
    graph = {}
    for path in (ROOT / "nmt").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "nmt":
                deps |= {a.name for a in node.names} & modules
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nmt."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("nmt.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_module_imports_another_in_a_circle():
    graph = nmt_imports()
    assert {"validate", "atomic", "engines", "cpu_kernels", "attention_maps"} <= set(graph)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != 1, "import cycle: " + " → ".join(path[path.index(d):] + [d]) \
                if d in path else f"import cycle through {d}"
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_builder_adds_specials_pads_and_cuts_at_the_one_limit():
    b = pad_batch([[5, 6, 7], [8]], [[9], [10, 11]], multiple=4)
    assert b.src.tolist() == [[5, 6, 7, EOS_ID], [8, EOS_ID, PAD_ID, PAD_ID]]
    assert b.tgt_in.tolist() == [[BOS_ID, 9, PAD_ID, PAD_ID], [BOS_ID, 10, 11, PAD_ID]]
    assert b.tgt_out.tolist() == [[9, EOS_ID, PAD_ID, PAD_ID], [10, 11, EOS_ID, PAD_ID]]
    assert b.n_tgt_tokens == 5
    long = list(range(4, 40))
    cut = pad_batch([long], [long], max_positions=16)
    assert max_source_tokens(16) == 14 and cut.src.shape[1] == 15 and cut.tgt_in.shape[1] == 15
    assert cut_source(long, 16) == (long[:14], True) and cut_source(long[:14], 16) == (long[:14], False)
    assert pad_batch([[4]]).tgt_in is None


def test_attention_maps_of_a_sentence_longer_than_the_positions(tiny_model_dir):
    """Before the builder, `nmt attention` on such a sentence ended in "internal error": the maps
    encoded the whole sentence while the translation had been cut."""
    from nmt import checkpoint, runtime
    from nmt.attention_maps import maps_for_sentence
    from nmt.config import DecodeConfig
    from nmt.model import Transformer
    from nmt.translate import Translator

    loaded, vocabs, _ = checkpoint.load_for_inference(tiny_model_dir)
    model = Transformer(type(loaded.config)(**{**vars(loaded.config), "max_positions": 24})).eval()
    sentence = " ".join(["En el principio creó Dios los cielos y la tierra."] * 10)
    result = next(Translator.from_model(model, vocabs, runtime.setup("cpu", "float32", 1),
                                        DecodeConfig(beam_size=1)).translate([sentence]))
    assert result.truncated
    maps = maps_for_sentence(model, vocabs, sentence, result.hypotheses[0].tokens)
    s, t = len(maps.src_tokens), len(maps.tgt_tokens)
    assert s == 23 and t <= 23 and maps.encoder.shape[-2:] == (s, s) and maps.cross.shape[-2:] == (t, s)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_explicit_attention_equals_the_fused_kernel(pre_norm):
    model = tiny_transformer(seed=3, pre_norm=pre_norm)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 24, (3, 7), generator=g)
    src[1, 4:] = PAD_ID
    tgt = torch.randint(4, 24, (3, 5), generator=g)
    with torch.no_grad():
        fused = model(src, tgt)
        memory, mask = model.encode(src)
        cache = model.init_cache(memory, mask, 1, 5)
        steps_fused = [model.decode_step(tgt[:, t], cache) for t in range(5)]
        model.use_explicit_attention()
        explicit = model(src, tgt)
        cache = model.init_cache(*model.encode(src), 1, 5)
        steps_explicit = [model.decode_step(tgt[:, t], cache) for t in range(5)]
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    for a, b in zip(steps_explicit, steps_fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_model_engine_gives_the_same_greedy_translation(tiny_model_dir):
    from nmt import checkpoint, engines, runtime
    from nmt.config import DecodeConfig
    from nmt.translate import Translator

    model, vocabs, _ = checkpoint.load_for_inference(tiny_model_dir)
    rt = runtime.setup("cpu", "float32", 1)
    lines = ["", "Y dijo Dios: Sea la luz.", "  ", "Y fue la luz."]
    config = DecodeConfig(beam_size=1, max_length_a=0.0, max_length_b=6)
    runs = {name: list(Translator(engine(model, rt, config), vocabs, config).translate(lines))
            for name, engine in (("greedy", engines.Greedy), ("naive", engines.NaiveGreedy),
                                 ("beam", engines.BeamSearch))}
    texts = {name: [r.text for r in out] for name, out in runs.items()}
    assert texts["greedy"] == texts["naive"] == texts["beam"]  # beam 1 is greedy
    assert [r.empty_input for r in runs["naive"]] == [True, False, True, False]
    for a, b in zip(runs["greedy"], runs["naive"]):
        if a.hypotheses:
            assert a.hypotheses[0].logprob == pytest.approx(b.hypotheses[0].logprob, abs=1e-4)


def _keep_logging(monkeypatch) -> None:
    """cli.main configures the "nmt" logger for a terminal: undo that after the test."""
    import logging

    logger = logging.getLogger("nmt")
    for name in ("handlers", "propagate", "level"):
        value = getattr(logger, name)
        monkeypatch.setattr(logger, name, list(value) if name == "handlers" else value)


def test_a_bug_exits_3_with_one_line_and_no_traceback(monkeypatch, capsys, tmp_path):
    import nmt.info
    from nmt import cli

    real = nmt.info.describe

    def broken(model):
        raise ZeroDivisionError("a bug")

    _keep_logging(monkeypatch)
    monkeypatch.setattr(nmt.info, "describe", broken)
    monkeypatch.setattr(sys, "argv", ["nmt", "info", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == cli.INTERNAL_ERROR == 3
    assert err.startswith("nmt: error: internal error: ZeroDivisionError: a bug") and err.count("\n") == 1
    monkeypatch.setattr(nmt.info, "describe", real)
    monkeypatch.setattr(sys, "argv", ["nmt", "info", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1, "bad input stays a user error"
