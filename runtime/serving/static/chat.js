// The chat page of `gemma-run serve`: one conversation over POST /v1/chat/completions with stream: true.
// No build step and nothing from elsewhere: the server's API is all it talks to.
"use strict";

const KEY = "gemma-deploy-api-key";  // sessionStorage: asked once per tab, when the server answers 401
const NUMBERS = ["temperature", "top_p", "top_k", "max_tokens", "seed"];
const $ = (id) => document.getElementById(id);
const state = { messages: [], model: null, controller: null, retry: null };

class NeedKey extends Error {}

function headers() {
  const out = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function request(path, init = {}) {
  const response = await fetch(path, { ...init, headers: headers() });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    throw new NeedKey(await errorMessage(response));
  }
  return response;
}

async function errorMessage(response) {
  // OpenAI's error body: {"error": {"message", "type", "param", "code"}}
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

async function modelName() {
  if (!state.model) {
    const response = await request("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    state.model = (await response.json()).data[0].id;
    $("model").textContent = state.model;
  }
  return state.model;
}

function settings() {
  // The sampling fields as the request takes them (an empty seed: none); the JSON schema as a response_format.
  const out = {};
  for (const name of NUMBERS) {
    const text = $(name).value.trim();
    if (text === "") continue;
    const value = Number(text);
    if (!Number.isFinite(value)) throw new Error(`${name}: ${JSON.stringify(text)} is not a number`);
    out[name] = value;
  }
  const schema = $("schema").value.trim();
  if (schema) {
    let parsed;
    try { parsed = JSON.parse(schema); } catch (e) { throw new Error(`JSON schema: not valid JSON (${e.message})`); }
    out.response_format = { type: "json_schema", json_schema: { name: "schema", schema: parsed, strict: true } };
  }
  return out;
}

function bubble(role, text) {
  const node = document.createElement("div");
  node.className = `message ${role}`;
  node.textContent = text;
  $("conversation").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Server-sent events: blocks separated by a blank line, each with `data:` lines.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = blocks.pop();
    for (const block of blocks) {
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  }
}

function showSpeed(tokens, firstAt) {
  const seconds = (performance.now() - firstAt) / 1000;
  const rate = tokens > 1 && seconds > 0 ? `, ${((tokens - 1) / seconds).toFixed(1)} tokens/s` : "";
  $("speed").textContent = `${tokens} tokens${rate}`;
}

async function send(text) {
  $("error").hidden = true;
  let body;
  try {
    body = { model: await modelName(), stream: true, stream_options: { include_usage: true }, ...settings() };
  } catch (e) {
    return failed(e, text);
  }
  state.messages.push({ role: "user", content: text });
  const userNode = bubble("user", text);
  const answer = bubble("assistant", "");
  state.controller = new AbortController();
  busy(true);
  let reply = "", tokens = 0, firstAt = null;
  try {
    const response = await request("/v1/chat/completions", {
      method: "POST", body: JSON.stringify({ ...body, messages: state.messages }), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (firstAt === null) firstAt = performance.now();
        reply += delta.content;
        answer.textContent = reply;
        answer.scrollIntoView({ block: "end" });
        tokens += 1;
        showSpeed(tokens, firstAt);
      }
      if (chunk.usage && firstAt !== null) showSpeed(chunk.usage.completion_tokens, firstAt);
    }
    state.messages.push({ role: "assistant", content: reply });
  } catch (e) {
    if (e.name === "AbortError") {  // stopped: the partial answer stays in the conversation
      answer.classList.add("stopped");
      state.messages.push({ role: "assistant", content: reply });
    } else {
      state.messages.pop();
      userNode.remove();
      answer.remove();
      failed(e, text);
    }
  } finally {
    state.controller = null;
    busy(false);
  }
}

function failed(error, text) {
  // The message goes back into the box, to send again once the setting (or the key) is right.
  $("prompt").value = text;
  if (error instanceof NeedKey) {
    state.retry = text;
    $("key-form").hidden = false;
    $("api-key").focus();
    return;
  }
  showError(error.message);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => state.controller && state.controller.abort());

$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("conversation").replaceChildren();
  $("speed").textContent = "";
  $("error").hidden = true;
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  const text = state.retry;
  state.retry = null;
  if (text) {
    $("prompt").value = "";
    send(text);
  }
});

modelName().catch((e) => { if (e instanceof NeedKey) $("key-form").hidden = false; else showError(e.message); });
