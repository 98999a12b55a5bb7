// A minimal chat over POST /generate: the whole conversation goes as messages, the answer
// streams back as server-sent events (token, then done or error). Output is shown with
// textContent only: model text is never parsed as HTML.
const log = document.getElementById("log");
const form = document.getElementById("ask");
const prompt = document.getElementById("prompt");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const statusLine = document.getElementById("status");
const history = [];
let controller = null;

function addEntry(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  log.append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

async function refreshStatus() {
  try {
    const response = await fetch("health/ready");
    const body = await response.json();
    statusLine.textContent = response.ok ? `Ready: ${body.model}` : `Not ready: ${body.reason}`;
  } catch {
    statusLine.textContent = "The node cannot be reached.";
  }
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
  if (status === 503) return `The node is busy: ${message}` + (retryAfter ? ` (retry in ${retryAfter} s)` : "");
  if (status === 429) return "Too many requests: wait a moment and retry.";
  if (status === 401) return "This node needs an API key.";
  return message;
}

async function ask(text) {
  history.push({ role: "user", content: text });
  addEntry("user", text);
  const answer = addEntry("assistant", "");
  const body = document.createTextNode("");
  answer.append(body);
  controller = new AbortController();
  sendButton.disabled = true;
  stopButton.disabled = false;
  try {
    const response = await fetch("generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: history }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const failure = await response.json().catch(() => null);
      throw new Error(describeFailure(response.status, failure, response.headers.get("Retry-After")));
    }
    for await (const { event, data } of serverEvents(response)) {
      if (event === "token") body.appendData(data.text);
      else if (event === "error") throw new Error(data.message);
      else if (event === "done") {
        const stats = document.createElement("span");
        stats.className = "stats";
        const ttft = data.time_to_first_token == null ? "–" : `${data.time_to_first_token.toFixed(2)} s`;
        const rate = data.tokens_per_second == null ? "–" : `${data.tokens_per_second.toFixed(1)} tok/s`;
        stats.textContent = `${data.completion_tokens} tokens · first token ${ttft} · ${rate} · ${data.finish_reason}`;
        answer.append(stats);
      }
    }
    history.push({ role: "assistant", content: body.data });
  } catch (error) {
    if (error.name === "AbortError") {
      history.push({ role: "assistant", content: body.data });
      answer.append(Object.assign(document.createElement("span"), { className: "stats", textContent: "stopped" }));
    } else {
      history.pop();
      answer.classList.add("error");
      body.data = error.message || "The network failed.";
    }
  } finally {
    controller = null;
    sendButton.disabled = false;
    stopButton.disabled = true;
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
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    form.requestSubmit();
  }
});
stopButton.addEventListener("click", () => controller?.abort());
refreshStatus();
setInterval(refreshStatus, 10000);
