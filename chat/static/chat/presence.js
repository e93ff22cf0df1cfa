/*
 * Room presence UI: who is here, who is typing, who has seen the latest message.
 * Companion of chat.js: listens to its events on #chat-room and sends through
 * window.chatClient.sendFrame. Frames: docs/protocol.md ("Presence, typing, read markers").
 *
 * Timing (milliseconds), chosen to match the server's throttles:
 *   TYPING_REFRESH_MS  while typing, repeat "active: true" this often (server relays at most
 *                      one per 2 s per user)
 *   TYPING_IDLE_MS     no keystroke for this long: send "active: false"
 *   TYPING_EXPIRE_MS   hide someone's indicator if no refresh came for this long (their
 *                      "false" may be lost with a dropped connection)
 *   READ_DEBOUNCE_MS   wait this long after the last rendered message before sending "read"
 */
(function () {
  "use strict";

  const TYPING_REFRESH_MS = 2000;
  const TYPING_IDLE_MS = 3000;
  const TYPING_EXPIRE_MS = 6000;
  const READ_DEBOUNCE_MS = 300;

  const root = document.getElementById("chat-room");
  if (!root) return;
  const me = String(root.dataset.userId);
  const els = {
    members: root.querySelector("[data-testid=members]"),
    typing: root.querySelector("[data-testid=typing]"),
    seen: root.querySelector("[data-testid=seen-by]"),
    input: root.querySelector("[data-testid=text]"),
    form: root.querySelector("[data-testid=composer]"),
    toggle: root.querySelector("[data-testid=members-toggle]"),
  };

  const online = new Map(); // user id -> {username, connections}
  let stateContinues = false; // inside a presence_state sent in parts
  const known = new Map(); // user id -> username: everyone seen here, online or not
  const typists = new Map(); // user id -> {username, timer}
  const reads = new Map(); // user id -> {username, seq}
  let lastSeq = 0;
  let lastReadSent = 0;
  let connected = false;
  let typingSentAt = 0;
  let typingActive = false;
  const timers = {};

  root.addEventListener("chat:frame", (event) => onFrame(event.detail));
  root.addEventListener("chat:message", (event) => onMessage(event.detail));
  root.addEventListener("chat:state", (event) => onState(event.detail.state));
  els.input.addEventListener("input", onInput);
  els.form.addEventListener("submit", () => stopTyping());
  els.input.addEventListener("blur", () => stopTyping());
  document.addEventListener("visibilitychange", scheduleRead);
  window.addEventListener("focus", scheduleRead);
  // On a phone the members panel opens over the messages; Escape (or the button) closes it.
  if (els.toggle) els.toggle.addEventListener("click", () => showMembers(!membersOpen()));
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && membersOpen()) {
      showMembers(false);
      els.toggle.focus();
    }
  });

  function membersOpen() {
    return root.classList.contains("members-open");
  }

  function showMembers(open) {
    root.classList.toggle("members-open", open);
    if (els.toggle) els.toggle.setAttribute("aria-expanded", String(open));
  }

  function send(frame) {
    return Boolean(window.chatClient && window.chatClient.sendFrame(frame));
  }

  // ------------------------------------------------------------------ frames

  function onFrame(frame) {
    switch (frame.type) {
      case "presence_state":
        // A large room's state comes in parts: the first replaces, the rest ("more") append.
        if (!stateContinues) online.clear();
        stateContinues = frame.more === true;
        for (const user of frame.users) setOnline(user, user.connections);
        return renderMembers();
      case "presence_diff":
        for (const user of frame.joins) setOnline(user, 1);
        for (const user of frame.leaves) {
          online.delete(String(user.id));
          clearTypist(String(user.id));
        }
        return renderMembers();
      case "typing":
        return onTyping(frame);
      case "read_state":
        for (const read of frame.reads) setRead(read.user, read.seq);
        renderMembers();
        return renderSeen();
      case "read":
        setRead(frame.user, frame.seq);
        return renderSeen();
      default:
        return undefined;
    }
  }

  function setOnline(user, connections) {
    const id = String(user.id);
    known.set(id, user.username);
    const current = online.get(id);
    online.set(id, { username: user.username, connections: current ? current.connections : connections });
  }

  function setRead(user, seq) {
    const id = String(user.id);
    known.set(id, user.username);
    const current = reads.get(id);
    // Markers only move forward; relays can arrive out of order across processes.
    if (!current || seq > current.seq) reads.set(id, { username: user.username, seq });
  }

  function onTyping(frame) {
    const id = String(frame.user.id);
    if (id === me) return;
    if (!frame.active) return clearTypist(id);
    const entry = typists.get(id);
    if (entry) clearTimeout(entry.timer);
    typists.set(id, {
      username: frame.user.username,
      timer: setTimeout(() => clearTypist(id), TYPING_EXPIRE_MS),
    });
    renderTyping();
  }

  function clearTypist(id) {
    const entry = typists.get(id);
    if (!entry) return;
    clearTimeout(entry.timer);
    typists.delete(id);
    renderTyping();
  }

  function onMessage(detail) {
    if (detail.older) return; // a page of old history says nothing about now
    lastSeq = Math.max(lastSeq, detail.seq);
    // Someone who just sent a message has stopped typing it.
    if (detail.user) clearTypist(String(detail.user.id));
    renderSeen();
    scheduleRead();
  }

  function onState(state) {
    const wasConnected = connected;
    connected = state === "connected";
    root.classList.toggle("presence-stale", !connected);
    if (!connected && wasConnected) {
      // Whatever we knew may be out of date; the next presence_state replaces it.
      for (const id of [...typists.keys()]) clearTypist(id);
      typingActive = false;
    }
    if (connected) scheduleRead();
  }

  // ------------------------------------------------------------------ sending

  function onInput() {
    if (!els.input.value.trim()) return stopTyping();
    const now = Date.now();
    if (!typingActive || now - typingSentAt >= TYPING_REFRESH_MS) {
      if (send({ type: "typing", active: true })) {
        typingActive = true;
        typingSentAt = now;
      }
    }
    clearTimeout(timers.idle);
    timers.idle = setTimeout(stopTyping, TYPING_IDLE_MS);
  }

  function stopTyping() {
    clearTimeout(timers.idle);
    if (!typingActive) return;
    typingActive = false;
    send({ type: "typing", active: false });
  }

  // Only a page someone can see has read anything.
  function scheduleRead() {
    clearTimeout(timers.read);
    timers.read = setTimeout(() => {
      if (document.visibilityState !== "visible" || lastSeq <= lastReadSent) return;
      if (send({ type: "read", seq: lastSeq })) lastReadSent = lastSeq;
    }, READ_DEBOUNCE_MS);
  }

  // ------------------------------------------------------------------ rendering

  function byName(a, b) {
    return a[1].localeCompare(b[1]);
  }

  function renderMembers() {
    if (!els.members) return;
    const rows = [...known.entries()].sort(byName);
    els.members.replaceChildren(
      ...rows.map(([id, username]) => {
        const li = document.createElement("li");
        const presence = online.get(id);
        li.dataset.userId = id;
        li.dataset.online = presence ? "true" : "false";
        li.className = presence ? "online" : "offline";
        const name = document.createElement("span");
        name.className = "name";
        name.textContent = username + (id === me ? " (you)" : "");
        li.append(name);
        const status = document.createElement("span");
        status.className = "status";
        status.textContent = presence ? "online" : "offline";
        li.append(status);
        return li;
      }),
    );
  }

  function renderTyping() {
    if (!els.typing) return;
    const names = [...typists.values()].map((t) => t.username).sort();
    els.typing.hidden = names.length === 0;
    if (names.length === 0) els.typing.textContent = "";
    else if (names.length === 1) els.typing.textContent = `${names[0]} is typing…`;
    else if (names.length <= 3) els.typing.textContent = `${names.join(", ")} are typing…`;
    else els.typing.textContent = "Several people are typing…";
  }

  function renderSeen() {
    if (!els.seen) return;
    const names = [...reads.entries()]
      .filter(([id, read]) => id !== me && lastSeq > 0 && read.seq >= lastSeq)
      .map(([, read]) => read.username)
      .sort();
    els.seen.hidden = names.length === 0;
    els.seen.textContent = names.length ? `Seen by ${names.join(", ")}` : "";
  }

  window.chatPresence = Object.freeze({
    get online() {
      return [...online.values()].map((u) => u.username).sort();
    },
    get typing() {
      return [...typists.values()].map((t) => t.username).sort();
    },
  });
})();
