"""The accuracy report on a tiny random model: base vs itself is perfect, FP8 schemes are measured,
the sweep's cached-prefix forward equals a full forward, the CLI writes JSON + markdown + PNG."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from engine import LLM
from engine.lab.accuracy import (_BlockCache, corpus_text, corpus_windows, evaluate, quantize_only, sensitivity_sweep,
                             sequence_logits)
from engine.serving.cli_quant import add_commands
from engine.model.linear import Linear
from model_factory import VOCAB, make_checkpoint

WINDOWS = [torch.randint(3, VOCAB, (48,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("acc"), "llama32")


def test_evaluate_metrics(src):
    configs = [("fp8", "fp8", ("lm_head",)), ("fp8-keep-all", "fp8", ("lm_head", "model.*"))]
    results, _ = evaluate(str(src), configs, WINDOWS, log=lambda s: None)
    base, fp8, keep_all = results
    assert base.label == "none" and base.kl == 0 and base.top1 == 1 and base.tokens == 2 * 47
    assert fp8.kl > 0 and 0 < fp8.top1 <= 1 and fp8.sqnr_db and min(fp8.sqnr_db.values()) > 20  # e4m3: ~30 dB
    same = LLM(str(src), device="cpu", quantization="fp8", quantization_ignore=("lm_head",))
    assert set(fp8.sqnr_db) == {m.name for m in same.engine.model.modules() if isinstance(m, Linear) and m.scheme != "none"}
    assert keep_all.kl == 0 and keep_all.ppl == base.ppl and keep_all.hp_linear_bytes == keep_all.linear_bytes
    assert fp8.linear_bytes * 2 == base.linear_bytes  # 1 byte per FP8 weight vs 2 for bf16


def test_sweep_prefix_cache_and_toggle_are_exact(src):
    llm = LLM(str(src), device="cpu")
    full = sequence_logits(llm, WINDOWS[0])
    cache = _BlockCache(llm, WINDOWS[0])
    # Exact: logits_from(1) runs the same layers on the same block input with the same shapes as the
    # full prefill, so every sum is taken in the same order.
    assert torch.equal(cache.logits_from(1), full)
    m = llm.engine.model.layers[1].mlp.down_proj
    w = m.weight
    with quantize_only(m, "fp8"):
        assert m.scheme == "fp8" and not torch.equal(m.dequantized_weight(), w)
        quantized = cache.logits_from(1)
    assert m.scheme == "none" and m.weight is w and m.weight_fp8 is None
    assert not torch.equal(quantized, full)
    cache.release()
    ranked = sensitivity_sweep(str(src), WINDOWS[:1], log=lambda s: None)
    assert len(ranked) == 2 * 4 and ranked[0]["kl"] >= ranked[-1]["kl"] > 0


def test_corpus_windows():
    tok = LLM.__new__(LLM)  # only a tokenizer is needed
    from model_factory import make_tokenizer

    class T:
        encode = staticmethod(lambda text, add_special_tokens=False: make_tokenizer().encode(text, add_special_tokens=False))

    wins = corpus_windows(T, " ".join(f"w{i % 300 + 3}" for i in range(1000)), 128, 700)
    assert [len(w) for w in wins] == [128] * 5
    assert "Python" in corpus_text() and len(corpus_text()) > 100_000
    with pytest.raises(ValueError, match="window"):
        corpus_windows(T, "w3 w4", 128, 700)
    del tok


def test_cli_quantize_and_eval(src, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quantize", "--model", str(src), "--scheme", "fp8", "--out", str(tmp_path / "q")])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{(7 * i) % 300 + 3}" for i in range(200)))
    args = parser.parse_args(["eval", "--model", str(src), "--schemes", "fp8", "fp8-block", "--corpus", str(corpus),
                              "--tokens", "96", "--window", "48", "--sweep-tokens", "32", "--out", str(tmp_path / "r")])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "r" / "accuracy.json").read_text())
    assert [r["label"] for r in data["results"]] == ["none", "fp8", "fp8-block"] and len(data["sweep"]) == 8
    assert (tmp_path / "r" / "accuracy.png").stat().st_size > 1000
    assert "| fp8-block |" in (tmp_path / "r" / "accuracy.md").read_text()
