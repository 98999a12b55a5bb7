// Long chats keep working: before a request would not fit in the node's context, the oldest turns
// are left out of it (never the system prompt, never the new message). A message's size is the
// node's own count where one is known (an answer's completion_tokens, a message's share of a
// prompt_tokens), else an estimate that errs high (3 bytes of UTF-8 a token, most text has more).
const MESSAGE_OVERHEAD = 6; // the chat template's tokens around each message
const UNKNOWN_BASE = 40; // the template's own tokens (a default system prompt) until measured
const MARGIN = 16;

export const estimateTokens = (text) => Math.ceil(new TextEncoder().encode(text).length / 3) + MESSAGE_OVERHEAD;
export const messageTokens = (message) => message.tokens ?? estimateTokens(message.content);

// The longest prompt a request may have and still leave its answer room to grow.
export function promptBudget(limits, maxTokens) {
  const answerRoom = Math.min(maxTokens, Math.floor(limits.context_length / 2));
  return Math.min(limits.max_prompt_tokens, limits.context_length - answerRoom) - MARGIN;
}

// The messages (user and assistant turns, the new user message last) that fit: {send, dropped}.
// `kept`: how many the chat's last request left out. The window's start moves only when it must,
// and then far enough (to REFILL of the budget) that the next few requests start alike and the
// node reuses what it has read of them, instead of reading the whole prompt again every time.
// Whole turns go, oldest first: a user message and the answers after it.
const REFILL = 0.75;

export function fitToContext({ system, messages, limits, maxTokens, base, kept = 0 }) {
  if (!limits) return { send: messages, dropped: 0 };
  const budget = promptBudget(limits, maxTokens);
  let start = Math.max(0, Math.min(kept, messages.length - 1));
  while (start > 0 && messages[start].role !== "user") start -= 1;
  let total = (base ?? UNKNOWN_BASE) + (system ? estimateTokens(system) : 0);
  for (const message of messages.slice(start)) total += messageTokens(message);
  if (total > budget) {
    const target = Math.floor(budget * REFILL);
    while (total > target && start < messages.length - 1) {
      do {
        total -= messageTokens(messages[start]);
        start += 1;
      } while (start < messages.length - 1 && messages[start].role !== "user");
    }
  }
  return { send: messages.slice(start), dropped: start };
}

// After an answer: the prompt's measured size splits into the template's own tokens (base, kept
// on the chat) and the new message's share, so the next estimate starts from the node's counts.
export function learnFromUsage({ chat, system, sent, promptTokens }) {
  const others = sent.slice(0, -1).reduce((sum, m) => sum + messageTokens(m), 0);
  const systemTokens = system ? estimateTokens(system) : 0;
  const last = sent[sent.length - 1];
  if (chat.base === undefined) {
    chat.base = Math.max(0, promptTokens - systemTokens - others - messageTokens(last));
  } else {
    last.tokens = Math.max(1, promptTokens - chat.base - systemTokens - others);
  }
}
