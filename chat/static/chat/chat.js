/*
 * Chat room client. Vanilla JS, no build step, no dependencies.
 *
 * Wire protocol: docs/protocol.md (server: chat/protocol.py, chat/consumers.py).
 *
 * What it guarantees on screen:
 *  - every stored message is shown once, in seq order, across reconnects: it resumes with
 *    ?after=<lastSeq>, drops seq <= lastSeq, and on a gap asks for a replay instead of
 *    rendering out of order;
 *  - nothing typed is lost: each message sits in an outbox (localStorage, per room and user)
 *    until the server acks it, and is resent after every reconnect with the same client_id,
 *    which the server stores only once;
 *  - edits and deletes (message_update) show live and after reconnects: it resumes with
 *    &after_update=<lastUpdateSeq>, and applies a change only when its update_seq is above the
 *    one the message shows (a message sent after a change already shows it).
 *
 * Knobs, in milliseconds unless noted. Each comes from, in increasing priority: the defaults
 * below, a data attribute on #chat-room (data-ping-interval-ms="5000"), and window.CHAT_CONFIG
 * set before this script runs (e.g. by a test: window.CHAT_CONFIG = {pingIntervalMs: 1000}).
 *   pingIntervalMs    25000  send a ping this often
 *   pongTimeoutMs     10000  no frame at all within this after a ping: the socket is dead
 *   backoffBaseMs       500  reconnect delay ceiling for the first retry (doubles per retry;
 *                            the delay is uniform in [0, ceiling): "full jitter")
 *   backoffCapMs      15000  largest reconnect delay ceiling
 *   connectTimeoutMs  10000  a socket must open and send hello within this
 *   retryMs            3000  resend delay (±50 %) after rate_limited / unavailable
 *   historyLimit         50  messages reloaded after the server's database was reset
 *
 * Debug hook (read-only, for tests and the console): window.chatClient with state, lastSeq,
 * outboxLength, sessions (hellos received), config, reconnectNow() and sendFrame(frame).
 *
 * Rendering: message text is plain text; render.js (loaded first) turns it into elements
 * (links, code, bold, italic, mentions) without ever parsing it as HTML. Messages of one
 * author within 5 minutes are grouped, each day gets a separator, times are relative with the
 * absolute time in their title, and seq 1 (or an empty room) gets a "start of the room"
 * marker. Scrolled up, a "new messages" pill counts what arrived below and a button jumps to
 * the newest. Only new live messages from others are announced to screen readers (a hidden
 * aria-live region); history and older pages are not.
 *
 * Events on #chat-room for companion scripts (presence.js): "chat:state" {state},
 * "chat:message" {seq, user, client_id, status, demo, older} after a message is rendered (older:
 * true for pages of older history), "chat:update" {seq, deleted} after a change is shown,
 * and "chat:frame" (the frame) for
 * frame types this file does not handle (presence, typing, read markers).
 */
(function () {
  "use strict";

  const DEFAULTS = Object.freeze({
    pingIntervalMs: 25000,
    pongTimeoutMs: 10000,
    backoffBaseMs: 500,
    backoffCapMs: 15000,
    connectTimeoutMs: 10000,
    retryMs: 3000,
    historyLimit: 50,
  });

  // Close codes after which reconnecting cannot help (chat/protocol.py CLOSE_*).
  const FATAL_CLOSES = {
    4401: "You are not logged in any more. Log in again, then reload this page.",
    4403: "You are not allowed in this room.",
    4404: "This room does not exist.",
    4429: "Too many chat tabs are open for your account. Close some, then reload this page.",
  };
  // 1012 "service restart": the server is draining for a deploy (docs/protocol.md). Reconnect
  // as after any transient close, with a notice that says why.
  const CLOSE_SERVICE_RESTART = 1012;
  const RESTART_NOTICE = "The server is restarting. Reconnecting; what you write is kept and sent then.";
  // Errors for one message that the same frame will hit again later: keep it and retry.
  const RETRYABLE_ERRORS = new Set(["rate_limited", "unavailable"]);
  const STATE_LABELS = {
    connecting: "connecting…",
    connected: "connected",
    reconnecting: "reconnecting…",
    offline: "offline",
  };
  const STATUS_LABELS = {
    queued: "waiting for connection",
    sending: "sending…",
    sent: "sent",
    retrying: "retrying…",
    failed: "not sent",
  };
  // How long a "delete" button waits for its confirming second click.
  const CONFIRM_DELETE_MS = 4000;
  const DELETED_TEXT = "message deleted";
  // Messages of one author closer than this are shown as one group (one name, one time).
  const GROUP_WINDOW_MS = 5 * 60 * 1000;
  // Relative times ("3 min ago") are refreshed this often.
  const CLOCK_TICK_MS = 30000;
  // Live messages kept in the screen reader announcer (older ones were read out already).
  const MAX_ANNOUNCED = 5;
  // Frames held back behind a gap; past this many, drop them (the replay brings them again).
  const MAX_HELD_FRAMES = 1000;
  // A visible page whose timers stalled this long was asleep (laptop lid, frozen tab).
  const SLEEP_CHECK_MS = 5000;
  const SLEEP_GAP_MS = 30000;
  const OPEN = 1; // WebSocket.OPEN

  const root = document.getElementById("chat-room");
  if (!root) return;

  const config = readConfig(root);
  const els = {
    state: root.querySelector("[data-testid=conn-state]"),
    notice: root.querySelector("[data-testid=notice]"),
    list: root.querySelector("[data-testid=messages]"),
    form: root.querySelector("[data-testid=composer]"),
    input: root.querySelector("[data-testid=text]"),
    send: root.querySelector("[data-testid=send]"),
    announcer: root.querySelector("[data-testid=announcer]"),
    newPill: root.querySelector("[data-testid=new-messages]"),
    jump: root.querySelector("[data-testid=jump-bottom]"),
  };
  // The raw text of each message element (what the editor starts from); the element shows
  // it rendered (render.js).
  const rawTexts = new WeakMap();
  let unseen = 0; // live messages that arrived below the view while the reader was scrolled up
  const store = outboxStore(`chat:outbox:${config.room}:${config.userId}`);

  // --- connection state ---
  let ws = null; // the current socket; events of abandoned sockets are ignored
  let session = false; // hello received on the current socket
  let fatal = false; // the server said not to come back
  let everConnected = false;
  let attempt = 0; // reconnects since the last hello: drives the backoff
  let lastCloseNotice = null; // why the last session ended, until the next one starts
  let sessions = 0;
  let state = "connecting";
  let lastFrameAt = 0;
  let pongQueue = []; // what each outstanding ping was for: "keepalive" or "barrier"
  const timers = {};

  // --- ordering state ---
  let lastSeq = 0; // highest seq rendered
  // Every change (edit, delete) up to this update_seq is shown: resumes ask for later ones.
  let lastUpdateSeq = 0;
  let synced = false; // lastSeq can be sent as ?after= (false until history has started)
  let baseline = false; // the next message frame opens the history window of a fresh session
  let historyUpTo = null; // the first hello's last_seq: messages up to it are not news
  const held = new Map(); // seq -> frame that arrived ahead of a gap
  let resumeInFlight = false;
  let resumeFailed = false;

  // --- outbox: client_id -> {client_id, text, created_at}, in typing order ---
  const outbox = new Map();
  const inflight = new Set(); // client_ids sent on the current socket, awaiting an answer

  init();

  // ------------------------------------------------------------------ setup

  function readConfig(el) {
    const cfg = {
      room: el.dataset.room,
      userId: el.dataset.userId,
      username: el.dataset.username,
      maxLength: Number(el.dataset.maxLength) || 4000,
      wsPath: el.dataset.wsPath || `/ws/chat/${encodeURIComponent(el.dataset.room)}/`,
    };
    const overrides = window.CHAT_CONFIG || {};
    // Only positive numbers count: a blank attribute must not turn a timer into a busy loop.
    const positive = (value) => (Number(value) > 0 ? Number(value) : undefined);
    for (const name of Object.keys(DEFAULTS)) {
      cfg[name] = positive(overrides[name]) || positive(el.dataset[name]) || DEFAULTS[name];
    }
    return Object.freeze(cfg);
  }

  function init() {
    for (const item of store.load()) {
      outbox.set(item.client_id, item);
      renderPending(item, "queued");
    }
    els.form.addEventListener("submit", onSubmit);
    // Enter sends, Shift+Enter is a new line (the composer is a textarea).
    els.input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        els.form.requestSubmit();
      }
    });
    // The composer grows with its lines (up to its CSS max-height, then it scrolls).
    els.input.addEventListener("input", fitComposer);
    els.list.addEventListener("scroll", onListScroll);
    for (const button of [els.newPill, els.jump]) {
      if (button) button.addEventListener("click", () => scrollToBottom());
    }
    setInterval(refreshTimes, CLOCK_TICK_MS);
    window.addEventListener("online", () => {
      attempt = 0;
      wake();
    });
    window.addEventListener("offline", onOffline);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") wake();
    });
    watchForSleep();
    window.chatClient = debugHook();
    connect();
  }

  function debugHook() {
    return Object.freeze({
      get state() {
        return state;
      },
      get lastSeq() {
        return lastSeq;
      },
      get lastUpdateSeq() {
        return lastUpdateSeq;
      },
      get outboxLength() {
        return outbox.size;
      },
      get sessions() {
        return sessions;
      },
      config,
      reconnectNow: () => dropConnection("debug", true),
      // For companion scripts (presence.js): send a frame on the live socket, if any.
      sendFrame: (frame) => session && sendFrame(frame),
      // For history.js: older pages go above everything shown.
      prependOlder,
      get oldestSeq() {
        const first = els.list.querySelector("li[data-seq]");
        return first ? Number(first.dataset.seq) : null;
      },
    });
  }

  // ------------------------------------------------------------------ connection

  function wsUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = synced ? `?after=${lastSeq}&after_update=${lastUpdateSeq}` : "";
    return `${scheme}//${location.host}${config.wsPath}${query}`;
  }

  function connect() {
    clearTimeout(timers.retry);
    if (fatal || ws) return;
    setState(everConnected ? "reconnecting" : "connecting");
    let socket;
    try {
      socket = new WebSocket(wsUrl());
    } catch (err) {
      scheduleReconnect();
      return;
    }
    ws = socket;
    socket.onopen = () => {
      if (socket !== ws) return;
      lastFrameAt = Date.now();
      timers.ping = setInterval(ping, config.pingIntervalMs);
    };
    socket.onmessage = (ev) => {
      if (socket === ws) onData(socket, ev.data);
    };
    socket.onclose = (ev) => {
      if (socket === ws) onClosed(ev.code);
    };
    // A socket that hangs in the handshake (lost SYN, stuck server) never fires close soon.
    timers.handshake = setTimeout(() => {
      if (socket === ws && !session) dropConnection("no hello", false);
    }, config.connectTimeoutMs);
  }

  // Forget the current socket and its timers; its late events are ignored (socket !== ws).
  function teardown() {
    ws = null;
    session = false;
    baseline = false;
    resumeInFlight = false;
    resumeFailed = false;
    pongQueue = [];
    held.clear();
    inflight.clear();
    clearInterval(timers.ping);
    for (const name of ["handshake", "dead", "expect", "resume"]) clearTimeout(timers[name]);
    timers.dead = null;
  }

  // Give up on a socket we think is dead. Its close handshake could take a minute to time out,
  // so don't wait for onclose: reconnect right away (immediate) or after the backoff.
  function dropConnection(reason, immediate) {
    const socket = ws;
    if (!socket) return;
    teardown();
    try {
      socket.close(4000, reason);
    } catch (err) {
      // Already closing: nothing to do.
    }
    if (immediate) connect();
    else scheduleReconnect();
  }

  function onClosed(code) {
    teardown();
    if (FATAL_CLOSES[code]) stopForGood(FATAL_CLOSES[code]);
    else scheduleReconnect(code === CLOSE_SERVICE_RESTART ? RESTART_NOTICE : undefined);
  }

  function stopForGood(message) {
    fatal = true;
    clearTimeout(timers.retry);
    setState("offline");
    showNotice(message, "fatal");
    els.input.disabled = true;
    els.send.disabled = true;
  }

  // Full jitter: many clients dropped by one server restart spread their retries out.
  function scheduleReconnect(notice) {
    if (fatal) return;
    setState(navigator.onLine === false ? "offline" : "reconnecting");
    // A restart notice stays while the attempts fail (the server is still down), until a
    // session starts again: "connection lost" would hide why.
    if (notice) lastCloseNotice = notice;
    if (everConnected) {
      showNotice(
        lastCloseNotice || "Connection lost. Reconnecting; what you write is kept and sent then.",
        "connection"
      );
    }
    const ceiling = Math.min(config.backoffCapMs, config.backoffBaseMs * 2 ** attempt);
    attempt += 1;
    clearTimeout(timers.retry);
    timers.retry = setTimeout(connect, Math.random() * ceiling);
  }

  // Something suggests the network is back or the page slept: check the socket now.
  function wake() {
    if (fatal) return;
    if (!ws) {
      connect();
      return;
    }
    if (!session) return; // a handshake is under way; its timer guards it
    // After a long sleep the socket is almost certainly dead: don't wait for a pong timeout.
    if (Date.now() - lastFrameAt > config.pingIntervalMs + config.pongTimeoutMs) {
      dropConnection("woke up", true);
    } else {
      ping();
    }
  }

  function onOffline() {
    if (!session) setState("offline");
    // A socket may survive a network change, or die silently: find out within pongTimeoutMs.
    else ping();
  }

  // Timers of a visible page that fire far too late mean the machine was asleep.
  function watchForSleep() {
    let lastTick = Date.now();
    setInterval(() => {
      const now = Date.now();
      if (document.visibilityState === "visible" && now - lastTick > SLEEP_GAP_MS) wake();
      lastTick = now;
    }, SLEEP_CHECK_MS);
  }

  function setState(next) {
    state = next;
    els.state.dataset.state = next;
    els.state.textContent = STATE_LABELS[next];
    emit("chat:state", { state: next });
  }

  // Companion scripts listen on #chat-room instead of reaching into this closure.
  function emit(name, detail) {
    root.dispatchEvent(new CustomEvent(name, { detail }));
  }

  // ------------------------------------------------------------------ heartbeat

  function ping() {
    if (sendFrame({ type: "ping" })) {
      pongQueue.push("keepalive");
      armDeadTimer();
    }
  }

  function armDeadTimer() {
    if (timers.dead) return;
    timers.dead = setTimeout(() => {
      timers.dead = null;
      dropConnection("no pong", false);
    }, config.pongTimeoutMs);
  }

  // ------------------------------------------------------------------ incoming frames

  function onData(socket, data) {
    lastFrameAt = Date.now();
    // Any frame proves the connection is alive.
    clearTimeout(timers.dead);
    timers.dead = null;
    let decoded;
    try {
      decoded = JSON.parse(data);
    } catch (err) {
      return; // not ours to fix; the next frames may be fine
    }
    const frames = Array.isArray(decoded) ? decoded : [decoded];
    for (const frame of frames) {
      if (socket !== ws) return; // a handler gave up on this socket
      if (frame && typeof frame.type === "string") dispatch(frame);
    }
  }

  function dispatch(frame) {
    switch (frame.type) {
      case "hello":
        return onHello(frame);
      case "message":
        return onMessage(frame);
      case "message_update":
        return onMessageUpdate(frame);
      case "ack":
        return onAck(frame);
      case "pong":
        return onPong(frame);
      case "error":
        return onError(frame);
      default:
        // Presence, typing and read frames belong to presence.js; unknown types are ignored.
        emit("chat:frame", frame);
        return undefined;
    }
  }

  function onHello(hello) {
    // Another tab logged in as someone else: never send this user's outbox under that name.
    if (String(hello.user && hello.user.id) !== String(config.userId)) {
      const who = hello.user ? hello.user.username : "someone else";
      stopForGood(`This browser is now logged in as ${who}. Reload the page.`);
      dropConnection("user changed", false);
      return;
    }
    session = true;
    sessions += 1;
    everConnected = true;
    attempt = 0;
    lastCloseNotice = null;
    clearTimeout(timers.handshake);
    setState("connected");
    hideNotice("connection");
    const serverLast = Number(hello.last_seq) || 0;
    if (historyUpTo === null) historyUpTo = serverLast;
    // Fewer changes than we saw: the server's database was reset (like last_seq below).
    const serverUpdates = Number(hello.last_update_seq) || 0;
    if (serverUpdates < lastUpdateSeq) lastUpdateSeq = serverUpdates;
    if (synced && serverLast < lastSeq) {
      reloadHistory(serverLast);
    } else if (!synced) {
      // Fresh session: history is the last few messages, starting at an unknown seq. They
      // show their current text, so no change up to the room's last one is news.
      lastUpdateSeq = Math.max(lastUpdateSeq, Number(hello.last_update_seq) || 0);
      if (serverLast > 0) baseline = true;
      else {
        synced = true;
        markRoomStart(); // an empty room: everything it will hold is below
      }
    }
    flushOutbox();
  }

  // The server forgot messages we showed (its database was reset): start over from its view.
  function reloadHistory(serverLast) {
    for (const li of els.list.querySelectorAll("li[data-seq], li.day-separator, li.room-start")) {
      li.remove();
    }
    lastSeq = Math.max(0, serverLast - config.historyLimit);
    showNotice("The server's history was reset; messages were reloaded.", "info");
    if (serverLast > lastSeq) requestResume();
  }

  function onMessage(msg) {
    if (!Number.isInteger(msg.seq) || msg.seq < 1) return;
    if (baseline) {
      baseline = false;
      synced = true;
      lastSeq = Math.max(lastSeq, msg.seq - 1);
    }
    if (msg.seq <= lastSeq) {
      settleOwn(msg); // a duplicate: it is on screen already (a replay may show a change)
      const shown = els.list.querySelector(`li[data-seq="${msg.seq}"]`);
      if (shown) applyChange(shown, msg);
      return;
    }
    if (msg.seq > lastSeq + 1) {
      holdBehindGap(msg);
      return;
    }
    renderConfirmed(msg);
    drainHeld();
  }

  function renderConfirmed(msg) {
    const stick = isScrolledToBottom();
    // Up to the first hello's last_seq it is the history the page opened with; later ones
    // (live, or missed while reconnecting) are news worth announcing and counting as unseen.
    const live = historyUpTo !== null && msg.seq > historyUpTo;
    const li = confirmedElement(msg);
    // Confirmed messages stay above the unconfirmed ones (pending, failed) at the bottom.
    els.list.insertBefore(li, els.list.querySelector("li[data-client-id]"));
    placed(li);
    lastSeq = msg.seq;
    settleOwn(msg);
    if (stick) scrollToBottom();
    else if (live && !isMine(msg)) noteUnseen();
    if (live && !isMine(msg)) announce(msg);
    // client_id and status let room_assistant.js swap a live reply for its stored message.
    emit("chat:message", {
      seq: msg.seq,
      user: msg.user,
      client_id: msg.client_id,
      status: msg.status || "",
      demo: msg.demo === true,
    });
  }

  // Older history (oldest first) from GET .../messages/?before=: insert each message with a
  // seq below the oldest shown, skip any already on screen, and keep the view where it was.
  function prependOlder(frames) {
    const list = els.list;
    const first = list.querySelector("li[data-seq]");
    const anchor = first || list.querySelector("li[data-client-id]");
    const oldest = first ? Number(first.dataset.seq) : Infinity;
    const heightBefore = list.scrollHeight;
    let added = 0;
    for (const msg of frames) {
      if (!Number.isInteger(msg.seq) || msg.seq >= oldest) continue;
      if (list.querySelector(`li[data-seq="${msg.seq}"]`)) continue;
      const li = confirmedElement(msg);
      list.insertBefore(li, anchor);
      placed(li);
      added += 1;
      emit("chat:message", {
        seq: msg.seq,
        user: msg.user,
        client_id: msg.client_id,
        status: msg.status || "",
        demo: msg.demo === true,
        older: true,
      });
    }
    list.scrollTop += list.scrollHeight - heightBefore;
    return added;
  }

  // A stored message: its text (or the deleted placeholder), its edit mark, and for its
  // author the edit and delete controls.
  function confirmedElement(msg) {
    const li = messageElement(msg.user && msg.user.username, msg.text, msg.created_at);
    li.dataset.seq = String(msg.seq);
    if (isMine(msg)) {
      li.classList.add("mine");
      li.querySelector(".meta").append(changeControls(li));
    }
    applyChange(li, msg);
    return li;
  }

  // ------------------------------------------------------------------ edits and deletes

  function onMessageUpdate(update) {
    if (!Number.isInteger(update.seq) || !Number.isInteger(update.update_seq)) return;
    lastUpdateSeq = Math.max(lastUpdateSeq, update.update_seq);
    const li = els.list.querySelector(`li[data-seq="${update.seq}"]`);
    if (li) {
      if (applyChange(li, update)) emit("chat:update", { seq: update.seq, deleted: !!update.deleted });
      return;
    }
    // A message held behind a gap shows its change once it is rendered.
    const waiting = held.get(update.seq);
    if (waiting && !(update.update_seq <= (waiting.update_seq || 0))) {
      Object.assign(waiting, {
        text: update.text,
        edited_at: update.edited_at,
        deleted: update.deleted,
        update_seq: update.update_seq,
      });
    }
  }

  // Show a message's change; false when the element already shows this one or a later one.
  function applyChange(li, change) {
    const updateSeq = Number(change.update_seq) || 0;
    if (updateSeq <= (Number(li.dataset.updateSeq) || 0)) return false;
    li.dataset.updateSeq = String(updateSeq);
    const body = li.querySelector(".text");
    if (change.deleted) {
      stopEditing(li);
      li.classList.add("deleted");
      body.textContent = DELETED_TEXT;
      rawTexts.set(li, "");
      const controls = li.querySelector(".controls");
      if (controls) controls.remove();
    } else {
      setText(li, change.text);
    }
    let mark = li.querySelector(".edited");
    if (!mark && !change.deleted && change.edited_at) {
      mark = document.createElement("span");
      mark.className = "edited";
      mark.textContent = "(edited)";
      li.querySelector(".meta").append(mark);
    }
    if (mark && change.deleted) mark.remove();
    else if (mark) {
      const when = new Date(change.edited_at);
      mark.title = Number.isNaN(when.getTime()) ? "" : `edited ${when.toLocaleString()}`;
    }
    return true;
  }

  function changeControls(li) {
    const controls = document.createElement("span");
    controls.className = "controls";
    const edit = document.createElement("button");
    edit.type = "button";
    edit.className = "link edit";
    edit.textContent = "edit";
    edit.addEventListener("click", () => startEditing(li));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "link delete";
    del.textContent = "delete";
    // Two clicks: a stray one must not delete a message.
    del.addEventListener("click", () => {
      if (del.dataset.confirm === "1") {
        sendChange(li, { type: "delete", seq: Number(li.dataset.seq) });
        return;
      }
      del.dataset.confirm = "1";
      del.textContent = "really delete?";
      setTimeout(() => {
        del.dataset.confirm = "";
        del.textContent = "delete";
      }, CONFIRM_DELETE_MS);
    });
    controls.append(edit, del);
    return controls;
  }

  function startEditing(li) {
    if (li.querySelector("form.editor") || li.classList.contains("deleted")) return;
    const body = li.querySelector(".text");
    const form = document.createElement("form");
    form.className = "editor";
    const input = document.createElement("textarea");
    input.className = "edit-text";
    input.value = rawTexts.get(li) || "";
    input.rows = Math.min(6, input.value.split("\n").length);
    input.setAttribute("aria-label", "Edit message");
    const save = document.createElement("button");
    save.type = "submit";
    save.textContent = "save";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "link";
    cancel.textContent = "cancel";
    cancel.addEventListener("click", () => stopEditing(li));
    form.append(input, save, cancel);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      submitEdit(li, input.value);
    });
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") {
        ev.preventDefault();
        stopEditing(li);
      } else if (ev.key === "Enter" && !ev.shiftKey) {
        ev.preventDefault();
        submitEdit(li, input.value);
      }
    });
    body.hidden = true;
    body.after(form);
    input.focus();
  }

  function submitEdit(li, text) {
    if (text === rawTexts.get(li)) {
      stopEditing(li);
      return;
    }
    if (!text.trim()) {
      showNotice("An edited message cannot be empty; delete it instead.", "info");
      return;
    }
    if ([...text].length > config.maxLength) {
      showNotice(`Messages are limited to ${config.maxLength} characters.`, "info");
      return;
    }
    if (sendChange(li, { type: "edit", seq: Number(li.dataset.seq), text })) stopEditing(li);
  }

  function stopEditing(li) {
    const form = li.querySelector("form.editor");
    if (!form) return;
    form.remove();
    li.querySelector(".text").hidden = false;
  }

  // The change shows once the server's message_update comes back (to every tab).
  function sendChange(li, frame) {
    if (session && sendFrame(frame)) return true;
    showNotice("Not connected: the change was not sent. Try again once connected.", "info");
    return false;
  }

  // Our own message came back: it is stored, so it leaves the outbox and its pending twin goes.
  function settleOwn(msg) {
    if (!msg.client_id || !isMine(msg)) return;
    forget(msg.client_id);
    const li = pendingElement(msg.client_id);
    if (li) removeMessage(li);
  }

  function removeMessage(li) {
    const next = nextMessage(li);
    const before = li.previousElementSibling;
    li.remove();
    if (before && before.classList.contains("day-separator") && !next) before.remove();
    if (next) decorate(next);
  }

  function isMine(msg) {
    return Boolean(msg.user) && String(msg.user.id) === String(config.userId);
  }

  // Never render out of order: keep the frame, ask for the missing ones.
  function holdBehindGap(msg) {
    if (held.size >= MAX_HELD_FRAMES) held.clear();
    held.set(msg.seq, msg);
    requestResume();
  }

  function drainHeld() {
    for (const seq of held.keys()) if (seq <= lastSeq) held.delete(seq);
    while (held.has(lastSeq + 1)) {
      const msg = held.get(lastSeq + 1);
      held.delete(msg.seq);
      renderConfirmed(msg);
    }
  }

  // The pong after a resume is a barrier: the server handles frames in order, so the whole
  // replay has arrived before it.
  function requestResume() {
    if (!session || resumeInFlight) return;
    const frames = [
      { type: "resume", after: lastSeq, after_update: lastUpdateSeq },
      { type: "ping" },
    ];
    if (!sendFrame(frames)) return;
    resumeInFlight = true;
    pongQueue.push("barrier");
    armDeadTimer();
  }

  function onPong(pong) {
    // The server sent this socket every change up to its last_update_seq before the pong.
    if (Number.isInteger(pong.last_update_seq)) {
      lastUpdateSeq = Math.max(lastUpdateSeq, pong.last_update_seq);
    }
    if (pongQueue.shift() === "barrier") {
      onResumeDone();
      return;
    }
    // The room holds messages we never got (a broadcast lost between server processes and
    // nothing sent since to reveal the gap): fetch them.
    if (synced && Number.isInteger(pong.last_seq) && pong.last_seq > lastSeq) requestResume();
  }

  function onResumeDone() {
    resumeInFlight = false;
    if (resumeFailed) {
      resumeFailed = false;
      clearTimeout(timers.resume);
      timers.resume = setTimeout(requestResume, jitter(config.retryMs));
      return;
    }
    drainHeld();
    if (held.size === 0) return;
    // The replay is complete and a seq below a held frame is still missing: that message no
    // longer exists (deleted), so skip the hole instead of waiting for it forever.
    lastSeq = Math.min(...held.keys()) - 1;
    drainHeld();
  }

  function onAck(ack) {
    const cid = ack.client_id;
    if (!cid) return;
    forget(cid);
    const li = pendingElement(cid);
    if (!li) return;
    if (Number.isInteger(ack.seq) && ack.seq <= lastSeq) {
      // Stored long ago (a resend after its first ack was lost), older than what is shown.
      removeMessage(li);
      return;
    }
    setStatus(li, "sent");
    // Its message frame should follow; if it does not (a broadcast lost between server
    // processes), ask for a replay rather than leave it "sent" forever.
    clearTimeout(timers.expect);
    timers.expect = setTimeout(() => {
      if (session && lastSeq < ack.seq) requestResume();
    }, config.pongTimeoutMs);
  }

  function onError(err) {
    if (Number.isInteger(err.seq) && !err.client_id) {
      showNotice(`Message ${err.seq} was not changed: ${err.message || err.code}`, "info");
      return;
    }
    const cid = err.client_id;
    if (cid && outbox.has(cid)) {
      inflight.delete(cid);
      if (RETRYABLE_ERRORS.has(err.code)) {
        setStatus(pendingElement(cid), "retrying");
        scheduleResend();
      } else {
        // bad_frame, too_long: the same frame would be refused again.
        forget(cid);
        markFailed(cid, err.message || err.code);
      }
      return;
    }
    if (resumeInFlight && err.code === "unavailable") {
      resumeFailed = true;
      return;
    }
    showNotice(`Server: ${err.message || err.code}`, "info");
  }

  // ------------------------------------------------------------------ outbox

  function onSubmit(ev) {
    ev.preventDefault();
    const text = els.input.value;
    if (!text.trim()) return;
    // The server counts code points, not UTF-16 units.
    if ([...text].length > config.maxLength) {
      showNotice(`Messages are limited to ${config.maxLength} characters.`, "info");
      return;
    }
    const item = { client_id: newClientId(), text, created_at: new Date().toISOString() };
    outbox.set(item.client_id, item);
    store.add(item);
    renderPending(item, "queued");
    scrollToBottom();
    sendItem(item);
    els.input.value = "";
    fitComposer();
    els.input.focus();
  }

  function fitComposer() {
    els.input.style.height = "auto";
    if (els.input.value) els.input.style.height = `${els.input.scrollHeight + 2}px`;
  }

  function sendItem(item) {
    if (!session) return; // flushed after the next hello
    if (sendFrame({ type: "message", text: item.text, client_id: item.client_id })) {
      inflight.add(item.client_id);
      setStatus(pendingElement(item.client_id), "sending");
    }
  }

  // After hello (and on the retry timer): send everything not yet acked, in typing order.
  function flushOutbox() {
    for (const item of outbox.values()) {
      if (!inflight.has(item.client_id)) sendItem(item);
    }
  }

  function scheduleResend() {
    if (timers.resend) return;
    timers.resend = setTimeout(() => {
      timers.resend = null;
      flushOutbox();
    }, jitter(config.retryMs));
  }

  function forget(cid) {
    outbox.delete(cid);
    inflight.delete(cid);
    store.remove(cid);
  }

  // Read-modify-write per change, so two tabs of the same user don't overwrite each other.
  function outboxStore(key) {
    const valid = (i) => i && typeof i.client_id === "string" && typeof i.text === "string";
    function read() {
      try {
        const items = JSON.parse(localStorage.getItem(key) || "[]");
        return Array.isArray(items) ? items.filter(valid) : [];
      } catch (err) {
        return []; // storage disabled or corrupt: the outbox still works in memory
      }
    }
    function write(items) {
      try {
        if (items.length) localStorage.setItem(key, JSON.stringify(items));
        else localStorage.removeItem(key);
      } catch (err) {
        // Quota or privacy mode: keep going in memory.
      }
    }
    return {
      load: read,
      add(item) {
        write(read().filter((i) => i.client_id !== item.client_id).concat([item]));
      },
      remove(cid) {
        const items = read();
        const rest = items.filter((i) => i.client_id !== cid);
        if (rest.length !== items.length) write(rest);
      },
    };
  }

  function newClientId() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    // randomUUID needs a secure context (https or localhost); getRandomValues does not.
    const bytes = new Uint8Array(16);
    if (window.crypto && crypto.getRandomValues) crypto.getRandomValues(bytes);
    else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  // ------------------------------------------------------------------ rendering

  // User data only ever reaches the page as text nodes (render.js builds the elements).
  function messageElement(author, text, createdAt) {
    const li = document.createElement("li");
    li.className = "msg";
    li.dataset.author = author || "";
    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.className = "author";
    who.textContent = author || "?";
    meta.append(who);
    const when = new Date(createdAt);
    if (!Number.isNaN(when.getTime())) {
      li.dataset.createdAt = when.toISOString();
      const time = document.createElement("time");
      time.dateTime = when.toISOString();
      time.title = when.toLocaleString([], { dateStyle: "full", timeStyle: "short" });
      time.textContent = relativeTime(when);
      meta.append(time);
    }
    const body = document.createElement("div");
    body.className = "text";
    li.append(meta, body);
    setText(li, text);
    return li;
  }

  function setText(li, text) {
    rawTexts.set(li, text);
    li.querySelector(".text").replaceChildren(window.chatRender.renderText(text, config.username));
  }

  // "just now", "12 min ago", then the time of day (the day separator above says which day).
  function relativeTime(when) {
    const minutes = Math.floor((Date.now() - when.getTime()) / 60000);
    if (minutes < 1) return "just now";
    if (minutes < 60) return `${minutes} min ago`;
    return when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function refreshTimes() {
    for (const time of els.list.querySelectorAll("li.msg time")) {
      time.textContent = relativeTime(new Date(time.dateTime));
    }
  }

  // The local calendar day a message was sent on.
  function dayKey(li) {
    return new Date(li.dataset.createdAt || Date.now()).toDateString();
  }

  function dayLabel(li) {
    const when = new Date(li.dataset.createdAt || Date.now());
    const today = new Date();
    const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
    if (when.toDateString() === today.toDateString()) return "Today";
    if (when.toDateString() === yesterday.toDateString()) return "Yesterday";
    const style = { weekday: "long", year: "numeric", month: "long", day: "numeric" };
    return when.toLocaleDateString([], style);
  }

  function prevMessage(li) {
    let el = li.previousElementSibling;
    while (el && !el.classList.contains("msg")) el = el.previousElementSibling;
    return el;
  }

  function nextMessage(li) {
    let el = li.nextElementSibling;
    while (el && !el.classList.contains("msg")) el = el.nextElementSibling;
    return el;
  }

  // A message was inserted (or its neighbour left): fix its day separator and grouping, and
  // those of the message after it, which now follows a different one.
  function placed(li) {
    decorate(li);
    const next = nextMessage(li);
    if (next) decorate(next);
    if (li.dataset.seq === "1") markRoomStart();
  }

  function decorate(li) {
    const before = li.previousElementSibling;
    if (before && before.classList.contains("day-separator")) before.remove();
    const prev = prevMessage(li);
    const sameDay = prev && dayKey(prev) === dayKey(li);
    if (!sameDay) {
      const sep = document.createElement("li");
      sep.className = "day-separator";
      sep.dataset.testid = "day-separator";
      sep.setAttribute("role", "separator");
      sep.textContent = dayLabel(li);
      li.before(sep);
    }
    const gap = prev ? Date.parse(li.dataset.createdAt) - Date.parse(prev.dataset.createdAt) : NaN;
    const grouped =
      Boolean(sameDay) && prev.dataset.author === li.dataset.author && gap >= 0 && gap < GROUP_WINDOW_MS;
    li.classList.toggle("grouped", grouped);
  }

  // The oldest message (seq 1) is on screen, or the room is empty: nothing is older.
  function markRoomStart() {
    if (els.list.querySelector(".room-start")) return;
    const marker = document.createElement("li");
    marker.className = "room-start";
    marker.dataset.testid = "room-start";
    marker.textContent = "This is the start of the room.";
    const older = els.list.querySelector("li.load-older");
    if (older) older.after(marker);
    else els.list.prepend(marker);
  }

  // Screen readers hear new live messages only (not history or older pages): the list itself
  // is not a live region, this visually hidden one is.
  function announce(msg) {
    if (!els.announcer) return;
    const line = document.createElement("p");
    const who = (msg.user && msg.user.username) || "someone";
    line.textContent = `${who}: ${msg.text}`;
    els.announcer.append(line);
    while (els.announcer.childElementCount > MAX_ANNOUNCED) els.announcer.firstElementChild.remove();
  }

  function renderPending(item, status) {
    const li = messageElement(config.username, item.text, item.created_at);
    li.dataset.clientId = item.client_id;
    li.classList.add("pending", "mine");
    const label = document.createElement("span");
    label.className = "status";
    li.querySelector(".meta").append(label);
    setStatus(li, status);
    els.list.append(li);
    placed(li);
  }

  function pendingElement(cid) {
    for (const li of els.list.querySelectorAll("li[data-client-id]")) {
      if (li.dataset.clientId === cid) return li;
    }
    return null;
  }

  function setStatus(li, status) {
    if (!li) return;
    li.dataset.status = status;
    li.querySelector(".status").textContent = STATUS_LABELS[status];
  }

  function markFailed(cid, reason) {
    const li = pendingElement(cid);
    if (!li) return;
    li.classList.remove("pending");
    li.classList.add("failed");
    setStatus(li, "failed");
    li.querySelector(".status").textContent = `not sent: ${reason}`;
    const dismiss = document.createElement("button");
    dismiss.type = "button";
    dismiss.className = "link dismiss";
    dismiss.textContent = "dismiss";
    dismiss.addEventListener("click", () => removeMessage(li));
    li.querySelector(".meta").append(dismiss);
  }

  function isScrolledToBottom() {
    const l = els.list;
    return l.scrollHeight - l.scrollTop - l.clientHeight < 40;
  }

  function scrollToBottom() {
    els.list.scrollTop = els.list.scrollHeight;
    onListScroll();
  }

  // Scrolled up: a jump-to-bottom button, and a pill counting messages that arrived below.
  function onListScroll() {
    const atBottom = isScrolledToBottom();
    if (atBottom) unseen = 0;
    if (els.jump) els.jump.hidden = atBottom;
    if (els.newPill) {
      els.newPill.hidden = unseen === 0;
      els.newPill.textContent = unseen === 1 ? "1 new message" : `${unseen} new messages`;
    }
  }

  function noteUnseen() {
    unseen += 1;
    onListScroll();
  }

  // kind: "fatal" (stays), "connection" (hidden on the next hello), "info" (fades).
  function showNotice(text, kind) {
    if (els.notice.dataset.kind === "fatal" && kind !== "fatal") return;
    els.notice.textContent = text;
    els.notice.dataset.kind = kind;
    els.notice.hidden = false;
    clearTimeout(timers.notice);
    if (kind === "info") timers.notice = setTimeout(() => hideNotice("info"), 8000);
  }

  function hideNotice(kind) {
    if (els.notice.dataset.kind !== kind) return;
    els.notice.hidden = true;
    els.notice.textContent = "";
    delete els.notice.dataset.kind;
  }

  // ------------------------------------------------------------------ helpers

  function sendFrame(frame) {
    if (!ws || ws.readyState !== OPEN) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch (err) {
      return false;
    }
  }

  function jitter(ms) {
    return ms * (0.5 + Math.random());
  }
})();
