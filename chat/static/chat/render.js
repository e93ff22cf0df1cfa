/*
 * Message text to DOM nodes, for chat.js (and anything else that shows a message).
 *
 * The text is plain text from the server; it is never parsed as HTML. Every piece of it
 * becomes a text node (textContent) inside elements this file creates, so no user text can
 * add markup, attributes or scripts. What it recognises, in this order of precedence:
 *   ```fenced blocks```          <pre><code> (text inside is left as it is)
 *   `inline code`                <code>
 *   http(s)://… and mailto:…     <a href target=_blank rel="noopener noreferrer">; nothing
 *                                else becomes a link (javascript:, data:, … stay text)
 *   **bold**, _italic_           <strong>, <em> (not across lines, not inside words for _)
 *   @name                        <span class="mention">, with "me" when it names the reader
 * Newlines are kept (the message element has white-space: pre-wrap).
 *
 * window.chatRender.renderText(text, me) returns a DocumentFragment;
 * window.chatRender.linkHref(candidate) returns the safe href or null (used by tests).
 */
(function () {
  "use strict";

  // A URL runs to the next whitespace; trailing punctuation belongs to the sentence.
  const URL_RE = /(?:https?:\/\/|mailto:)[^\s<>"]+/gi;
  const TRAILING_PUNCT = /[.,;:!?)\]}'"]+$/;
  // Same rule as notifications/mentions.py: "@" not after a word character (e-mails).
  const MENTION_RE = /(^|[^\w@.+-])@([\w.@+-]{1,150})/g;
  const INLINE_RE = /\*\*([^*\n]+?)\*\*|(^|[^\w])_([^_\n]+?)_(?![\w])/g;

  function linkHref(candidate) {
    let url;
    try {
      url = new URL(candidate);
    } catch (err) {
      return null;
    }
    return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
  }

  function renderText(text, me) {
    const frag = document.createDocumentFragment();
    const parts = String(text).split(/```/);
    // An odd count of fences: the last one is unclosed, so it stays literal text.
    const closed = parts.length % 2 === 1 ? parts.length : parts.length - 1;
    parts.forEach((part, i) => {
      if (i % 2 === 1 && i < closed) {
        frag.append(codeBlock(part));
      } else {
        const literal = i % 2 === 1 ? "```" + part : part;
        appendInlineCode(frag, literal, me);
      }
    });
    return frag;
  }

  function codeBlock(part) {
    // ```lang\n…``` : a first line without spaces is a language hint, not code.
    const body = part.replace(/^[\w+-]*\n/, "").replace(/\n$/, "");
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    code.textContent = body;
    pre.append(code);
    return pre;
  }

  function appendInlineCode(parent, text, me) {
    const re = /`([^`\n]+)`/g;
    let last = 0;
    for (const m of text.matchAll(re)) {
      appendLinks(parent, text.slice(last, m.index), me);
      const code = document.createElement("code");
      code.textContent = m[1];
      parent.append(code);
      last = m.index + m[0].length;
    }
    appendLinks(parent, text.slice(last), me);
  }

  function appendLinks(parent, text, me) {
    let last = 0;
    for (const m of text.matchAll(URL_RE)) {
      const raw = m[0].replace(TRAILING_PUNCT, "");
      const href = linkHref(raw);
      if (!href) continue;
      appendEmphasis(parent, text.slice(last, m.index), me);
      const a = document.createElement("a");
      a.href = href;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      a.textContent = raw;
      parent.append(a);
      last = m.index + raw.length;
    }
    appendEmphasis(parent, text.slice(last), me);
  }

  function appendEmphasis(parent, text, me) {
    let last = 0;
    for (const m of text.matchAll(INLINE_RE)) {
      if (m[1] !== undefined) {
        appendMentions(parent, text.slice(last, m.index), me);
        const strong = document.createElement("strong");
        appendMentions(strong, m[1], me);
        parent.append(strong);
      } else {
        const start = m.index + m[2].length;
        appendMentions(parent, text.slice(last, start), me);
        const em = document.createElement("em");
        appendMentions(em, m[3], me);
        parent.append(em);
      }
      last = m.index + m[0].length;
    }
    appendMentions(parent, text.slice(last), me);
  }

  function appendMentions(parent, text, me) {
    let last = 0;
    for (const m of text.matchAll(MENTION_RE)) {
      const at = m.index + m[1].length;
      const name = m[2].replace(/[.\-@+]+$/, "");
      if (!name) continue;
      parent.append(text.slice(last, at));
      const span = document.createElement("span");
      span.className = name === me ? "mention me" : "mention";
      span.textContent = `@${name}`;
      parent.append(span);
      last = at + 1 + name.length;
    }
    parent.append(text.slice(last));
  }

  window.chatRender = Object.freeze({ renderText, linkHref });
})();
