// fp8-turbo's chat page: streams /v1/chat/completions, shows per-answer stats and the served scheme.
// Model output is only ever inserted with textContent / text nodes, never as HTML.
"use strict";

const KEY_STORAGE = "fp8-turbo-api-key"; // sessionStorage only: the key dies with the tab
const SEED_LIMIT = 2n ** 63n;

// The sampling fields of the served API, with its ranges (seed-api.txt, SamplingParams).
const FIELDS = [
  { id: "temperature", lo: 0, hi: 2 },
  { id: "top_p", lo: 0, hi: 1, loOpen: true },
  { id: "top_k", lo: 0, hi: 999, integer: true },
  { id: "min_p", lo: 0, hi: 1 },
  { id: "presence_penalty", lo: -2, hi: 2 },
  { id: "frequency_penalty", lo: -2, hi: 2 },
  { id: "repetition_penalty", lo: 0.01, hi: 5 },
  { id: "max_tokens", lo: 0, hi: 1000000, integer: true, optional: true },
];

const $ = (id) => document.getElementById(id);
const state = {
  card: null,        // the model card of /v1/models (id, max_model_len, quantization)
  history: [],       // [{role, content, view}] of the conversation (system prompt aside)
  controller: null,  // AbortController of the running request
};

// ---- API key -----------------------------------------------------------------------------------
function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function askKey(reason) {
  sessionStorage.removeItem(KEY_STORAGE);
  $("forget-key").hidden = true;
  $("key-reason").textContent = reason;
  $("api-key").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("api-key").focus();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${response.status} ${response.statusText}`;
}

// ---- the model card and its served scheme --------------------------------------------------------
function kvName(dtype) {
  return dtype === "float8_e4m3fn" ? "fp8 e4m3" : dtype;
}

function schemeText(card) {
  const q = card && card.quantization;
  if (!q) return "scheme: not reported";
  return `${q.label} · KV ${kvName(q.kv_cache_dtype)}`;
}

function schemeDetail(q) {
  const layers = Object.entries(q.linear_layers || {}).map(([s, n]) => `${s} ${n}`).join(", ");
  return [`weights: ${q.weights}`, `activations: ${q.activations}`, `compute: ${q.dtype}`,
          `KV cache: ${q.kv_cache_dtype}`, `linear layers: ${layers}`, `requested: --quantization ${q.requested}`].join("\n");
}

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    showBanner(`cannot reach the server: ${e.message}`);
    return false;
  }
  if (response.status === 401) {
    askKey(apiKey() ? "The API key was not accepted; enter it again." : "This server requires an API key.");
    return false;
  }
  if (!response.ok) {
    showBanner(await errorMessage(response));
    return false;
  }
  const card = (await response.json()).data[0];
  state.card = card;
  showBanner(null);
  $("model").textContent = card.id;
  $("scheme").textContent = schemeText(card);
  $("scheme").title = card.quantization ? schemeDetail(card.quantization) : "";
  $("scheme").hidden = false;
  $("forget-key").hidden = !apiKey();
  if (card.max_model_len) {
    $("max_tokens").max = String(card.max_model_len);
    $("max_tokens_range").textContent = `[0, ${card.max_model_len}]`;
  }
  return true;
}

function showBanner(text) {
  $("banner").textContent = text || "";
  $("banner").hidden = !text;
}

// ---- settings -> request fields -----------------------------------------------------------------
function readSettings() {
  const errors = [];
  const params = {};
  for (const f of FIELDS) {
    const input = $(f.id);
    const raw = input.value.trim();
    let message = "";
    if (raw === "") {
      if (!f.optional) message = `${f.id} is required`;
    } else {
      const value = Number(raw);
      const inRange = value >= f.lo && value <= f.hi && !(f.loOpen && value === f.lo);
      if (!Number.isFinite(value) || !inRange || (f.integer && !Number.isInteger(value))) {
        const kind = f.integer ? "an integer" : "a number";
        message = `${f.id} must be ${kind} in ${f.loOpen ? "(" : "["}${f.lo}, ${f.hi}], got ${raw}`;
      } else {
        params[f.id] = value;
      }
    }
    input.setCustomValidity(message);
    if (message) errors.push(message);
  }
  // seed: digits below 2^63, kept as text (a JS number loses digits past 2^53).
  const seed = $("seed").value.trim();
  let seedMessage = "";
  if (seed !== "" && (!/^\d{1,19}$/.test(seed) || BigInt(seed) >= SEED_LIMIT)) {
    seedMessage = `seed must be an integer in [0, 2^63), got ${seed}`;
  }
  $("seed").setCustomValidity(seedMessage);
  if (seedMessage) errors.push(seedMessage);

  const logprobs = $("logprobs").checked;
  if (logprobs) {
    const top = Number($("top_logprobs").value);
    if (!Number.isInteger(top) || top < 0 || top > 20) {
      errors.push(`top_logprobs must be an integer in [0, 20], got ${$("top_logprobs").value}`);
    } else {
      params.logprobs = true;
      params.top_logprobs = top;
    }
  }
  const schemaText = $("json_schema").value.trim();
  $("json_schema").setCustomValidity("");
  if (schemaText !== "") {
    try {
      const schema = JSON.parse(schemaText);
      if (schema === null || typeof schema !== "object" || Array.isArray(schema)) throw new Error("not an object");
      params.response_format = { type: "json_schema", json_schema: { name: "page_schema", schema, strict: true } };
    } catch (e) {
      const message = `JSON Schema: ${e.message}`;
      $("json_schema").setCustomValidity(message);
      errors.push(message);
    }
  }
  $("settings-error").textContent = errors.join("\n");
  $("settings-error").hidden = errors.length === 0;
  return errors.length ? null : { params, seed };
}

function requestBody(settings) {
  const system = $("system").value;
  const messages = system.trim() ? [{ role: "system", content: system }] : [];
  for (const m of state.history) messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true, stream_options: { include_usage: true }, ...settings.params };
  if (state.card) body.model = state.card.id;
  let json = JSON.stringify(body);
  if (settings.seed !== "") json = json.slice(0, -1) + `,"seed":${settings.seed}}`; // checked digits only
  return json;
}

// ---- the message list ---------------------------------------------------------------------------
function addView(role, text) {
  const view = document.createElement("div");
  view.className = `msg ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  view.append(label, body);
  $("messages").append(view);
  view.scrollIntoView({ block: "end" });
  return view;
}

// One chunk of an answer: plain text, or with logprobs one span per token (a chunk whose tokens do not
// spell its text, e.g. the pieces of one multi-byte character, is one span carrying all of them).
function appendAnswer(body, text, logprobs) {
  const entries = logprobs && logprobs.content;
  if (!entries || entries.length === 0) {
    if (text) body.append(document.createTextNode(text));
    return;
  }
  if (entries.map((e) => e.token).join("") === text) {
    for (const e of entries) body.append(tokenSpan(e.token, [e]));
  } else {
    body.append(tokenSpan(text, entries));
  }
}

function tokenSpan(text, entries) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  const p = Math.exp(entries.reduce((sum, e) => sum + e.logprob, 0));
  span.dataset.p = String(p);
  span.style.setProperty("--unlikely", (1 - p).toFixed(3));
  span.entries = entries;
  return span;
}

function showTooltip(span) {
  const tip = $("tooltip");
  tip.replaceChildren();
  for (const e of span.entries) {
    const head = document.createElement("div");
    head.textContent = `${JSON.stringify(e.token)}  p=${(100 * Math.exp(e.logprob)).toFixed(2)}%`;
    tip.append(head);
    for (const alt of e.top_logprobs || []) {
      const line = document.createElement("div");
      line.textContent = `  ${(100 * Math.exp(alt.logprob)).toFixed(2).padStart(6)}%  ${JSON.stringify(alt.token)}`;
      if (alt.token === e.token) line.className = "chosen";
      tip.append(line);
    }
  }
  const box = span.getBoundingClientRect();
  tip.hidden = false;
  const left = Math.min(box.left, window.innerWidth - tip.offsetWidth - 8);
  const above = box.top - 6 - tip.offsetHeight > 0; // above the token, so the lines below stay readable
  tip.style.left = `${Math.max(8, left)}px`;
  tip.style.top = `${above ? box.top - 6 - tip.offsetHeight : box.bottom + 6}px`;
}

function fmt(seconds) {
  return seconds < 10 ? seconds.toFixed(2) : seconds.toFixed(1);
}

// Under each answer: tokens, time to first token, tokens/s, finish_reason, the served scheme.
function statsLine(run) {
  const parts = [];
  if (run.stopped) parts.push("stopped");
  if (run.tokens !== null) parts.push(`${run.tokens} tokens`);
  else parts.push(`~${run.chunks} tokens`); // stopped without logprobs: counted from the stream's chunks
  parts.push(run.tFirst !== null ? `TTFT ${fmt((run.tFirst - run.t0) / 1000)} s` : "TTFT –");
  const n = run.tokens !== null ? run.tokens : run.chunks;
  const decode = run.tLast !== null && run.tFirst !== null ? (run.tLast - run.tFirst) / 1000 : 0;
  parts.push(n > 1 && decode > 0 ? `${((n - 1) / decode).toFixed(1)} tok/s` : "– tok/s");
  parts.push(`finish_reason ${run.stopped ? "(aborted)" : run.finish || "–"}`);
  parts.push(schemeText(state.card));
  return parts.join(" · ");
}

// ---- one request --------------------------------------------------------------------------------
async function* sseData(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

async function generate(settings) {
  const view = addView("assistant", "");
  const body = view.querySelector(".body");
  view.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const run = { t0: performance.now(), tFirst: null, tLast: null, tokens: null, chunks: 0, finish: null,
                stopped: false, usage: null };
  let text = "";
  let logprobTokens = 0;
  let error = null;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                           body: requestBody(settings), signal: controller.signal });
    if (!response.ok) {
      const message = await errorMessage(response);
      if (response.status === 401) askKey("The API key was not accepted; enter it again.");
      throw new Error(message);
    }
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) run.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        const entries = choice.logprobs && choice.logprobs.content;
        if (entries) logprobTokens += entries.length;
        if (delta.content || entries) {
          const now = performance.now();
          if (delta.content && run.tFirst === null) run.tFirst = now;
          run.tLast = now;
          run.chunks += 1;
          text += delta.content || "";
          appendAnswer(body, delta.content || "", choice.logprobs);
          view.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) {
          run.finish = choice.finish_reason;
          run.tLast = performance.now();
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") run.stopped = true;
    else error = e.message;
  } finally {
    if (state.controller === controller) state.controller = null;
    view.classList.remove("streaming");
    setBusy(false);
  }
  if (!view.isConnected) return; // cleared while it streamed: the conversation it belonged to is gone
  if (error !== null && text === "") {
    view.className = "msg error";
    view.querySelector(".role").textContent = "error";
    body.textContent = error;
    view.dataset.state = "error";
    return;
  }
  run.tokens = run.usage ? run.usage.completion_tokens : settings.params.logprobs ? logprobTokens : null;
  if (run.tokens === null && !run.stopped) run.tokens = run.chunks;
  state.history.push({ role: "assistant", content: text, view });
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.textContent = statsLine(run) + (error !== null ? ` · error: ${error}` : "");
  view.append(stats);
  view.dataset.state = run.stopped ? "stopped" : error !== null ? "error" : "done";
  view.scrollIntoView({ block: "end" });
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !state.history.some((m) => m.role === "user");
}

// ---- actions ------------------------------------------------------------------------------------
async function send() {
  if (state.controller) return;
  const text = $("prompt").value;
  if (!text.trim()) return;
  const settings = readSettings();
  if (!settings) return;
  if (!state.card && !(await loadModel())) return;
  $("prompt").value = "";
  state.history.push({ role: "user", content: text, view: addView("user", text) });
  await generate(settings);
}

async function regenerate() {
  if (state.controller) return;
  const settings = readSettings();
  if (!settings) return;
  while (state.history.length && state.history[state.history.length - 1].role === "assistant") {
    state.history.pop().view.remove();
  }
  for (const view of document.querySelectorAll("#messages .msg.error")) view.remove();
  if (!state.history.length) return;
  await generate(settings);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function clearChat() {
  stop();
  state.history = [];
  $("messages").replaceChildren();
  setBusy(false);
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", clearChat);
  $("forget-key").addEventListener("click", () => { askKey("API key forgotten. Enter one to go on."); });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-dialog").close();
    loadModel();
  });
  $("key-dialog").addEventListener("cancel", (e) => e.preventDefault()); // the page is no use without it
  $("messages").addEventListener("mouseover", (e) => {
    const span = e.target.closest(".tok");
    if (span && span.entries) showTooltip(span);
  });
  $("messages").addEventListener("mouseout", (e) => {
    if (e.target.closest(".tok")) $("tooltip").hidden = true;
  });
  loadModel();
});
