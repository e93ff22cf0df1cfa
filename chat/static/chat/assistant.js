/*
 * "Ask the assistant" panel. Vanilla JS, no build step, no dependencies.
 *
 * Sends the conversation to POST <data-stream-url> (chat/assistant/views.py) with fetch and
 * reads the Server-Sent Events body through a ReadableStream reader:
 *   data: {"content": "<delta>"}   a piece of the reply (rendered as text, never HTML)
 *   data: [DONE]                   the reply is complete
 *   event: error + data: {"code", "message"}   the reply failed; code "interrupted": the
 *                                              server restarted mid-reply (shown as such)
 * Network chunks do not follow event boundaries: an event can be split across chunks, and one
 * chunk can hold several events, so partial lines wait in a buffer until their blank line.
 *
 * Stop aborts the fetch (AbortController): the server sees the connection close and closes
 * its upstream stream, so the model stops generating.
 *
 * Debug hook (read-only, for tests and the console): window.assistantPanel with state,
 * turns (messages in the conversation), lastReply and sseParser (the incremental parser).
 */
(function () {
  "use strict";

  const STATE_LABELS = {
    idle: "idle",
    streaming: "answering…",
    done: "done",
    stopped: "stopped",
    interrupted: "interrupted",
    error: "failed",
  };
  // How a reply that did not complete is marked in the conversation.
  const OUTCOME_LABELS = {
    stopped: "stopped",
    interrupted: "interrupted: the server restarted",
    error: "failed",
  };

  const root = document.getElementById("assistant-panel");
  if (!root) return;

  const els = {
    state: root.querySelector("[data-testid=assistant-state]"),
    error: root.querySelector("[data-testid=assistant-error]"),
    log: root.querySelector("[data-testid=assistant-log]"),
    form: root.querySelector("[data-testid=assistant-form]"),
    input: root.querySelector("[data-testid=assistant-input]"),
    send: root.querySelector("[data-testid=assistant-send]"),
    stop: root.querySelector("[data-testid=assistant-stop]"),
  };
  const config = {
    url: root.dataset.streamUrl,
    maxMessages: Number(root.dataset.maxMessages) || 50,
  };

  const turns = []; // {role, content}: what is sent with the next question
  let controller = null; // AbortController of the reply in progress
  let state = "idle";
  let lastReply = "";

  els.form.addEventListener("submit", onSubmit);
  els.stop.addEventListener("click", stop);
  window.assistantPanel = Object.freeze({
    get state() {
      return state;
    },
    get turns() {
      return turns.length;
    },
    get lastReply() {
      return lastReply;
    },
    sseParser, // exposed so tests can feed it chunks split at awkward places
  });

  function onSubmit(ev) {
    ev.preventDefault();
    const question = els.input.value;
    if (!question.trim() || controller) return;
    els.input.value = "";
    turns.push({ role: "user", content: question });
    addEntry("you", question);
    ask();
  }

  async function ask() {
    const entry = addEntry("assistant", "");
    entry.classList.add("assistant", "streaming");
    const textEl = entry.querySelector(".text");
    controller = new AbortController();
    lastReply = "";
    hideError();
    setBusy(true);
    setState("streaming");
    let outcome = "error";
    let failure = null;
    try {
      const response = await fetch(config.url, {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          Accept: "text/event-stream",
          "X-CSRFToken": csrfToken(),
        },
        body: JSON.stringify({ messages: turns.slice(-config.maxMessages) }),
        signal: controller.signal,
        credentials: "same-origin",
      });
      if (!response.ok) {
        failure = await errorOf(response);
      } else {
        const end = await readEvents(response.body, (delta) => {
          lastReply += delta;
          textEl.textContent = lastReply;
        });
        if (end.done) outcome = "done";
        else failure = end.error || { message: "The reply ended early. Ask again." };
        // A restart (the server's drain) ends the stream on purpose: not a failure of the model.
        if (failure && failure.code === "interrupted") outcome = "interrupted";
      }
    } catch (err) {
      if (err && err.name === "AbortError") outcome = "stopped";
      else failure = { message: "The connection failed. Ask again." };
    }
    controller = null;
    entry.classList.remove("streaming");
    entry.dataset.status = outcome;
    if (outcome !== "done") setStatus(entry, OUTCOME_LABELS[outcome]);
    // A partial reply stays in the conversation, so the next question has the same context.
    if (lastReply) turns.push({ role: "assistant", content: lastReply });
    if (failure) showError(failure.message || "The assistant failed.");
    setBusy(false);
    setState(outcome);
  }

  function stop() {
    if (controller) controller.abort();
  }

  // Read an SSE body; call onDelta per content delta. Resolves {done} or {error}.
  async function readEvents(body, onDelta) {
    const reader = body.getReader();
    const decoder = new TextDecoder(); // stream mode keeps split UTF-8 sequences whole
    const parser = sseParser();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        const text = done ? decoder.decode() : decoder.decode(value, { stream: true });
        for (const event of parser.push(text, done)) {
          if (event.event === "error") return { error: parseJson(event.data) || {} };
          if (event.data === "[DONE]") return { done: true };
          const data = parseJson(event.data);
          if (data && typeof data.content === "string") onDelta(data.content);
        }
        if (done) return { done: false };
      }
    } finally {
      reader.releaseLock();
    }
  }

  // Incremental SSE parser: push text as it arrives, get back the events it completed.
  function sseParser() {
    let buffer = "";
    return {
      push(text, final) {
        buffer += text;
        // Line ends may be \r\n, \r or \n; a \r at the very end may be half of a \r\n.
        const keepCr = !final && buffer.endsWith("\r");
        if (keepCr) buffer = buffer.slice(0, -1);
        buffer = buffer.replace(/\r\n?/g, "\n");
        const events = [];
        let boundary;
        while ((boundary = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, boundary);
          buffer = buffer.slice(boundary + 2);
          const event = parseBlock(block);
          if (event) events.push(event);
        }
        if (keepCr) buffer += "\r";
        return events;
      },
    };
  }

  function parseBlock(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue; // comment (keepalive)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { event, data: data.join("\n") } : null;
  }

  async function errorOf(response) {
    try {
      const body = await response.json();
      if (body && body.error) return body.error;
    } catch (err) {
      // Not JSON (e.g. a CSRF failure page).
    }
    if (response.status === 403) return { message: "Your session expired. Reload the page." };
    return { message: `The server answered ${response.status}.` };
  }

  function parseJson(text) {
    try {
      return JSON.parse(text);
    } catch (err) {
      return null;
    }
  }

  function csrfToken() {
    const input = els.form.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  // ------------------------------------------------------------------ rendering

  function addEntry(author, text) {
    const li = document.createElement("li");
    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.className = "author";
    who.textContent = author;
    meta.append(who);
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    li.append(meta, body);
    els.log.append(li);
    els.log.scrollTop = els.log.scrollHeight;
    return li;
  }

  function setStatus(li, text) {
    const status = document.createElement("span");
    status.className = "status";
    status.textContent = text;
    li.querySelector(".meta").append(status);
  }

  function setBusy(busy) {
    els.send.disabled = busy;
    els.stop.hidden = !busy;
  }

  function setState(next) {
    state = next;
    els.state.dataset.state = next;
    els.state.textContent = STATE_LABELS[next];
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }

  function hideError() {
    els.error.hidden = true;
    els.error.textContent = "";
  }
})();
