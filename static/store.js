// Conversations kept in this browser (IndexedDB), and their export and import as JSON.
// A chat: {id, title, created, updated, messages: [{role, content, stats?, tokens?}], base?,
// dropped?} (role: user, assistant, or notice: a line the page said, never sent to the model;
// base and dropped: context.js).
const DB_NAME = "gguf-appliance";
const STORE = "chats";
const EXPORT_FORMAT = "gguf-appliance.chats";
const ROLES = new Set(["user", "assistant", "notice"]);

let opened = null;

function database() {
  opened ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id" });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opened;
}

async function run(mode, action) {
  const db = await database();
  return new Promise((resolve, reject) => {
    const transaction = db.transaction(STORE, mode);
    const request = action(transaction.objectStore(STORE));
    transaction.oncomplete = () => resolve(request?.result);
    transaction.onerror = () => reject(transaction.error);
    transaction.onabort = () => reject(transaction.error);
  });
}

export const newId = () => `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;

export function titleFrom(text) {
  const line = text.replace(/\s+/g, " ").trim();
  return line.length > 60 ? `${line.slice(0, 57)}…` : line || "New chat";
}

export async function listChats() {
  const chats = await run("readonly", (store) => store.getAll());
  return chats.sort((a, b) => b.updated - a.updated);
}

export const getChat = (id) => run("readonly", (store) => store.get(id));
export const putChat = (chat) => run("readwrite", (store) => store.put(chat));
export const deleteChat = (id) => run("readwrite", (store) => store.delete(id));

export async function exportChats() {
  return JSON.stringify({ format: EXPORT_FORMAT, version: 1, chats: await listChats() }, null, 2);
}

// A chat from an imported file, checked field by field: only what the page itself writes.
function checkedChat(raw) {
  if (typeof raw !== "object" || raw === null || !Array.isArray(raw.messages)) throw new Error("a chat without messages");
  const messages = raw.messages.map((m) => {
    if (!ROLES.has(m?.role) || typeof m.content !== "string") throw new Error("a message without a known role and text");
    const message = { role: m.role, content: m.content };
    if (typeof m.stats === "string") message.stats = m.stats;
    if (Number.isInteger(m.tokens) && m.tokens >= 0) message.tokens = m.tokens;
    return message;
  });
  const now = Date.now();
  const firstUser = messages.find((m) => m.role === "user");
  return {
    id: typeof raw.id === "string" && raw.id ? raw.id.slice(0, 64) : newId(),
    title: typeof raw.title === "string" && raw.title.trim() ? raw.title.slice(0, 200) : titleFrom(firstUser?.content ?? ""),
    created: Number.isFinite(raw.created) ? raw.created : now,
    updated: Number.isFinite(raw.updated) ? raw.updated : now,
    messages,
  };
}

// Import a file written by exportChats (or one chat, or a list of chats); returns how many were
// added. A chat whose id is taken by a different one here gets a new id; an identical one is skipped.
export async function importChats(text) {
  const parsed = JSON.parse(text);
  const raws = Array.isArray(parsed) ? parsed : Array.isArray(parsed?.chats) ? parsed.chats : [parsed];
  const chats = raws.map(checkedChat);
  let added = 0;
  for (const chat of chats) {
    const existing = await getChat(chat.id);
    if (existing) {
      if (JSON.stringify(existing.messages) === JSON.stringify(chat.messages)) continue;
      chat.id = newId();
    }
    await putChat(chat);
    added += 1;
  }
  return added;
}
