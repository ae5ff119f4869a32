"""xgrammar vs llguidance on SmolLM2's vocabulary: the measurement behind fp8_turbo/engine/sampling/structured.py.

For each library, on SmolLM2-135M-Instruct's tokenizer (49152 tokens), in one process, one thread:
- setup: building the library's tokenizer object (once per engine);
- compile: a grammar from nothing (first) and from the library's cache (second), and the time to the
  first mask (compile + first mask: llguidance builds its lexer lazily, so this is the fair latency);
- mask: filling one token bitmask per decode step while following a valid document token by token
  (median and p99 over every step), at batch 1 and at batch 32 (32 matchers, 32 different documents,
  each at its own position), plus advancing the matchers by the sampled token.

Grammars: `person` (an object with nested object, array, enum, pattern and format; 6 required
fields), `tool_call` (Llama 3.x `{"name": ..., "parameters": ...}` for one of two tools), `json_object`
(any JSON object) and `choice` (a regex of 4 alternatives).

    .venv/bin/pip install xgrammar   # the peer (llguidance is a dependency of the engine)
    .venv/bin/python bench/grammar_libraries.py [--runs 3] [--clock wall|cpu]
Prints a markdown table, writes bench/out/grammar_libraries.json and .png. `--clock cpu` times the
process's CPU time: on a shared, busy machine that is the stable number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).parent / "out"
VOCAB = 49152
BATCH = 32

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "tags", "address", "role"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
          "required": ["query"], "additionalProperties": False}
TOOL_CALL = {"anyOf": [
    {"type": "object", "properties": {"name": {"const": name}, "parameters": params},
     "required": ["name", "parameters"], "additionalProperties": False}
    for name, params in (("get_weather", WEATHER), ("search", SEARCH))
]}
CHOICE = "(positive|negative|neutral|mixed)"
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Donald Knuth",
         "Margaret Hamilton", "John McCarthy"]
CITIES = ["London", "Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Quito"]


def documents(grammar: str, count: int) -> list[str]:
    """`count` different valid documents of `grammar`, written with ", " and ": " separators."""
    docs = []
    for i in range(count):
        name, city = NAMES[i % len(NAMES)], CITIES[(i * 3) % len(CITIES)]
        if grammar == "person":
            value = {"name": name, "age": 20 + i, "email": f"{name.split()[0].lower()}{i}@example.com",
                     "tags": ["math", "poetry", "engines"][: 1 + i % 3], "address": {"city": city, "zip": f"{10000 + 37 * i}"},
                     "role": ["admin", "user", "guest"][i % 3]}
        elif grammar == "tool_call":
            value = ({"name": "get_weather", "parameters": {"city": city, "unit": "celsius"}} if i % 2 else
                     {"name": "search", "parameters": {"query": f"papers by {name}", "limit": i}})
        elif grammar == "json_object":
            value = {"title": f"Notes on {city}", "count": i, "ok": i % 2 == 0, "items": [1.5, None, name]}
        else:
            return [["positive", "negative", "neutral", "mixed"][i % 4] for i in range(count)]
        docs.append(json.dumps(value))
    return docs


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf_tokenizer, eos: list[int]):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=VOCAB, stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.batch = xgr.BatchGrammarMatcher(max_threads=1)

    def compile(self, grammar: str):
        if grammar == "json_object":
            return self.compiler.compile_builtin_json_grammar()
        if grammar == "choice":
            return self.compiler.compile_regex(CHOICE)
        schema = {"person": PERSON, "tool_call": TOOL_CALL}[grammar]
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, VOCAB)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, hf_tokenizer, eos: list[int]):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=VOCAB, eos_token=eos)
        self.cache: dict[str, str] = {}

    def compile(self, grammar: str):
        M = self.llg.LLMatcher
        if grammar not in self.cache:  # llguidance has no grammar cache of its own: keep the checked grammar text
            if grammar == "json_object":
                text = M.grammar_from_json_schema({"type": "object"}, defaults=self._json_options())
            elif grammar == "choice":
                text = M.grammar_from_regex(CHOICE)
            else:
                schema = {"person": PERSON, "tool_call": TOOL_CALL}[grammar]
                text = M.grammar_from_json_schema(schema, defaults=self._json_options())
            error = M.validate_grammar(text, self.tokenizer)
            assert not error, error
            self.cache[grammar] = text
        return self.cache[grammar]

    @staticmethod
    def _json_options() -> dict:
        return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def matcher(self, compiled):
        m = self.llg.LLMatcher(self.tokenizer, compiled)
        assert not m.is_error(), m.get_error()
        return m

    def bitmask(self, rows: int) -> torch.Tensor:
        return torch.full((rows, (VOCAB + 31) // 32), -1, dtype=torch.int32)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        row_bytes = bitmask.shape[1] * 4
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(bitmask.data_ptr() + i * row_bytes, row_bytes)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def walk(lib, compiled, token_lists: list[list[int]], clock) -> tuple[list[float], list[float]]:
    """Follow every document with its own matcher; per step: seconds to fill the masks of all rows
    still going, seconds to advance them. Checks that every document token is allowed."""
    matchers = [lib.matcher(compiled) for _ in token_lists]
    bitmask = lib.bitmask(len(token_lists))
    fills, accepts = [], []
    for step in range(max(map(len, token_lists))):
        live = [i for i, ids in enumerate(token_lists) if step < len(ids)]
        live_matchers = [matchers[i] for i in live]
        t0 = clock()
        lib.fill(live_matchers, bitmask)
        t1 = clock()
        for j, i in enumerate(live):
            assert allowed(bitmask, j, token_lists[i][step]), (lib.name, i, step)
            assert lib.accept(matchers[i], token_lists[i][step]), (lib.name, i, step)
        t2 = clock()
        fills.append(t1 - t0)
        accepts.append(t2 - t1)
    return fills, accepts


def measure(lib, tokenizer, grammar: str, runs: int, clock) -> dict:
    t0 = clock()
    compiled = lib.compile(grammar)
    t1 = clock()
    first_mask = lib.bitmask(1)
    lib.fill([lib.matcher(compiled)], first_mask)
    t2 = clock()
    lib.compile(grammar)
    t3 = clock()
    ids = [tokenizer.encode(d, add_special_tokens=False) for d in documents(grammar, BATCH)]
    one, many, accept_many = [], [], []
    for _ in range(runs):
        one += walk(lib, compiled, ids[:1], clock)[0]
        fills, accepts = walk(lib, compiled, ids, clock)
        full = [i for i, _ in enumerate(fills) if all(i < len(x) for x in ids)]  # steps with all 32 rows live
        many += [fills[i] for i in full]
        accept_many += [accepts[i] for i in full]
    return dict(library=lib.name, grammar=grammar, compile_ms=(t1 - t0) * 1e3, first_mask_ms=(t2 - t0) * 1e3,
                cached_compile_ms=(t3 - t2) * 1e3, doc_tokens=len(ids[0]),
                mask_b1_us=statistics.median(one) * 1e6, mask_b1_p99_us=float(np.percentile(one, 99)) * 1e6,
                mask_b32_us=statistics.median(many) * 1e6, mask_b32_p99_us=float(np.percentile(many, 99)) * 1e6,
                accept_b32_us=statistics.median(accept_many) * 1e6)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grammars = list(dict.fromkeys(r["grammar"] for r in results))
    libs = list(dict.fromkeys(r["library"] for r in results))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in zip(axes, ("first_mask_ms", "mask_b1_us", "mask_b32_us"),
                              ("compile + first mask (ms)", "mask per step, batch 1 (us)", "masks per step, batch 32 (us)")):
        for j, lib in enumerate(libs):
            values = {r["grammar"]: r[key] for r in results if r["library"] == lib}
            ax.bar([g + (j - 0.5) * 0.4 for g in range(len(grammars))], [values[g] for g in grammars], 0.4, label=lib)
        ax.set_xticks(range(len(grammars)), grammars, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    from fp8_turbo.engine.checkpoints.source import resolve_model
    from fp8_turbo.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct").path)
    results, setup = [], {}
    for cls in (XGrammar, LLGuidance):
        t0 = clock()
        lib = cls(tokenizer.hf, tokenizer.eos_token_ids)
        setup[cls.name] = (clock() - t0) * 1e3
        for grammar in ("person", "tool_call", "json_object", "choice"):
            results.append(measure(lib, tokenizer, grammar, args.runs, clock))

    where = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread, "
             + ("CPU time" if args.clock == "cpu" else "wall time"))
    print(f"Grammar libraries on SmolLM2's vocabulary ({VOCAB}), {where}; setup (tokenizer) ms: "
          + ", ".join(f"{k} {v:.0f}" for k, v in setup.items()) + "\n")
    print("| library | grammar | compile ms | compile + first mask ms | cached ms | mask b1 us (p99) "
          "| masks b32 us (p99) | accept b32 us |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['library']} | {r['grammar']} | {r['compile_ms']:.1f} | {r['first_mask_ms']:.1f} | "
              f"{r['cached_compile_ms']:.3f} | {r['mask_b1_us']:.0f} ({r['mask_b1_p99_us']:.0f}) | "
              f"{r['mask_b32_us']:.0f} ({r['mask_b32_p99_us']:.0f}) | {r['accept_b32_us']:.0f} |")
    OUT.mkdir(exist_ok=True)
    (OUT / "grammar_libraries.json").write_text(json.dumps(
        {"machine": where, "vocab": VOCAB, "runs": args.runs, "setup_ms": setup, "results": results}, indent=2))
    plot(results, OUT / "grammar_libraries.png", f"xgrammar vs llguidance, SmolLM2 vocab, {where}")
    print(f"\nwrote {OUT / 'grammar_libraries.json'} and {OUT / 'grammar_libraries.png'}")


if __name__ == "__main__":
    main()
