"""The accuracy report on a tiny random model: base vs itself is perfect, FP8 schemes are measured,
the sweep's cached-prefix forward equals a full forward, the CLI writes JSON + markdown + PNG."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from fp8_turbo import LLM
from fp8_turbo.engine.lab.accuracy import TokenStats, evaluate, quantized_in_place, sequence_logits
from fp8_turbo.engine.lab.corpora import LEGAL_CORPUS, corpus_sources, corpus_text, corpus_windows, heldout_text, named_text
from fp8_turbo.engine.lab.sensitivity import _BlockCache, quantize_only, sensitivity_sweep
from fp8_turbo.engine.serving.cli_quant import add_commands
from fp8_turbo.engine.model.linear import Linear
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
    rows = sum(m.out_features for m in same.engine.model.modules() if isinstance(m, Linear) and m.scheme != "none")
    assert fp8.linear_bytes == base.linear_bytes // 2 + 4 * rows  # 1 byte per FP8 weight (2 for bf16) + fp32 scales
    assert base.same_top == 1 and base.kl_p99 == 0 and 0 < fp8.same_top <= 1 and fp8.kl_p99 > 0


@pytest.mark.parametrize("scheme", ["fp8-w8a8", "fp8-weight-only-mx"])
def test_quantized_in_place_is_the_loaded_scheme(src, scheme):
    """evaluate's fast path (the base model's Linears quantized in place) computes exactly what
    LLM(quantization=scheme) loads, and restores the base model afterwards."""
    base = LLM(str(src), device="cpu", lm_head_dtype="model")
    before = sequence_logits(base, WINDOWS[0])
    loaded = LLM(str(src), device="cpu", quantization=scheme, quantization_ignore=("lm_head",), lm_head_dtype="model")
    with quantized_in_place(base, scheme, ("lm_head",)):
        assert torch.equal(sequence_logits(base, WINDOWS[0]), sequence_logits(loaded, WINDOWS[0]))
    assert torch.equal(sequence_logits(base, WINDOWS[0]), before)
    assert all(m.scheme == "none" and m.weight is not None for m in base.engine.model.modules() if isinstance(m, Linear))


def test_evaluate_scores_each_corpus(src, tmp_path):
    """Several scored corpora: one result per config and corpus, each against the base on that corpus."""
    files = []
    for i, step in enumerate((7, 13)):
        f = tmp_path / f"corpus{i}.txt"
        f.write_text(" ".join(f"w{(step * j) % 300 + 3}" for j in range(200)))
        files.append(str(f))
    seen = []
    results, scored = evaluate(str(src), [("wo", "fp8-weight-only", ("lm_head",))], corpora=files, tokens=96, window=48,
                               log=lambda s: None, progress=False, on_result=seen.append)
    assert [(r.label, r.corpus) for r in results] == [("none", files[0]), ("none", files[1]), ("wo", files[0]),
                                                      ("wo", files[1])]
    assert seen == results and list(scored) == files and all(len(w) == 2 for w in scored.values())
    assert results[0].ppl != results[1].ppl and results[2].tokens == results[3].tokens == 2 * 47


def test_token_stats_follow_llama_cpp():
    """Same top token counts positions [L/2, L-1) of each window (llama.cpp's kl_divergence), top-1 all
    of them; KL p99 is the linearly interpolated 99th percentile of per-token KL."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 7, generator=g)
    quant = base.clone()
    quant[[1, 2, 8], :] = torch.randn(3, 7, generator=g) * 5  # rows 1, 2 in the first half, 8 in the second
    flips = (base[:-1].argmax(-1) != quant[:-1].argmax(-1)).tolist()
    targets = torch.arange(1, 10) % 7
    s = TokenStats()
    s.add(torch.log_softmax(base[:-1], -1), quant, targets)
    assert s.n == 9 and s.agree == 9 - sum(flips)
    assert s.same_n == 4 and s.same == 4 - sum(flips[5:])  # rows 5..8 predict tokens 6..9
    kl = (torch.softmax(base[:-1], -1) * (torch.log_softmax(base[:-1], -1) - torch.log_softmax(quant[:-1], -1))).sum(-1)
    r = s.result("q", "fp8", (), 0.0, torch.nn.Linear(1, 1))
    assert math.isclose(r.kl_p99, torch.quantile(kl.double(), 0.99).item(), rel_tol=1e-6)
    assert math.isclose(r.same_top_se, math.sqrt(r.same_top * (1 - r.same_top) / 3))


def test_sweep_prefix_cache_and_toggle_are_exact(src):
    llm = LLM(str(src), device="cpu")
    full = sequence_logits(llm, WINDOWS[0])
    cache = _BlockCache(llm, WINDOWS[0])
    # Exact: logits_from(1) runs the same layers on the same block input with the same shapes as the
    # full prefill, so every sum is taken in the same order.
    assert torch.equal(cache.logits_from(1), full)
    m = llm.engine.model.layers[1].mlp.down_proj
    w = m.weight
    with quantize_only(m, "fp8"):  # the CPU's "fp8": weight-only
        assert m.scheme == "fp8-weight-only" and not torch.equal(m.dequantized_weight(), w)
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

    text = " ".join(f"w{i % 300 + 3}" for i in range(1000))
    wins = corpus_windows(T, text, 128, 700)
    assert [len(w) for w in wins] == [128] * 5
    ids = T.encode(text)
    starts = [next(s for s in range(0, 1000, 128) if ids[s:s + 128] == w) for w in wins]
    assert starts == [0, 128, 256, 512, 640]  # spread over the 7 available windows, not the first 5
    assert "Python" in corpus_text() and len(corpus_text()) > 100_000
    with pytest.raises(ValueError, match="window"):
        corpus_windows(T, "w3 w4", 128, 700)
    del tok


def test_cli_quantize_and_eval(src, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quantize", "--model", str(src), "--scheme", "fp8", "--method", "none",
                              "--out", str(tmp_path / "q")])
    assert args.func(args) == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"]["group_0"]["input_activations"] is None  # "fp8" on the CPU: weight-only
    assert "--scheme fp8 -> fp8-weight-only" in capsys.readouterr().err
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{(7 * i) % 300 + 3}" for i in range(200)))
    args = parser.parse_args(["eval", "--model", str(src), "--schemes", "fp8", "fp8-block", "--corpus", str(corpus),
                              "--methods", "none,gptq", "--calib-corpus", str(corpus), "--calib-tokens", "96",
                              "--tokens", "96", "--window", "48", "--sweep-tokens", "32", "--out", str(tmp_path / "r")])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "r" / "accuracy.json").read_text())
    assert [r["label"] for r in data["results"]] == ["none", "fp8", "fp8 gptq", "fp8-block", "fp8-block gptq"]
    assert len(data["sweep"]) == 8 and data["meta"]["calib_corpus"] == str(corpus)
    assert (tmp_path / "r" / "accuracy.png").stat().st_size > 1000
    assert "| fp8-block |" in (tmp_path / "r" / "accuracy.md").read_text()


def test_legal_corpus_is_another_domain():
    """The second held-out corpus: license texts (legal English), each once, none of it in the
    calibration text or the docstrings corpus."""
    legal, calib = named_text(LEGAL_CORPUS), corpus_text()
    sources = corpus_sources(LEGAL_CORPUS)
    assert len(legal) > 10_000 and len(sources) == len(set(sources))
    assert "warranty" in legal.lower() and "license" in legal.lower()
    paragraphs = [p for p in legal.split("\n\n") if len(p) > 200]
    assert paragraphs and not [p for p in paragraphs if p in calib]


def test_heldout_corpus_is_other_text():
    """The default scoring text (standard-library docstrings) is large and shares no paragraph with the
    calibration text (pydoc_data.topics)."""
    held, calib = heldout_text(), corpus_text()
    assert len(held) > 300_000
    paragraphs = [p for p in held.split("\n\n") if len(p) > 200]
    assert len(paragraphs) > 500
    assert not [p for p in paragraphs[::25] if p in calib]
