// The chat page over POST /generate. The conversation (as much of it as fits in the node's
// context) goes to the server as messages; the answer streams back as server-sent events (token,
// then done or error) and is shown as Markdown while it streams (markdown.js: sanitized before
// it reaches the DOM). Conversations are kept in this browser (store.js: IndexedDB).
import { serverEvents } from "./sse.js";
import { copyText, renderMarkdown } from "./markdown.js";
import { fitToContext, learnFromUsage } from "./context.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const log = $("log");
const form = $("ask");
const prompt = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const statusLine = $("status");
const settingsForm = $("settings");
const settingsToggle = $("settings-toggle");
const chatsPanel = $("chats");
const chatsToggle = $("chats-toggle");
const chatList = $("chat-list");
const chatSearch = $("chat-search");
const fields = {
  system: $("system-prompt"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  apiKey: $("api-key"),
};
const SETTINGS_KEY = "gguf-appliance.settings";
const CURRENT_KEY = "gguf-appliance.current-chat";
let chat = blankChat();
let controller = null;
let keyProblem = null; // what is wrong with the API key, while the node refuses it
let limits = null; // {context_length, max_prompt_tokens} from /v1/models, once known

function blankChat() {
  const now = Date.now();
  return { id: store.newId(), title: "New chat", created: now, updated: now, messages: [] };
}

function announce(text) {
  $("announce").textContent = text;
}

// --- what screen readers hear of the conversation ---

// The conversation (#log) is not a live region: it is drawn whole when a chat is opened, after an
// edit or a regenerate, and a screen reader would read all of it out each time (aria-busy around
// the redraw would only put that off: ARIA lets a reader present what changed once it clears).
// What is new goes to a live region of its own instead (#log-news, role log: its additions are
// read): an answer once it is complete or has failed, a note that older turns were left out. Your
// own message is not read back to you. Each line goes again after a while: a screen reader has it
// by then, and someone browsing the page should not meet the answer twice.
const news = $("log-news");
const NEWS_KEPT_MS = 10_000;

// An entry of the log, read out as "Model: the answer (cut at max tokens)": who speaks and the
// content as it shows (lists, tables, code), without its buttons.
function say(item, ending = "") {
  const content = item.querySelector(".content").cloneNode(true);
  for (const bar of content.querySelectorAll(".code-bar")) bar.remove();
  // Nothing in a hidden region may take focus: a link there is read as its text.
  for (const link of content.querySelectorAll("a")) link.replaceWith(...link.childNodes);
  const line = document.createElement("div");
  line.append(`${item.querySelector(".speaker").textContent} `, ...content.childNodes);
  if (ending) line.append(` (${ending})`);
  news.append(line);
  setTimeout(() => line.remove(), NEWS_KEPT_MS);
}

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

const maxTokens = () => Math.max(1, Math.trunc(Number(fields.maxTokens.value)) || 512);

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

// The status line is a live region: it is written only when it changes (the same words written
// again every 10 s would be read out again every 10 s).
function setStatus(text, bad) {
  if (statusLine.textContent !== text) statusLine.textContent = text;
  statusLine.classList.toggle("bad", bad);
}

async function refreshStatus() {
  try {
    const response = await fetch("health/ready", { cache: "no-store", headers: authHeaders() });
    const body = await response.json();
    if (keyProblem || response.status === 401) {
      setStatus(keyProblem ?? describeKeyProblem(), true);
    } else {
      setStatus(response.ok ? `Ready · ${body.model}` : `Not ready: ${body.reason}`, !response.ok);
    }
  } catch {
    setStatus("The node cannot be reached.", true);
  }
}

function describeKeyProblem() {
  return fields.apiKey.value.trim()
    ? "The API key was refused: check it under Settings."
    : "This node needs an API key: enter it under Settings.";
}

// Ask for a key as soon as the node wants one, not only after a message fails (focus moves to
// the key field only when asked: never while someone types elsewhere). The model's card also
// says how much context a request has.
async function checkKey({ focus = false } = {}) {
  try {
    const response = await fetch("v1/models", { cache: "no-store", headers: authHeaders() });
    keyProblem = response.status === 401 ? describeKeyProblem() : null;
    if (keyProblem && focus) askForKey();
    if (response.ok) {
      const card = (await response.json()).data?.[0];
      if (Number.isInteger(card?.context_length) && Number.isInteger(card?.max_prompt_tokens)) {
        limits = { context_length: card.context_length, max_prompt_tokens: card.max_prompt_tokens };
      }
    }
  } catch { /* refreshStatus says the node cannot be reached */ }
  await refreshStatus();
}

// --- the conversation on screen ---

function button(label, className, onClick, ariaLabel) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = label;
  if (ariaLabel) b.setAttribute("aria-label", ariaLabel);
  b.addEventListener("click", onClick);
  return b;
}

// An entry of the log: who speaks (as text for screen readers, which read it out with the entry
// when the live region announces it), then the content.
const SPEAKERS = { user: "You:", assistant: "Model:", notice: "Note:" };

function entry(role) {
  const item = document.createElement("li");
  item.className = role;
  const speaker = document.createElement("span");
  speaker.className = "speaker visually-hidden";
  speaker.textContent = SPEAKERS[role] ?? `${role}:`;
  const content = document.createElement("div");
  content.className = "content";
  item.append(speaker, content);
  return item;
}

function addStats(item, text) {
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.textContent = text;
  item.append(stats);
}

function messageEntry(message, index) {
  const item = entry(message.role);
  item.dataset.index = index;
  const content = item.querySelector(".content");
  if (message.role === "assistant") content.append(renderMarkdown(message.content));
  else content.textContent = message.content;
  if (message.stats) addStats(item, message.stats);
  const actions = document.createElement("div");
  actions.className = "actions";
  if (message.role === "user") actions.append(button("Edit", "edit", () => startEdit(index), "Edit this message"));
  if (message.role === "assistant" && index === lastAnswerIndex()) {
    actions.append(button("Regenerate", "regenerate", regenerate, "Regenerate this answer"));
  }
  if (actions.childElementCount) item.append(actions);
  return item;
}

const atBottom = () => window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 48;

const lastAnswerIndex = () => chat.messages.findLastIndex((m) => m.role === "assistant");

function renderLog() {
  log.replaceChildren(...chat.messages.map(messageEntry));
  setBusy(Boolean(controller));
}

function setBusy(busy) {
  sendButton.disabled = busy;
  stopButton.disabled = !busy;
  for (const b of log.querySelectorAll(".actions button")) b.disabled = busy;
}

// Copy buttons of code blocks, for every answer (also one still streaming).
log.addEventListener("click", async (event) => {
  const copy = event.target.closest?.(".copy-code");
  if (!copy) return;
  const code = copy.closest(".code-block").querySelector("code").textContent;
  try {
    await copyText(code);
    copy.textContent = "Copied";
    announce("Code copied to the clipboard.");
  } catch {
    copy.textContent = "Copy failed";
    announce("The browser refused to copy.");
  }
  setTimeout(() => { copy.textContent = "Copy"; }, 2000);
});

function startEdit(index) {
  if (controller) return;
  const item = log.querySelector(`li[data-index="${index}"]`);
  const editor = document.createElement("form");
  editor.className = "editor";
  const area = document.createElement("textarea");
  area.value = chat.messages[index].content;
  area.rows = Math.min(10, area.value.split("\n").length + 1);
  area.setAttribute("aria-label", "Edit the message");
  const save = document.createElement("button");
  save.type = "submit";
  save.textContent = "Send";
  const cancel = () => {
    renderLog();
    log.querySelector(`li[data-index="${index}"] .edit`)?.focus();
  };
  editor.append(area, save, button("Cancel", "cancel", cancel));
  editor.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = area.value.trim();
    if (!text || controller) return;
    // The conversation continues from the edited message: what came after it goes.
    chat.messages = chat.messages.slice(0, index);
    chat.messages.push({ role: "user", content: text });
    renderLog();
    ask();
  });
  area.addEventListener("keydown", (event) => {
    if (event.key === "Escape") cancel();
    else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      editor.requestSubmit();
    }
  });
  item.replaceChildren(editor);
  area.focus();
}

function regenerate() {
  if (controller) return;
  const lastUser = chat.messages.findLastIndex((m) => m.role === "user");
  if (lastUser < 0) return;
  chat.messages = chat.messages.slice(0, lastUser + 1);
  renderLog();
  ask();
}

// --- talking to the node ---

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

const ENDINGS = { length: "cut at max tokens", cancelled: "stopped", timeout: "timed out" };

function describeDone(data) {
  const ttft = data.time_to_first_token == null ? "–" : `${data.time_to_first_token.toFixed(2)} s`;
  const rate = data.tokens_per_second == null ? "–" : `${data.tokens_per_second.toFixed(1)} tok/s`;
  const ending = ENDINGS[data.finish_reason];
  return `${data.completion_tokens} tokens · first token ${ttft} · ${rate}${ending ? ` · ${ending}` : ""}`;
}

async function saveChat(thread) {
  thread.updated = Date.now();
  try {
    await store.putChat(thread);
    if (thread === chat) localStorage.setItem(CURRENT_KEY, thread.id);
  } catch { /* storage refused (private mode, full disk): the chat still works, unsaved */ }
  await refreshChatList();
}

// Ask for an answer to the conversation as it stands (its last message is the user's).
async function ask() {
  const thread = chat; // the chat this answer belongs to, even if another is opened meanwhile
  const system = fields.system.value.trim();
  const turns = thread.messages.filter((m) => m.role !== "notice");
  const { send, dropped } = fitToContext({
    system, messages: turns, limits, maxTokens: maxTokens(), base: thread.base, kept: thread.dropped ?? 0,
  });
  if (dropped > (thread.dropped ?? 0)) {
    const notice = {
      role: "notice",
      content: `The ${dropped} oldest messages no longer fit in the model's context (${limits.context_length} tokens) ` +
        "and are left out of what it is sent: it does not see them" + (system ? " (it still sees the system prompt)." : "."),
    };
    thread.messages.push(notice);
    const item = messageEntry(notice, thread.messages.length - 1);
    log.append(item);
    say(item);
  }
  if (thread.messages.filter((m) => m.role === "user").length === 1) thread.title = store.titleFrom(send.at(-1).content);
  const answer = entry("assistant");
  answer.setAttribute("aria-busy", "true");
  log.append(answer);
  answer.scrollIntoView({ block: "end" });
  const content = answer.querySelector(".content");
  let text = "";
  let painted = true;
  const paint = () => {
    painted = true;
    // The view follows the answer as it grows, unless the reader has scrolled up.
    const following = atBottom();
    content.replaceChildren(renderMarkdown(text));
    if (following) window.scrollTo({ top: document.documentElement.scrollHeight });
  };
  controller = new AbortController();
  setBusy(true);
  let failed = false;
  let keyRefused = false;
  let done = null;
  try {
    const response = await fetch("generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({
        messages: system ? [{ role: "system", content: system }, ...send.map(asSent)] : send.map(asSent),
        temperature: Number(fields.temperature.value),
        max_tokens: maxTokens(),
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
      if (event === "token") {
        text += data.text;
        // Markdown is parsed again as the answer grows, at most once a frame.
        if (painted) {
          painted = false;
          requestAnimationFrame(paint);
        }
      } else if (event === "error") throw new Error(`The answer broke off: ${data.message}`);
      else if (event === "done") done = data;
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      failed = true;
      answer.classList.add("error");
      content.textContent = error instanceof TypeError ? "The network failed: check the connection and try again." : error.message;
    }
  } finally {
    answer.removeAttribute("aria-busy");
    controller = null;
    if (failed) {
      // A failed turn leaves the conversation: its message goes back to the box to send again.
      const last = thread.messages.findLastIndex((m) => m.role === "user");
      const [lost] = thread.messages.splice(last);
      if (thread === chat) {
        if (!prompt.value) prompt.value = lost.content;
        log.querySelector(`li[data-index="${last}"] .actions`)?.remove();
        say(answer);
      }
      setBusy(false);
    } else {
      // A stopped answer keeps what came.
      const message = { role: "assistant", content: text, stats: done ? describeDone(done) : "stopped" };
      thread.dropped = dropped;
      if (done) {
        message.tokens = done.completion_tokens + 6;
        learnFromUsage({ chat: thread, system, sent: send, promptTokens: done.prompt_tokens });
      }
      thread.messages.push(message);
      if (thread === chat) {
        // Only the answer's entry is replaced (the rest stays as it is, and where you were in
        // it); Regenerate moves to it.
        for (const old of log.querySelectorAll(".regenerate")) {
          (old.parentElement.childElementCount === 1 ? old.parentElement : old).remove();
        }
        const item = messageEntry(message, thread.messages.length - 1);
        answer.replaceWith(item);
        item.scrollIntoView({ block: "end" });
        say(item, done ? ENDINGS[done.finish_reason] : "stopped");
      }
      setBusy(false);
      await saveChat(thread);
    }
    // Focus goes to the message box only if it was lost (in the replaced entry) or left on Send
    // or Stop: someone reading an earlier answer or the chat list is left there.
    if (keyRefused) fields.apiKey.focus();
    else if (focusLost()) prompt.focus();
  }
}

const focusLost = () => [null, document.body, sendButton, stopButton].includes(document.activeElement);

const asSent = (message) => ({ role: message.role, content: message.content });

// --- the list of kept conversations ---

async function refreshChatList() {
  let chats = [];
  try {
    chats = await store.listChats();
  } catch { /* no IndexedDB here: the list stays empty */ }
  const query = chatSearch.value.trim().toLowerCase();
  const shown = query
    ? chats.filter((c) => c.title.toLowerCase().includes(query) || c.messages.some((m) => m.content.toLowerCase().includes(query)))
    : chats;
  chatList.replaceChildren(...shown.map(chatListItem));
  $("chat-list-empty").hidden = shown.length > 0;
  $("chat-list-empty").textContent = query ? "No chat matches." : "No saved chats yet.";
}

function chatListItem(saved) {
  const item = document.createElement("li");
  item.dataset.id = saved.id;
  const open = button(saved.title, "open-chat", () => openChat(saved.id));
  if (saved.id === chat.id) open.setAttribute("aria-current", "true");
  const rename = button("✎", "rename-chat", () => startRename(item, saved), `Rename “${saved.title}”`);
  const remove = button("✕", "delete-chat", async () => {
    // Two steps: the first press asks, the second deletes.
    if (remove.dataset.armed !== "yes") {
      remove.dataset.armed = "yes";
      remove.textContent = "Delete?";
      remove.setAttribute("aria-label", `Really delete “${saved.title}”? Press again to delete.`);
      announce(`Press again to delete “${saved.title}”.`);
      return;
    }
    const next = item.nextElementSibling?.dataset.id ?? item.previousElementSibling?.dataset.id;
    await store.deleteChat(saved.id);
    announce(`Deleted “${saved.title}”.`);
    if (saved.id === chat.id) newChat();
    await refreshChatList();
    const neighbour = next && chatList.querySelector(`li[data-id="${CSS.escape(next)}"] .open-chat`);
    (neighbour ?? chatSearch).focus();
  }, `Delete “${saved.title}”`);
  item.append(open, rename, remove);
  return item;
}

function startRename(item, saved) {
  const input = document.createElement("input");
  input.value = saved.title;
  input.className = "rename-input";
  input.setAttribute("aria-label", "New title (Enter saves, Escape cancels)");
  let finished = false;
  const finish = async (keep) => {
    if (finished) return;
    finished = true;
    const title = input.value.trim();
    if (keep && title) {
      const fresh = (await store.getChat(saved.id)) ?? saved;
      fresh.title = title.slice(0, 200);
      await store.putChat(fresh);
      if (saved.id === chat.id) chat.title = fresh.title;
      announce(`Renamed to “${fresh.title}”.`);
    }
    await refreshChatList();
    chatList.querySelector(`li[data-id="${CSS.escape(saved.id)}"] .open-chat`)?.focus();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    else if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

async function openChat(id) {
  const saved = await store.getChat(id);
  if (!saved) return;
  controller?.abort();
  chat = saved;
  localStorage.setItem(CURRENT_KEY, id);
  renderLog();
  await refreshChatList();
  closeChatsOnPhone();
  prompt.focus();
}

function newChat() {
  controller?.abort();
  chat = blankChat();
  localStorage.removeItem(CURRENT_KEY);
  renderLog();
  refreshChatList();
  prompt.focus();
}

function closeChatsOnPhone() {
  chatsPanel.classList.remove("open");
  chatsToggle.setAttribute("aria-expanded", "false");
}

async function exportChats() {
  const blob = new Blob([await store.exportChats()], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `gguf-appliance-chats-${new Date().toISOString().slice(0, 10)}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function importChats(file) {
  try {
    const added = await store.importChats(await file.text());
    $("chat-files-note").textContent = `Imported ${added} chat${added === 1 ? "" : "s"}.`;
  } catch (error) {
    $("chat-files-note").textContent = `That file could not be imported: ${error.message}`;
  }
  await refreshChatList();
}

// --- wiring ---

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  if (!text || controller) return;
  prompt.value = "";
  chat.messages.push({ role: "user", content: text });
  log.append(messageEntry(chat.messages.at(-1), chat.messages.length - 1));
  ask();
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});
stopButton.addEventListener("click", () => controller?.abort());
$("new-chat").addEventListener("click", newChat);
settingsToggle.addEventListener("click", () => {
  settingsForm.hidden = !settingsForm.hidden;
  settingsToggle.setAttribute("aria-expanded", String(!settingsForm.hidden));
});
chatsToggle.addEventListener("click", () => {
  const open = chatsPanel.classList.toggle("open");
  chatsToggle.setAttribute("aria-expanded", String(open));
  if (open) chatSearch.focus();
});
chatSearch.addEventListener("input", refreshChatList);
$("export-chats").addEventListener("click", exportChats);
$("import-chats").addEventListener("click", () => $("import-file").click());
$("import-file").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) importChats(file);
  event.target.value = "";
});
// The message box stays on the bottom edge of the screen: an entry scrolled into view stops
// above it (style.css: scroll-margin-bottom), however tall the box is.
new ResizeObserver(() => {
  document.documentElement.style.setProperty("--ask-height", `${form.offsetHeight}px`);
}).observe(form);
settingsForm.addEventListener("input", saveSettings);
settingsForm.addEventListener("submit", (event) => event.preventDefault());
fields.apiKey.addEventListener("change", () => checkKey());
loadSettings();

async function restoreCurrentChat() {
  const id = localStorage.getItem(CURRENT_KEY);
  try {
    const saved = id && (await store.getChat(id));
    if (saved) chat = saved;
  } catch { /* no IndexedDB: start blank */ }
  renderLog();
  await refreshChatList();
  document.body.dataset.ready = "yes";
}

restoreCurrentChat();
checkKey({ focus: true });
setInterval(refreshStatus, 10000);
