/*
 * Assistant replies in a room, growing live. Companion of chat.js: listens to its events on
 * #chat-room and sends through window.chatClient.sendFrame. Frames: docs/protocol.md
 * ("Assistant").
 *
 *   assistant.start  a reply began, or (to a socket that joined mid-reply) the text so far
 *                    with next_index, the index of the next delta to apply
 *   assistant.delta  {index, content}: applied in index order; an index already applied is a
 *                    duplicate (it was in the text so far) and is dropped
 *   message          the stored reply (client_id = stream_id) replaces the live bubble
 *   assistant.end    status done / stopped / error / interrupted (the server restarted mid-reply;
 *                    the partial text is stored); a reply that stored nothing shows its error
 *
 * The requester and staff get a Stop button (sends assistant.stop). Text is rendered by
 * render.js (text nodes in elements it creates), never as HTML.
 *
 * Debug hook (read-only, for tests and the console): window.roomAssistant.live (ids of
 * replies growing on screen).
 */
(function () {
  "use strict";

  const STATUS_LABELS = {
    stopped: "stopped",
    error: "failed",
    interrupted: "interrupted: the server restarted",
  };

  const root = document.getElementById("chat-room");
  if (!root) return;
  const me = String(root.dataset.userId);
  const myName = root.dataset.username || "";
  const isStaff = root.dataset.isStaff === "true";
  const list = root.querySelector("[data-testid=messages]");
  const streams = new Map(); // stream_id -> {li, textEl, text, next, ended}
  let sessions = 0;

  root.addEventListener("chat:frame", (event) => onFrame(event.detail));
  root.addEventListener("chat:message", (event) => onMessage(event.detail));
  root.addEventListener("chat:state", (event) => onState(event.detail.state));
  window.roomAssistant = Object.freeze({
    get live() {
      return [...streams.keys()];
    },
  });

  function onFrame(frame) {
    if (frame.type === "assistant.start") onStart(frame);
    else if (frame.type === "assistant.delta") onDelta(frame);
    else if (frame.type === "assistant.end") onEnd(frame);
  }

  // A new socket hears about running replies again (with their text so far); bubbles of
  // replies that ended while we were away are dropped (their stored message is replayed).
  function onState(state) {
    if (state !== "connected") return;
    sessions += 1;
    if (sessions === 1) return;
    for (const id of [...streams.keys()]) removeBubble(id);
  }

  function onStart(frame) {
    let s = streams.get(frame.stream_id);
    if (!s) {
      s = createBubble(frame);
      streams.set(frame.stream_id, s);
    }
    // A snapshot taken after deltas we already applied carries more text: take it.
    if (frame.next_index >= s.next) {
      s.text = frame.text || "";
      s.next = frame.next_index;
      showText(s);
    }
  }

  // Rendered like stored messages (render.js: never as HTML), so nothing jumps on the swap.
  function showText(s) {
    if (window.chatRender) s.textEl.replaceChildren(window.chatRender.renderText(s.text, myName));
    else s.textEl.textContent = s.text;
  }

  function onDelta(frame) {
    const s = streams.get(frame.stream_id);
    // Unknown stream: a snapshot with this text is on its way (we joined mid-reply).
    if (!s || frame.index < s.next) return;
    // A gap (a lost broadcast) is healed by the stored message that replaces the bubble.
    const stick = isScrolledToBottom();
    s.text += frame.content;
    s.next = frame.index + 1;
    showText(s);
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function onEnd(frame) {
    const s = streams.get(frame.stream_id);
    if (!s) return;
    s.ended = true;
    s.li.classList.remove("streaming");
    const stop = s.li.querySelector("button.stop");
    if (stop) stop.remove();
    if (frame.seq === null || frame.seq === undefined) {
      // Nothing was stored: this bubble is all members will see of it until they reload.
      s.li.dataset.status = frame.status;
      const reason = frame.error ? frame.error.message : "";
      setStatus(s.li, STATUS_LABELS[frame.status] || frame.status, reason);
      if (reason && !s.text) s.textEl.textContent = reason;
      delete s.li.dataset.clientId; // not waiting for a stored message any more
      streams.delete(frame.stream_id);
    } else {
      const stored = list.querySelector(`li[data-seq="${frame.seq}"]`);
      if (stored) {
        removeBubble(frame.stream_id); // the stored message is on screen already
        if (frame.error) setStatus(stored, STATUS_LABELS.error, frame.error.message);
      }
    }
  }

  // Every rendered message: the stored reply replaces its bubble; stopped/failed get a label.
  function onMessage(detail) {
    if (detail.client_id && streams.has(detail.client_id)) removeBubble(detail.client_id);
    // A stored reply of the demo backend keeps the bubble's "demo" mark (after reloads too).
    if (detail.demo) {
      const li = list.querySelector(`li[data-seq="${detail.seq}"]`);
      if (li && !li.querySelector(".meta .demo")) li.querySelector(".author").after(demoTag());
    }
    if (detail.status) {
      const li = list.querySelector(`li[data-seq="${detail.seq}"]`);
      if (li && !li.dataset.status) {
        li.dataset.status = detail.status;
        li.classList.add("assistant");
        setStatus(li, STATUS_LABELS[detail.status] || detail.status);
      }
    }
  }

  function createBubble(frame) {
    const li = document.createElement("li");
    li.classList.add("assistant", "streaming");
    li.dataset.streamId = frame.stream_id;
    // Unconfirmed, like a message being sent: chat.js keeps such items at the bottom.
    li.dataset.clientId = frame.stream_id;
    li.dataset.testid = "assistant-live";
    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.className = "author";
    who.textContent = (frame.user && frame.user.username) || "assistant";
    meta.append(who);
    if (frame.demo) meta.append(demoTag());
    const asker = frame.requested_by;
    if (asker) {
      const note = document.createElement("span");
      note.className = "status";
      note.textContent = `answering ${asker.username}…`;
      meta.append(note);
    }
    if ((asker && String(asker.id) === me) || isStaff) meta.append(stopButton(frame.stream_id));
    const body = document.createElement("div");
    body.className = "text";
    li.append(meta, body);
    const stick = isScrolledToBottom();
    list.append(li);
    if (stick) list.scrollTop = list.scrollHeight;
    return { li, textEl: body, text: "", next: 0, ended: false };
  }

  function demoTag() {
    const tag = document.createElement("span");
    tag.className = "tag demo";
    tag.dataset.testid = "demo-label";
    tag.textContent = "demo";
    tag.title = "No model is configured: this is the offline demo backend.";
    return tag;
  }

  function stopButton(streamId) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "stop";
    button.dataset.testid = "assistant-stop";
    button.textContent = "Stop";
    button.addEventListener("click", () => {
      const client = window.chatClient;
      if (client && client.sendFrame({ type: "assistant.stop", stream_id: streamId })) {
        button.disabled = true;
        button.textContent = "Stopping…";
      }
    });
    return button;
  }

  function removeBubble(streamId) {
    const s = streams.get(streamId);
    if (s) s.li.remove();
    streams.delete(streamId);
  }

  function setStatus(li, label, title) {
    let status = li.querySelector(".meta .reply-status");
    if (!status) {
      status = document.createElement("span");
      status.className = "status reply-status";
      li.querySelector(".meta").append(status);
    }
    status.textContent = label;
    if (title) status.title = title;
  }

  function isScrolledToBottom() {
    return list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  }
})();
