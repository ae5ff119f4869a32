"""Speculative decoding on SmolLM2 changes no output: tokens, text, finish reasons and logprobs are
identical with and without it (greedy and seeded, fp8 and none), in mixed batches with penalties,
logit_bias, min_tokens, stop strings, max_tokens, n > 1, prompt logprobs, structured outputs, and
under a KV budget small enough to preempt. Drafts must really be kept and rejected in each test
(checked), so the comparisons are not vacuous. Model-free properties: tests/test_speculative_drafts.py.
"""
from __future__ import annotations

import contextlib

import pytest

from fp8_turbo import LLM, SamplingParams
from fp8_turbo.engine.core.spec_decode import Drafter, SpeculativeConfig
from fp8_turbo.engine.sampling.params import StructuredOutputsParams

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
PARAGRAPH = ("The old lighthouse stood on the northern cliff for more than two hundred years. Every night its "
             "keeper climbed the spiral stairs, trimmed the wick, and polished the great lens until it shone. "
             "Ships passing through the narrow strait relied on its steady beam to avoid the rocks below.")
REWRITE = [{"role": "user", "content": "Rewrite this paragraph, changing 'keeper' to 'guardian' and nothing "
                                       "else:\n\n" + PARAGRAPH}]
CODE = [{"role": "user", "content": "Rename the variable total to result in this code:\n\n"
                                    "def add(values):\n    total = 0\n    for v in values:\n        total += v\n"
                                    "    return total\n"}]
STORY = [{"role": "user", "content": "Tell me a short story about a fox."}]
RECORD = ("Customer record: name Maria Gonzalez, email maria.gonzalez@example.com, city Valencia, "
          "member since 2019, favourite product the blue ceramic teapot.")
EXTRACT = [{"role": "user", "content": RECORD + "\nReturn the customer as JSON."}]
CUSTOMER = {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"},
                                             "city": {"type": "string"}, "member_since": {"type": "integer"},
                                             "favourite_product": {"type": "string"}},
            "required": ["name", "email", "city", "member_since", "favourite_product"]}


@pytest.fixture(scope="module", params=["fp8", "none"])
def llm(request):
    """An engine built with speculation on (the public path); `speculation(llm, None)` turns it off."""
    return LLM("smollm2-135m-instruct", quantization=request.param, device="cpu",
               kv_cache_memory_bytes=128 << 20, speculative_config=SPEC)


@contextlib.contextmanager
def speculation(llm: LLM, spec: dict | None):
    """Run with this speculative config (None: off), with fresh statistics; yields the Drafter."""
    engine = llm.engine
    saved = engine.drafter
    drafter = Drafter(SpeculativeConfig(**spec), engine.max_model_len) if spec is not None else None
    engine.drafter = engine.scheduler.drafter = drafter
    try:
        yield drafter
    finally:
        engine.drafter = engine.scheduler.drafter = saved


def facts(outs) -> list:
    """Everything a user sees of each request, logprobs as exact floats."""
    def lps(entries):
        return None if entries is None else [
            None if d is None else sorted((t, lp.logprob, lp.rank, lp.decoded_token) for t, lp in d.items())
            for d in entries]
    return [([(c.token_ids, c.text, c.finish_reason, c.stop_reason, lps(c.logprobs)) for c in o.outputs],
             lps(o.prompt_logprobs)) for o in outs]


def compare(llm, prompts, params, spec=SPEC):
    """Generate without and with speculation; assert equal; return the drafter (its statistics)."""
    with speculation(llm, None):
        expected = llm.generate(prompts, params)
    with speculation(llm, spec) as drafter:
        got = llm.generate(prompts, params)
    assert facts(got) == facts(expected)
    engine = llm.engine
    engine.block_manager.check_consistency([])  # every block back, ref counts right
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return drafter, expected


def chat_ids(llm, messages) -> dict:
    return {"prompt_token_ids": llm.tokenizer.apply_chat_template(messages)}


def kept_and_rejected(drafter: Drafter) -> None:
    assert 0 < drafter.num_accepted_tokens < drafter.num_draft_tokens, (drafter.num_accepted_tokens,
                                                                        drafter.num_draft_tokens)


def test_mixed_batch_is_identical(llm):
    """Greedy, seeded top-p/top-k, penalties, logit_bias, min_tokens, n=2, prompt logprobs: one batch."""
    prompts = [chat_ids(llm, m) for m in (REWRITE, REWRITE, CODE, STORY, REWRITE, CODE)]
    params = [
        SamplingParams(temperature=0, max_tokens=64, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.95, seed=3, max_tokens=64, logprobs=1),
        SamplingParams(temperature=0, max_tokens=48, repetition_penalty=1.3, frequency_penalty=0.4,
                       presence_penalty=0.2, logit_bias={13: -5.0}),
        SamplingParams(temperature=0.7, top_k=20, n=2, seed=11, max_tokens=40),
        SamplingParams(temperature=0.9, min_p=0.05, seed=5, max_tokens=48, min_tokens=30, prompt_logprobs=1),
        SamplingParams(temperature=1.0, seed=9, max_tokens=40, logprobs=0, presence_penalty=0.5),
    ]
    drafter, _ = compare(llm, prompts, params)
    kept_and_rejected(drafter)


def test_stop_strings_and_max_tokens_inside_accepted_runs(llm):
    """A stop string that ends inside a run of accepted drafts truncates exactly there, as does a
    max_tokens reached in the middle of a run."""
    prompt = chat_ids(llm, REWRITE)
    with speculation(llm, None):
        full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    words = full.text.split()
    assert len(words) > 20, full.text
    stops = [words[12], words[20][:3], " " + words[17] + " "]
    params = [SamplingParams(temperature=0, max_tokens=64, stop=[stop]) for stop in stops]
    params += [SamplingParams(temperature=0, max_tokens=m, include_stop_str_in_output=True, stop=[words[30]])
               for m in (7, 13, 22)]
    params += [SamplingParams(temperature=0.8, seed=4, max_tokens=m) for m in (9, 17)]
    drafter, expected = compare(llm, [prompt] * len(params), params)
    assert drafter.num_accepted_tokens > 0
    assert [o.outputs[0].finish_reason for o in expected[:3]] == ["stop"] * 3
    assert [len(o.outputs[0].token_ids) for o in expected[3:]] == [7, 13, 22, 9, 17]


def test_seeded_tokens_do_not_depend_on_the_draft_length(llm):
    """A seeded request's tokens are keyed by (seed, position): verifying 1, 2 or 5 positions per
    step gives what one position per step gives."""
    prompts = [chat_ids(llm, REWRITE), chat_ids(llm, STORY)]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=21, n=2, max_tokens=48, logprobs=1)
    for k in (1, 2, 5):
        drafter, _ = compare(llm, prompts, params, {**SPEC, "num_speculative_tokens": k})
        assert drafter.num_accepted_tokens > 0, k


def test_structured_outputs_are_identical_and_use_forced_drafts(llm):
    """JSON under a schema: grammar-forced drafts (keys, quotes, punctuation) and n-gram drafts from
    the record are verified with the grammar's masks at every position; every matcher is closed."""
    prompt = chat_ids(llm, EXTRACT)
    structured = StructuredOutputsParams(json=CUSTOMER)
    params = [SamplingParams(temperature=0, max_tokens=80, logprobs=1, structured_outputs=structured),
              SamplingParams(temperature=0.7, seed=2, max_tokens=80, structured_outputs=structured),
              SamplingParams(temperature=0, max_tokens=48)]  # a free row beside them
    drafter, expected = compare(llm, [prompt] * 3, params)
    assert expected[0].outputs[0].finish_reason == "stop"
    kept_and_rejected(drafter)
    assert drafter.num_forced_tokens > 0
    assert llm.engine.structured.num_matchers == 0
    with speculation(llm, {**SPEC, "jump_forward": False}) as ngram_only:
        assert facts(llm.generate([prompt], params[0])) == facts(expected[:1])
    assert ngram_only.num_forced_tokens == 0


def test_prefix_cache_never_holds_a_rejected_token(llm):
    """After a speculative generation, its prompt plus part of its output is a prefix-cache hit that
    covers generated tokens; the continuation from those cached blocks is bit-identical to one that
    computes everything (a block holding a rejected draft's KV would change it)."""
    engine = llm.engine
    prompt = chat_ids(llm, CODE)["prompt_token_ids"]
    with speculation(llm, SPEC) as drafter:
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=64))[0]
    kept_and_rejected(drafter)
    follow = prompt + out.outputs[0].token_ids[:48]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=3)
    with speculation(llm, None):
        cached = llm.generate([{"prompt_token_ids": follow}], params)[0]
        engine.block_manager.enable_prefix_caching = False
        try:
            computed = llm.generate([{"prompt_token_ids": follow}], params)[0]
        finally:
            engine.block_manager.enable_prefix_caching = True
    assert cached.num_cached_tokens > len(prompt)  # blocks of generated tokens were hits
    assert facts([cached]) == facts([computed])


def test_preemption_under_a_small_kv_budget(llm):
    """A cache too small for the batch preempts and recomputes sequences while others verify drafts;
    the outputs are those of a roomy cache without speculation, and no block is left behind."""
    engine = llm.engine
    cfg = engine.model_config
    quantization = engine.config.quantization
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # fp32 K and V
    tight = LLM("smollm2-135m-instruct", quantization=quantization, device="cpu",
                kv_cache_memory_bytes=24 * 16 * per_token, speculative_config=SPEC)
    preempted = []
    schedule = tight.engine.scheduler.schedule

    def spy():
        out = schedule()
        preempted.extend(out.preempted)
        return out

    tight.engine.scheduler.schedule = spy
    prompts = [chat_ids(llm, m) for m in (REWRITE, CODE, REWRITE, EXTRACT)]
    params = [SamplingParams(temperature=0, max_tokens=60, logprobs=1),
              SamplingParams(temperature=0.8, seed=1, max_tokens=60),
              SamplingParams(temperature=0.8, seed=2, max_tokens=60, logprobs=2),
              SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=CUSTOMER))]
    with speculation(llm, None):
        expected = llm.generate(prompts, params)
    got = tight.generate(prompts, params)
    assert preempted, "the cache was meant to be small enough to preempt"
    kept_and_rejected(tight.engine.drafter)
    assert facts(got) == facts(expected)
    bm = tight.engine.block_manager
    bm.check_consistency([])
    assert bm.num_free_blocks == bm.num_blocks


def test_grammar_forks_for_verification(llm):
    """A fork is a copy one token ahead (the original does not move); a token the grammar refuses gives
    None (a sequence that kept it would end there), and no copy stays open."""
    structured = llm.engine.structured
    before = structured.num_matchers
    matcher = structured.compile(StructuredOutputsParams(json=CUSTOMER)).matcher()
    forced = matcher.forced_tokens()
    assert forced and llm.tokenizer.decode(forced).startswith('{"')
    ahead = matcher.fork(forced[0])
    assert ahead.valid_prefix(forced[1:]) == len(forced) - 1  # the copy moved on by one token
    assert ahead.valid_prefix(forced[:1]) == 0  # `{"` again is not JSON
    assert matcher.forced_tokens() == forced  # the original did not
    assert matcher.valid_prefix(forced + llm.tokenizer.encode("}", add_special_tokens=False)) == len(forced)
    assert matcher.fork(llm.tokenizer.encode("}", add_special_tokens=False)[0]) is None
    ahead.close()
    matcher.close()
    assert structured.num_matchers == before
