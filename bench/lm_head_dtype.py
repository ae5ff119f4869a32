"""What storing the embedding / tied lm_head smaller costs: fp8 SmolLM2 with lm_head_dtype model (fp32),
bfloat16 and fp8 (e4m3 per row, weight-only), scored with the accuracy lab on held-out text against
the unquantized model (ppl, mean and p99 KL, top-1 agreement), with the bytes a decode step reads for
that matrix. Picks nothing by itself: the table is what `EngineConfig.lm_head_dtype="auto"` is chosen by.

    .venv/bin/python bench/lm_head_dtype.py [--tokens 4096] [--window 512]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

import torch

from fp8_turbo import LLM
from fp8_turbo.engine.lab.accuracy import corpus_windows, sequence_logits

try:  # held-out scoring text (fp8_turbo/engine/lab/corpora.py), else the lab's one corpus
    from fp8_turbo.engine.lab.corpora import SCORING_CORPUS, heldout_text
except ImportError:
    from fp8_turbo.engine.lab.accuracy import corpus_text as heldout_text

    SCORING_CORPUS = "pydoc_data.topics"

OUT = Path(__file__).parent / "out"
MODEL = "smollm2-135m-instruct"
KINDS = ("model", "bfloat16", "fp8")
OPTIONS = dict(device="cpu", kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False)


class Stats:
    """nll of the targets, KL(base || this) per position, top-1 agreement with the base."""

    def __init__(self):
        self.nll, self.kls, self.agree, self.n = 0.0, [], 0, 0

    def add(self, base_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # row i predicts token i + 1
        self.nll -= logp.gather(1, targets[:, None]).sum().item()
        self.kls.append((base_logp.exp() * (base_logp - logp)).sum(-1))
        self.agree += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        self.n += targets.numel()


def vocab_bytes(llm) -> int:
    emb = llm.engine.model.embed_tokens
    w = emb.weight if emb.weight is not None else emb.weight_fp8
    return w.numel() * w.element_size()


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()

    base = LLM(MODEL, quantization="none", lm_head_dtype="model", **OPTIONS)
    windows = corpus_windows(base.tokenizer, heldout_text(), args.window, args.tokens)
    llms = {kind: LLM(MODEL, quantization="fp8", lm_head_dtype=kind, **OPTIONS) for kind in KINDS}
    stats = {kind: Stats() for kind in ("none", *KINDS)}
    for i, ids in enumerate(windows):
        targets = torch.tensor(ids[1:])
        base_logits = sequence_logits(base, ids)
        base_logp = torch.log_softmax(base_logits[:-1], dim=-1)
        stats["none"].add(base_logp, base_logits, targets)
        for kind, llm in llms.items():
            stats[kind].add(base_logp, sequence_logits(llm, ids), targets)
        print(f"window {i + 1}/{len(windows)}")
    base_ppl = math.exp(stats["none"].nll / stats["none"].n)
    rows = []
    for kind in KINDS:
        s = stats[kind]
        kl = torch.cat(s.kls).double()
        ppl = math.exp(s.nll / s.n)
        rows.append({"lm_head_dtype": kind, "vocab_matrix_mb": vocab_bytes(llms[kind]) / 1e6, "ppl": ppl,
                     "ppl_delta_pct": 100 * (ppl / base_ppl - 1), "kl_mean": kl.mean().item(),
                     "kl_p99": torch.quantile(kl, 0.99).item(), "top1": s.agree / s.n})
    where = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"\nfp8 SmolLM2-135M-Instruct, lm_head / tied embedding storage; {stats['none'].n} held-out tokens "
          f"({SCORING_CORPUS}), none ppl {base_ppl:.3f}; machine: {where}\n")
    print("| lm_head_dtype | matrix MB | ppl | Δppl % | KL mean | KL p99 | top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lm_head_dtype']} | {r['vocab_matrix_mb']:.0f} | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f} | "
              f"{r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {100 * r['top1']:.1f}% |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lm_head_dtype.json").write_text(json.dumps({"benchmark": "lm_head_dtype", "machine": where,
                                                        "base_ppl": base_ppl, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["vocab_matrix_mb"] for r in rows], [r["kl_mean"] for r in rows], "o-")
    for r in rows:
        ax.annotate(r["lm_head_dtype"], (r["vocab_matrix_mb"], r["kl_mean"]))
    ax.set_xlabel("embedding / lm_head bytes (MB)")
    ax.set_ylabel("mean KL vs unquantized (nat)")
    ax.set_title("fp8 SmolLM2: lm_head storage")
    fig.tight_layout()
    fig.savefig(OUT / "lm_head_dtype.png", dpi=120)
    print(f"wrote {OUT / 'lm_head_dtype.json'} and {OUT / 'lm_head_dtype.png'}")


if __name__ == "__main__":
    main()
