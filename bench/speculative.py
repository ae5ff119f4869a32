"""Exact speculative decoding: speed with and without it, the same engine, side by side.

SmolLM2-135M-Instruct (the embedded GGUF) on the CPU, three workloads, each single stream (one
request) and 8 concurrent (8 different requests of the kind):
  - copy: rewrite a given paragraph with one word changed (copy-heavy chat);
  - json: extract a record given in the prompt as JSON under a schema (structured outputs);
  - story: a free story (nothing to copy).
Greedy by default (`--temperature T` samples with seeds). For each (workload, streams) the runs
without and with speculation alternate (`--runs` each, median wall time); outputs are asserted
identical (tokens and logprobs), so every speedup is for the very same text. Reports the speedup,
the acceptance rate (accepted / drafted tokens) and tokens per sequence step; prints a markdown table
naming the machine and writes JSON + PNG to bench/out/.

    .venv/bin/python bench/speculative.py [--quantization fp8] [--runs 3] [--max-tokens 160]
        [--speculative-config '{"method": "ngram", "num_speculative_tokens": 3}'] [--workloads copy,json,story]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generate import machine  # noqa: E402  (bench/generate.py: CPU model, ISA, threads)

OUT = Path(__file__).parent / "out"
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
GOALS = {"copy": 2.0, "json": 2.0, "story": 0.97}  # single-stream speedup goals (issue 22)

PARAGRAPHS = [
    ("keeper", "guardian", "The old lighthouse stood on the northern cliff for more than two hundred years. Every "
     "night its keeper climbed the spiral stairs, trimmed the wick, and polished the great lens until it shone. "
     "Ships passing through the narrow strait relied on its steady beam to avoid the rocks below, and the "
     "villagers said that as long as the light burned, no sailor would be lost at sea."),
    ("baker", "cook", "Every morning before sunrise the baker lit the oven in the small shop on the corner. The "
     "smell of fresh bread drifted down the empty street, and by six o'clock a line of neighbours waited at the "
     "door. She knew each of them by name and always saved a warm roll for the children on their way to school."),
    ("river", "stream", "The river wound slowly through the valley, past green fields and quiet farms. In summer "
     "the children swam in its cool water, and in autumn the farmers watched it rise after the rains. Nobody in "
     "the village could remember a year when the river had run dry, and they trusted it like an old friend."),
    ("train", "bus", "The last train of the night left the city at eleven o'clock. Most of its passengers were "
     "tired workers going home, reading newspapers or dozing against the windows. The conductor walked slowly "
     "through the carriages, checking tickets and wishing everyone a good night as the lights of the city faded."),
    ("garden", "park", "Behind the house there was a small garden full of roses, tomatoes and tall sunflowers. "
     "My grandmother spent every afternoon there, pulling weeds and talking softly to her plants. She said that "
     "a garden teaches patience, because nothing you plant today will be ready until the season turns."),
    ("library", "bookshop", "The library on Market Street had shelves from the floor to the ceiling, and a ladder "
     "on wheels to reach the highest books. On rainy days it was full of students, retired teachers and curious "
     "children. The librarian knew where every book was kept and could find any title in less than a minute."),
    ("mountain", "hill", "We started climbing the mountain at dawn, when the air was still cold and the grass was "
     "wet with dew. By noon we had reached the rocky ridge, where the wind was strong and the view stretched "
     "across three valleys. We ate our sandwiches in silence, too tired and too happy to say a single word."),
    ("market", "fair", "On Saturdays the market filled the town square with colourful stalls and loud voices. "
     "Farmers sold cheese, eggs and fresh vegetables, while a man with a guitar played old songs near the "
     "fountain. People came from the nearby villages to shop, to meet their friends and to hear the latest news."),
]
RECORDS = [
    ("Maria Gonzalez", "maria.gonzalez@example.com", "Valencia", 2019, "the blue ceramic teapot"),
    ("James Whitaker", "j.whitaker@example.org", "Manchester", 2015, "the oak reading lamp"),
    ("Aiko Tanaka", "aiko.tanaka@example.jp", "Osaka", 2021, "the bamboo cutting board"),
    ("Lukas Schneider", "lukas.schneider@example.de", "Hamburg", 2017, "the steel travel mug"),
    ("Fatima Haddad", "fatima.haddad@example.com", "Marseille", 2020, "the linen table cloth"),
    ("Peter Novak", "peter.novak@example.cz", "Brno", 2012, "the cast iron skillet"),
    ("Grace Okafor", "grace.okafor@example.ng", "Lagos", 2018, "the woven picnic basket"),
    ("Oliver Berg", "oliver.berg@example.se", "Uppsala", 2022, "the wool winter blanket"),
]
CUSTOMER = {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"},
                                             "city": {"type": "string"}, "member_since": {"type": "integer"},
                                             "favourite_product": {"type": "string"}},
            "required": ["name", "email", "city", "member_since", "favourite_product"]}
STORIES = ["a dragon who learns to bake", "a lighthouse keeper and a lost whale", "a robot that paints sunsets",
           "two friends lost in a snowstorm", "a cat who runs a post office", "the last tree in a city",
           "a girl who can talk to rivers", "an old clock that stops time"]


def workload(kind: str, i: int) -> tuple[list[dict], dict]:
    """(chat messages, SamplingParams fields besides temperature/max_tokens) of request i of a workload."""
    if kind == "copy":
        old, new, text = PARAGRAPHS[i % len(PARAGRAPHS)]
        return [{"role": "user", "content": f"Rewrite the following paragraph, replacing the word '{old}' with "
                                            f"'{new}'. Keep everything else exactly the same.\n\n{text}"}], {}
    if kind == "json":
        name, email, city, since, product = RECORDS[i % len(RECORDS)]
        record = (f"Customer record: name {name}, email {email}, city {city}, member since {since}, "
                  f"favourite product {product}.")
        return [{"role": "user", "content": record + "\nReturn this customer as JSON."}], {"json": CUSTOMER}
    return [{"role": "user", "content": f"Write a short story about {STORIES[i % len(STORIES)]}."}], {}


def outputs(outs) -> list:
    return [[(c.token_ids, [sorted((t, lp.logprob) for t, lp in d.items()) for d in c.logprobs]) for c in o.outputs]
            for o in outs]


def measure(llm, kind: str, streams: int, args, spec: dict) -> dict:
    from fp8_turbo import SamplingParams
    from fp8_turbo.engine.core.spec_decode import Drafter, SpeculativeConfig
    from fp8_turbo.engine.sampling.params import StructuredOutputsParams

    engine = llm.engine
    prompts, params = [], []
    for i in range(streams):
        messages, extra = workload(kind, i)
        prompts.append({"prompt_token_ids": llm.tokenizer.apply_chat_template(messages)})
        structured = StructuredOutputsParams(json=extra["json"]) if "json" in extra else None
        params.append(SamplingParams(temperature=args.temperature, seed=i if args.temperature else None,
                                     max_tokens=args.max_tokens, logprobs=0, structured_outputs=structured))
    engine.drafter = engine.scheduler.drafter = None
    llm.generate(prompts, params)  # warm-up: grammar compiled (llguidance's tokenizer built once), caches touched
    times = {"off": [], "on": []}
    results, steps, stats = {}, {}, None
    for run in range(args.runs):
        for mode in ("off", "on"):
            drafter = Drafter(SpeculativeConfig(**spec), engine.max_model_len) if mode == "on" else None
            engine.drafter = engine.scheduler.drafter = drafter
            engine.block_manager.enable_prefix_caching = False  # every run computes its prompt
            steps_before = engine.num_steps
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            times[mode].append(time.perf_counter() - t0)
            got = outputs(outs)
            assert results.setdefault(mode, got) == got, f"{kind}: run {run} differs from run 0 ({mode})"
            steps[mode] = engine.num_steps - steps_before
            if mode == "on":
                stats = drafter
    engine.drafter = engine.scheduler.drafter = None
    assert results["on"] == results["off"], f"{kind} x{streams}: speculation changed the output"
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    drafter = stats
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {"workload": kind, "streams": streams, "tokens": tokens, "off_s": off, "on_s": on,
            "off_tok_s": tokens / off, "on_tok_s": tokens / on, "speedup": off / on, "times": times,
            "drafted": drafter.num_draft_tokens, "accepted": drafter.num_accepted_tokens,
            "forced": drafter.num_forced_tokens, "acceptance": drafter.acceptance_rate,
            "steps_off": steps["off"], "steps_on": steps["on"]}


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| workload | streams | tokens | tok/s off | tok/s on | speedup | goal | acceptance | "
             "drafted (forced) | accepted | steps off -> on |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = f">= {GOALS[r['workload']]}x" if r["streams"] == 1 else ""
        lines.append(f"| {r['workload']} | {r['streams']} | {r['tokens']} | {r['off_tok_s']:.1f} | {r['on_tok_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {goal} | {r['acceptance']:.0%} | {r['drafted']} ({r['forced']}) | "
                     f"{r['accepted']} | {r['steps_off']} -> {r['steps_on']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['workload']}\nx{r['streams']}" for r in rows]
    bars = ax.bar(labels, [r["speedup"] for r in rows], color=["#4c72b0" if r["streams"] == 1 else "#dd8452" for r in rows])
    for bar, r in zip(bars, rows):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r['speedup']:.2f}x\n{r['acceptance']:.0%}",
                ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("speedup (same output)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(r["speedup"] for r in rows) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantization", default="fp8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); else seeded sampling")
    ap.add_argument("--streams", default="1,8", help="comma-separated concurrencies")
    ap.add_argument("--workloads", default="copy,json,story")
    ap.add_argument("--speculative-config", default=json.dumps(SPEC))
    args = ap.parse_args()

    from fp8_turbo import LLM, SamplingParams

    spec = json.loads(args.speculative_config)
    llm = LLM("smollm2-135m-instruct", quantization=args.quantization, device="cpu")
    warm = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    llm.generate([{"prompt_token_ids": warm}], SamplingParams(temperature=0, max_tokens=8))
    rows = []
    for kind in args.workloads.split(","):
        for streams in (int(s) for s in args.streams.split(",")):
            print(f"running {kind} x{streams} ...", file=sys.stderr)
            rows.append(measure(llm, kind, streams, args, spec))
    where = machine()
    header = (f"SmolLM2-135M-Instruct ({args.quantization}) on {where}; speculative_config {json.dumps(spec)}; "
              f"{'greedy' if not args.temperature else f'temperature {args.temperature}, seeded'}, up to "
              f"{args.max_tokens} tokens; tok/s = generated tokens / wall time of the whole generate call (prompt "
              f"included); median of {args.runs} alternating runs; outputs identical with and without.")
    text = table(rows, header)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "speculative.md").write_text(text + "\n")
    (OUT / "speculative.json").write_text(json.dumps({"machine": where, "spec": spec, "args": vars(args),
                                                      "rows": rows}, indent=1))
    plot(rows, OUT / "speculative.png", f"exact speculative decoding, SmolLM2 {args.quantization}, {where[:60]}")
    print(f"wrote {OUT / 'speculative.md'}, .json, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
