// The chat page over POST /generate. The whole conversation goes to the server as messages; the
// answer streams back as server-sent events (token, then done or error). Model output is
// untrusted: it is only ever set as text (textContent / text nodes), never parsed as HTML.
import { serverEvents } from "./sse.js";

const $ = (id) => document.getElementById(id);
const log = $("log");
const form = $("ask");
const prompt = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const statusLine = $("status");
const settingsForm = $("settings");
const settingsToggle = $("settings-toggle");
const fields = {
  system: $("system-prompt"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  apiKey: $("api-key"),
};
const SETTINGS_KEY = "gguf-appliance.settings";
let history = [];
let controller = null;
let keyProblem = null; // what is wrong with the API key, while the node refuses it

// --- settings, remembered in this browser ---

function loadSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) ?? "{}");
    if (typeof saved.system === "string") fields.system.value = saved.system;
    if (Number.isFinite(saved.temperature)) fields.temperature.value = saved.temperature;
    if (Number.isInteger(saved.maxTokens)) fields.maxTokens.value = saved.maxTokens;
    if (typeof saved.apiKey === "string") fields.apiKey.value = saved.apiKey;
  } catch { /* a broken entry: keep the defaults */ }
  $("temperature-value").textContent = fields.temperature.value;
}

function saveSettings() {
  $("temperature-value").textContent = fields.temperature.value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify({
    system: fields.system.value,
    temperature: Number(fields.temperature.value),
    maxTokens: Math.trunc(Number(fields.maxTokens.value)),
    apiKey: fields.apiKey.value.trim(),
  }));
}

// The API key, when one is set, goes with every request (the node may protect /health too).
function authHeaders() {
  const key = fields.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// Open the settings at the key field: the node has asked for a key.
function askForKey() {
  settingsForm.hidden = false;
  settingsToggle.setAttribute("aria-expanded", "true");
  fields.apiKey.focus();
}

// --- the node's state ---

async function refreshStatus() {
  try {
    const response = await fetch("health/ready", { cache: "no-store", headers: authHeaders() });
    const body = await response.json();
    if (keyProblem || response.status === 401) {
      statusLine.textContent = keyProblem ?? describeKeyProblem();
    } else {
      statusLine.textContent = response.ok ? `Ready · ${body.model}` : `Not ready: ${body.reason}`;
    }
    statusLine.classList.toggle("bad", Boolean(keyProblem) || !response.ok);
  } catch {
    statusLine.textContent = "The node cannot be reached.";
    statusLine.classList.add("bad");
  }
}

function describeKeyProblem() {
  return fields.apiKey.value.trim()
    ? "The API key was refused: check it under Settings."
    : "This node needs an API key: enter it under Settings.";
}

// Ask for a key as soon as the node wants one, not only after a message fails. (Focus moves to
// the key field only when asked: never while someone types elsewhere.)
async function checkKey({ focus = false } = {}) {
  try {
    const response = await fetch("v1/models", { cache: "no-store", headers: authHeaders() });
    keyProblem = response.status === 401 ? describeKeyProblem() : null;
    if (keyProblem && focus) askForKey();
  } catch { /* refreshStatus says the node cannot be reached */ }
  await refreshStatus();
}

// --- the conversation ---

function addEntry(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.setAttribute("aria-label", role === "user" ? "You" : "Model");
  item.append(document.createTextNode(text));
  log.append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function addStats(item, text) {
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.textContent = text;
  item.append(stats);
}

function describeFailure(status, body, retryAfter) {
  const message = body?.error?.message ?? `HTTP ${status}`;
  if (status === 503) {
    const wait = retryAfter ? ` Try again in ${retryAfter} s.` : " Try again shortly.";
    return `The node is busy right now (${message}).${wait}`;
  }
  if (status === 429) return `Too many requests from you: wait ${retryAfter ?? "a few"} s and try again.`;
  if (status === 401) return `${describeKeyProblem()} Then send again.`;
  if (status === 400 || status === 413) return `The request was refused: ${message}`;
  return `The node answered HTTP ${status}: ${message}`;
}

function describeDone(data) {
  const ttft = data.time_to_first_token == null ? "–" : `${data.time_to_first_token.toFixed(2)} s`;
  const rate = data.tokens_per_second == null ? "–" : `${data.tokens_per_second.toFixed(1)} tok/s`;
  const ending = { stop: "", length: " · cut at max tokens", cancelled: " · stopped", timeout: " · timed out" };
  return `${data.completion_tokens} tokens · first token ${ttft} · ${rate}${ending[data.finish_reason] ?? ""}`;
}

function requestMessages() {
  const system = fields.system.value.trim();
  return system ? [{ role: "system", content: system }, ...history] : history;
}

async function ask(text) {
  history.push({ role: "user", content: text });
  addEntry("user", text);
  const answer = addEntry("assistant", "");
  answer.setAttribute("aria-busy", "true");
  const body = answer.firstChild;
  controller = new AbortController();
  sendButton.disabled = true;
  stopButton.disabled = false;
  let failed = false;
  let keyRefused = false;
  try {
    const response = await fetch("generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({
        messages: requestMessages(),
        temperature: Number(fields.temperature.value),
        max_tokens: Math.max(1, Math.trunc(Number(fields.maxTokens.value)) || 512),
      }),
      signal: controller.signal,
    });
    if (!response.ok) {
      if (response.status === 401) {
        keyRefused = true;
        askForKey();
        checkKey();
      }
      const failure = await response.json().catch(() => null);
      throw new Error(describeFailure(response.status, failure, response.headers.get("Retry-After")));
    }
    for await (const record of serverEvents(response)) {
      const event = record.event;
      const data = JSON.parse(record.data);
      if (event === "token") body.appendData(data.text);
      else if (event === "error") throw new Error(`The answer broke off: ${data.message}`);
      else if (event === "done") addStats(answer, describeDone(data));
    }
  } catch (error) {
    if (error.name === "AbortError") {
      addStats(answer, "stopped");
    } else {
      failed = true;
      answer.classList.add("error");
      body.data = error instanceof TypeError ? "The network failed: check the connection and try again." : error.message;
    }
  } finally {
    answer.removeAttribute("aria-busy");
    // A failed turn leaves the conversation; a stopped one keeps what came.
    if (failed) history.pop();
    else history.push({ role: "assistant", content: body.data });
    controller = null;
    sendButton.disabled = false;
    stopButton.disabled = true;
    (keyRefused ? fields.apiKey : prompt).focus();
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  if (!text || controller) return;
  prompt.value = "";
  ask(text);
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});
stopButton.addEventListener("click", () => controller?.abort());
$("new-chat").addEventListener("click", () => {
  controller?.abort();
  history = [];
  log.replaceChildren();
  prompt.focus();
});
settingsToggle.addEventListener("click", () => {
  settingsForm.hidden = !settingsForm.hidden;
  settingsToggle.setAttribute("aria-expanded", String(!settingsForm.hidden));
});
settingsForm.addEventListener("input", saveSettings);
settingsForm.addEventListener("submit", (event) => event.preventDefault());
fields.apiKey.addEventListener("change", () => checkKey());
loadSettings();
checkKey({ focus: true });
setInterval(refreshStatus, 10000);
