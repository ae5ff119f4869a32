"""Structured outputs: what a grammar costs the engine (fp8_turbo/engine/sampling/structured.py, llguidance).

1. Compile: the llguidance tokenizer over SmolLM2's vocabulary (once per engine), then each spec
   compiled the first time (parse + check + a template matcher) and again (the cache), and a
   sequence's first mask (its matcher copied from the template).
2. Mask cost in the real engine's decode steps: `LLM("smollm2-135m-instruct")` decoding 32 tokens
   for B chat prompts, with C of the B rows constrained; timed inside the engine: filling the
   bitmask (llguidance), applying it to the logits, advancing the matchers, and `engine.step()`.
   Rows: (B, C) = (1, 1), (32, 16) (half the rows, the issue's goal: <= 10% of the step) and (32, 0)
   (no grammar: nothing runs, 0%). Constrained rows follow a schema that takes more than 32 tokens, so
   every row lives through every step; the free rows ignore EOS.

    .venv/bin/python bench/structured.py [--quantization fp8] [--runs 3] [--clock wall|cpu]
Prints markdown tables, writes bench/out/structured.json and bench/out/structured.png.
`--clock cpu` runs torch on one thread and times the process's CPU time (llguidance's mask threads
included): on a shared, busy machine that is the stable number, wall time there mostly measures
waiting for a core.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fp8_turbo.engine.sampling.sampler as sampler_module
from fp8_turbo import LLM, SamplingParams, StructuredOutputsParams
from fp8_turbo.engine.sampling.structured import GrammarMatcher, StructuredOutputs, fill_bitmask

OUT = Path(__file__).parent / "out"
STEPS = 32
PLAN = {  # a plan of 4-6 steps: more than STEPS tokens however short the model writes them
    "type": "object",
    "properties": {"title": {"type": "string", "minLength": 8, "maxLength": 40},
                   "steps": {"type": "array", "items": {"type": "string", "minLength": 8, "maxLength": 60},
                             "minItems": 4, "maxItems": 6},
                   "difficulty": {"enum": ["easy", "medium", "hard"]}},
    "required": ["title", "steps", "difficulty"], "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
SPECS = {
    "json_schema (plan)": StructuredOutputsParams(json=PLAN),
    "json_object": StructuredOutputsParams(json_object=True),
    "tool call (2 tools, '; '-separated)": None,  # built below with the server's own helper
    "regex (phone)": StructuredOutputsParams(regex=r"\+?[0-9]{1,3}[ -][0-9]{3}[ -][0-9]{3,4}[ -][0-9]{4}"),
    "choice (4)": StructuredOutputsParams(choice=["positive", "negative", "neutral", "mixed"]),
    "grammar (GBNF)": StructuredOutputsParams(grammar='root ::= "SELECT " col (", " col)* " FROM " tbl\n'
                                                      'col ::= [a-z_]+\ntbl ::= [a-z_]+'),
}


def tool_call_spec() -> StructuredOutputsParams:
    from fp8_turbo.engine.serving.structure import TOOL_CALL_SEPARATOR
    from fp8_turbo.engine.sampling.structured import json_sequence_grammar
    from fp8_turbo.tokenizer.tool_calls import call_schema

    functions = [{"name": "get_weather", "parameters": WEATHER},
                 {"name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                   "required": ["query"]}}]
    return StructuredOutputsParams(grammar=json_sequence_grammar(call_schema(functions), TOOL_CALL_SEPARATOR))


def measure_compile(llm: LLM, clock) -> tuple[float, list[dict]]:
    fresh = StructuredOutputs(llm.tokenizer.hf, llm.engine.model_config.vocab_size,
                              sorted(llm.tokenizer.stop_token_ids))
    t0 = clock()
    fresh._load()
    setup_ms = (clock() - t0) * 1e3
    results = []
    for name, spec in SPECS.items():
        spec = spec or tool_call_spec()
        t0 = clock()
        grammar = fresh.compile(spec)
        t1 = clock()
        fresh.compile(spec)
        t2 = clock()
        matcher = grammar.matcher()
        fill_bitmask([matcher])
        t3 = clock()
        matcher.close()
        results.append(dict(spec=name, compile_ms=(t1 - t0) * 1e3, cached_ms=(t2 - t1) * 1e3,
                            first_mask_ms=(t3 - t2) * 1e3))
    return setup_ms, results


class GrammarClock:
    """Time spent in grammar work during engine steps: fill, apply, accept (patched in place)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.fill = self.apply = self.accept = 0.0
        self._fill, self._apply = sampler_module.fill_bitmask, sampler_module.apply_bitmask
        self._accept = GrammarMatcher.accept

    def __enter__(self) -> "GrammarClock":
        def timed(attr, fn):
            def wrapper(*args):
                t0 = self.clock()
                try:
                    return fn(*args)
                finally:
                    setattr(self, attr, getattr(self, attr) + self.clock() - t0)
            return wrapper

        sampler_module.fill_bitmask = timed("fill", self._fill)
        sampler_module.apply_bitmask = timed("apply", self._apply)
        GrammarMatcher.accept = timed("accept", self._accept)
        return self

    def __exit__(self, *exc) -> None:
        sampler_module.fill_bitmask, sampler_module.apply_bitmask = self._fill, self._apply
        GrammarMatcher.accept = self._accept

    def take(self) -> tuple[float, float, float]:
        out = (self.fill, self.apply, self.accept)
        self.fill = self.apply = self.accept = 0.0
        return out


def measure_steps(llm: LLM, batch: int, constrained: int, runs: int, clock) -> dict:
    engine, step = llm.engine, llm.engine.step
    plan = StructuredOutputsParams(json=PLAN)
    rows = list(range(batch)) if constrained == batch else list(range(1, 2 * constrained, 2))  # every other row
    decode: list[tuple[float, float, float, float]] = []  # step, fill, apply, accept seconds

    with GrammarClock(clock) as grammar:
        def timed_step():
            every_row_decodes = engine.num_running == batch and engine.num_waiting == 0
            grammar.take()
            start = clock()
            out = step()
            total = clock() - start
            if every_row_decodes:
                decode.append((total, *grammar.take()))
            return out

        engine.step = timed_step
        try:
            for run in range(runs):
                chats = [[{"role": "user", "content": f"Plan a trip to city number {run * batch + i}, step by step."}]
                         for i in range(batch)]
                params = [SamplingParams(temperature=0.8, seed=i, max_tokens=STEPS, structured_outputs=plan) if i in rows
                          else SamplingParams(temperature=0.8, seed=i, max_tokens=STEPS, ignore_eos=True)
                          for i in range(batch)]
                for out in llm.chat(chats, params):
                    assert out.outputs[0].finish_reason == "length", "a row ended early: the batch shrank"
        finally:
            engine.step = step
    step_ms = statistics.median(d[0] for d in decode) * 1e3
    fill_ms, apply_ms, accept_ms = (statistics.median(d[k] for d in decode) * 1e3 for k in (1, 2, 3))
    grammar_ms = statistics.median(sum(d[1:4]) for d in decode) * 1e3
    return dict(batch=batch, constrained=constrained, steps=len(decode), step_ms=step_ms, fill_ms=fill_ms,
                apply_ms=apply_ms, accept_ms=accept_ms, grammar_ms=grammar_ms, share=grammar_ms / step_ms)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"batch {r['batch']}\n{r['constrained']} constrained" for r in results]
    bottom = [0.0] * len(results)
    for key, label in (("fill_ms", "fill bitmask (llguidance)"), ("apply_ms", "apply to logits"),
                       ("accept_ms", "advance matchers")):
        values = [100 * r[key] / r["step_ms"] for r in results]
        ax.bar(labels, values, 0.5, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(10, color="tab:red", linestyle="--", label="goal at batch 32: 10%")
    ax.set_ylabel("share of the decode step (%)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", default="fp8")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    clock = time.perf_counter
    if args.clock == "cpu":
        torch.set_num_threads(1)
        clock = time.process_time
    llm = LLM("smollm2-135m-instruct", quantization=args.quantization, device="cpu")
    setup_ms, compiled = measure_compile(llm, clock)
    steps = [measure_steps(llm, b, c, args.runs, clock) for b, c in ((1, 1), (32, 16), (32, 0))]

    where = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, SmolLM2 {args.quantization}, "
             + ("CPU time of the process" if args.clock == "cpu" else "wall time"))
    print(f"Grammar compile, SmolLM2 vocabulary (49152), {where}; llguidance tokenizer (once per engine): "
          f"{setup_ms:.0f} ms\n")
    print("| spec | compile ms (first) | compile ms (cached) | first mask of a sequence ms |")
    print("|---|---:|---:|---:|")
    for r in compiled:
        print(f"| {r['spec']} | {r['compile_ms']:.2f} | {r['cached_ms']:.3f} | {r['first_mask_ms']:.2f} |")
    print(f"\nGrammar work per decode step (median over {args.runs} runs of {STEPS} tokens)\n")
    print("| batch | constrained | step ms | fill ms | apply ms | accept ms | grammar / step |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in steps:
        print(f"| {r['batch']} | {r['constrained']} | {r['step_ms']:.1f} | {r['fill_ms']:.2f} | {r['apply_ms']:.2f} | "
              f"{r['accept_ms']:.2f} | {100 * r['share']:.1f}% |")
    OUT.mkdir(exist_ok=True)
    (OUT / "structured.json").write_text(json.dumps(
        {"machine": where, "runs": args.runs, "tokenizer_setup_ms": setup_ms, "compile": compiled, "steps": steps},
        indent=2))
    plot(steps, OUT / "structured.png", f"grammar share of a decode step, {where}")
    print(f"\nwrote {OUT / 'structured.json'} and {OUT / 'structured.png'}")


if __name__ == "__main__":
    main()
