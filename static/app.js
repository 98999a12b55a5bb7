// The chat page over POST /generate. The whole conversation goes to the server as messages; the
// answer streams back as server-sent events (token, then done or error). Model output is
// untrusted: it is only ever set as text (textContent / text nodes), never parsed as HTML.
const $ = (id) => document.getElementById(id);
const log = $("log");
const form = $("ask");
const prompt = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const statusLine = $("status");
const settingsForm = $("settings");
const settingsToggle = $("settings-toggle");
const fields = { system: $("system-prompt"), temperature: $("temperature"), maxTokens: $("max-tokens") };
const SETTINGS_KEY = "gguf-appliance.settings";
let history = [];
let controller = null;

// --- settings, remembered in this browser ---

function loadSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) ?? "{}");
    if (typeof saved.system === "string") fields.system.value = saved.system;
    if (Number.isFinite(saved.temperature)) fields.temperature.value = saved.temperature;
    if (Number.isInteger(saved.maxTokens)) fields.maxTokens.value = saved.maxTokens;
  } catch { /* a broken entry: keep the defaults */ }
  $("temperature-value").textContent = fields.temperature.value;
}

function saveSettings() {
  $("temperature-value").textContent = fields.temperature.value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify({
    system: fields.system.value,
    temperature: Number(fields.temperature.value),
    maxTokens: Math.trunc(Number(fields.maxTokens.value)),
  }));
}

// --- the node's state ---

async function refreshStatus() {
  try {
    const response = await fetch("health/ready", { cache: "no-store" });
    const body = await response.json();
    statusLine.textContent = response.ok ? `Ready · ${body.model}` : `Not ready: ${body.reason}`;
    statusLine.classList.toggle("bad", !response.ok);
  } catch {
    statusLine.textContent = "The node cannot be reached.";
    statusLine.classList.add("bad");
  }
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

// Parse an SSE byte stream into {event, data} records.
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function describeFailure(status, body, retryAfter) {
  const message = body?.error?.message ?? `HTTP ${status}`;
  if (status === 503) {
    const wait = retryAfter ? ` Try again in ${retryAfter} s.` : " Try again shortly.";
    return `The node is busy right now (${message}).${wait}`;
  }
  if (status === 429) return `Too many requests from you: wait ${retryAfter ?? "a few"} s and try again.`;
  if (status === 401) return "This node needs an API key.";
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
  try {
    const response = await fetch("generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        messages: requestMessages(),
        temperature: Number(fields.temperature.value),
        max_tokens: Math.max(1, Math.trunc(Number(fields.maxTokens.value)) || 512),
      }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const failure = await response.json().catch(() => null);
      throw new Error(describeFailure(response.status, failure, response.headers.get("Retry-After")));
    }
    for await (const { event, data } of serverEvents(response)) {
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
    prompt.focus();
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
loadSettings();
refreshStatus();
setInterval(refreshStatus, 10000);
