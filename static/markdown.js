// Model output is untrusted. An answer's Markdown becomes HTML with marked (CommonMark and GitHub's
// tables), and that HTML goes through DOMPurify before any of it reaches the DOM; the page's CSP
// refuses inline script and other origins besides. Raw HTML in an answer is shown as text, images
// become links (nothing is loaded from a URL the model wrote), and links may only be http(s) or
// mailto. Code blocks are highlighted by highlight.js and get a Copy button, made here as DOM
// nodes, never from the answer's HTML.
import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";
import hljs from "./vendor/highlight.min.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
const SAFE_LINK = /^(https?:|mailto:)/i;

const marked = new Marked({
  gfm: true,
  breaks: true, // a model's single line breaks are meant as breaks, as in other chat pages
  renderer: {
    html: ({ text }) => escapeHtml(text),
    image: ({ href, text }) =>
      SAFE_LINK.test(href ?? "") ? `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>` : escapeHtml(text),
    code: ({ text, lang }) => {
      const language = (lang ?? "").trim().split(/\s+/)[0].toLowerCase();
      const known = language && hljs.getLanguage(language);
      const body = known ? hljs.highlight(text, { language, ignoreIllegals: true }).value : escapeHtml(text);
      const label = known ? known.name ?? language : language;
      return `<pre data-language="${escapeHtml(label)}"><code class="hljs">${body}</code></pre>\n`;
    },
  },
});

const PURIFY = {
  USE_PROFILES: { html: true }, // no SVG or MathML
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "img", "picture", "video", "audio", "source", "iframe", "object", "embed"],
  FORBID_ATTR: ["style", "id", "name", "srcset"],
  ALLOW_DATA_ATTR: false,
  ADD_ATTR: ["data-language"],
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeName !== "A") return;
  const href = node.getAttribute("href") ?? "";
  if (!SAFE_LINK.test(href)) {
    node.removeAttribute("href");
    return;
  }
  node.setAttribute("target", "_blank");
  node.setAttribute("rel", "noopener noreferrer nofollow");
});

// Markdown `text` as a sanitized DocumentFragment, its code blocks with a Copy button each.
export function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(marked.parse(text), PURIFY);
  for (const pre of fragment.querySelectorAll("pre")) decorateCode(pre);
  return fragment;
}

function decorateCode(pre) {
  const figure = document.createElement("div");
  figure.className = "code-block";
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.textContent = pre.dataset.language || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", `Copy ${label.textContent}`);
  bar.append(label, copy);
  pre.replaceWith(figure);
  figure.append(bar, pre);
}

// Put `text` on the clipboard. navigator.clipboard exists only in a secure context (https or
// localhost); a node reached over plain http falls back to the older copy command.
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const scratch = document.createElement("textarea");
  scratch.value = text;
  scratch.setAttribute("readonly", "");
  scratch.className = "clipboard-scratch";
  const focused = document.activeElement; // selecting the text moves focus: it comes back
  document.body.append(scratch);
  scratch.select();
  const done = document.execCommand("copy");
  scratch.remove();
  focused?.focus();
  if (!done) throw new Error("copy refused");
}
