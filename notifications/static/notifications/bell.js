/*
 * The notification bell: unread count and dropdown, updated live over Server-Sent Events.
 *
 * Tabs of one browser share one stream: a leader tab (elected with the Web Locks API, or with
 * BroadcastChannel heartbeats where Web Locks are missing) holds the EventSource and
 * rebroadcasts each event to the other tabs over a BroadcastChannel. When the leader closes,
 * another tab takes over and reconnects with ?last_event_id=, so nothing is missed.
 *
 * On an error the EventSource is closed and reopened after an exponential backoff with jitter
 * (EventSource alone would retry every few seconds forever, or give up on an error status).
 *
 * Unread count: the server sends {count, last_id}, the number of unread notifications with
 * id <= last_id. Unread notifications that arrive later with a higher id are added on top.
 *
 * Everything from the server is inserted as text (textContent), never as HTML.
 */
(function () {
  "use strict";

  const root = document.getElementById("notifications-bell");
  if (!root || root.dataset.started) {
    return;
  }
  root.dataset.started = "1";

  // Tests shorten these through window.NOTIFICATIONS_CONFIG (set before this script runs).
  const config = Object.assign(
    {
      backoffBaseMs: 1000,
      backoffCapMs: 60000,
      heartbeatMs: 2000,
      leaderTimeoutMs: 5000,
      listLimit: 20,
      useWebLocks: true,
    },
    window.NOTIFICATIONS_CONFIG || {}
  );

  const CHANNEL_NAME = "notifications-bell";
  const LOCK_NAME = "notifications-bell-leader";
  const tabId = Date.now().toString(36) + "-" + Math.random().toString(36).slice(2);

  const button = root.querySelector(".notif-button");
  const badge = root.querySelector(".notif-count");
  const panel = root.querySelector(".notif-panel");
  const list = root.querySelector(".notif-list");
  const empty = root.querySelector(".notif-empty");
  const readAll = root.querySelector(".notif-read-all");

  const state = {
    count: 0, // unread notifications with id <= upto, as the server counted them
    upto: 0,
    extra: new Set(), // unread ids above upto that arrived live
    lastEventId: null, // highest notification id seen: where a new stream resumes
    items: new Map(), // id -> notification, for the dropdown
  };

  // --- rendering -------------------------------------------------------------------------------

  function unreadCount() {
    return state.count + state.extra.size;
  }

  function renderCount() {
    const count = unreadCount();
    badge.textContent = count > 99 ? "99+" : String(count);
    badge.dataset.count = String(count);
    badge.hidden = count === 0;
    button.setAttribute("aria-label", count ? `Notifications (${count} unread)` : "Notifications");
  }

  function safeUrl(url) {
    if (typeof url !== "string" || !url) {
      return null;
    }
    if (url.startsWith("/") && !url.startsWith("//")) {
      return url;
    }
    try {
      const parsed = new URL(url);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (error) {
      return null;
    }
  }

  function renderItem(item) {
    const li = document.createElement("li");
    li.dataset.id = String(item.id);
    li.dataset.level = item.level;
    li.className = item.read ? "read" : "unread";
    const href = safeUrl(item.url);
    const box = document.createElement(href ? "a" : "div");
    if (href) {
      box.href = href;
    }
    const title = document.createElement("div");
    title.className = "notif-title";
    title.textContent = item.title;
    box.appendChild(title);
    if (item.body) {
      const body = document.createElement("div");
      body.className = "notif-body";
      body.textContent = item.body;
      box.appendChild(body);
    }
    const time = document.createElement("time");
    time.dateTime = item.created_at;
    time.textContent = new Date(item.created_at).toLocaleString();
    box.appendChild(time);
    box.addEventListener("click", () => {
      if (!item.read) {
        markRead(item.id);
      }
    });
    li.appendChild(box);
    return li;
  }

  function renderList() {
    const items = Array.from(state.items.values()).sort((a, b) => b.id - a.id);
    list.replaceChildren(...items.slice(0, config.listLimit).map(renderItem));
    empty.hidden = items.length > 0;
  }

  // --- state changes (the same in every tab) ---------------------------------------------------

  function applyUnread(data) {
    state.count = Number(data.count) || 0;
    state.upto = Math.max(Number(data.last_id) || 0, 0);
    for (const id of state.extra) {
      if (id <= state.upto) {
        state.extra.delete(id);
      }
    }
    if (unreadCount() === 0) {
      for (const item of state.items.values()) {
        item.read = true;
      }
      renderList();
    }
    renderCount();
  }

  function applyNotification(item) {
    if (state.lastEventId === null || item.id > state.lastEventId) {
      state.lastEventId = item.id;
    }
    if (!item.read && item.id > state.upto) {
      state.extra.add(item.id);
    }
    state.items.set(item.id, item);
    renderCount();
    renderList();
  }

  function applyItemRead(id) {
    const item = state.items.get(id);
    if (item) {
      item.read = true;
    }
    state.extra.delete(id);
    renderList();
  }

  // --- other tabs ------------------------------------------------------------------------------

  const channel = "BroadcastChannel" in window ? new BroadcastChannel(CHANNEL_NAME) : null;

  function post(message) {
    if (channel) {
      channel.postMessage(Object.assign({ from: tabId }, message));
    }
  }

  // --- the stream (leader only) ----------------------------------------------------------------

  let isLeader = false;
  let source = null;
  let attempts = 0;
  let reconnectTimer = null;
  let connects = 0;

  function streamUrl() {
    const url = new URL(root.dataset.streamUrl, window.location.href);
    if (state.lastEventId !== null) {
      url.searchParams.set("last_event_id", String(state.lastEventId));
    }
    return url.href;
  }

  function connect() {
    reconnectTimer = null;
    if (!isLeader || source) {
      return;
    }
    connects += 1;
    const es = new EventSource(streamUrl());
    source = es;
    es.addEventListener("unread", (event) => {
      attempts = 0; // the stream is up
      const data = JSON.parse(event.data);
      applyUnread(data);
      post({ kind: "unread", data });
    });
    es.addEventListener("notification", (event) => {
      const item = JSON.parse(event.data);
      applyNotification(item);
      post({ kind: "notification", data: item });
    });
    es.addEventListener("error", () => {
      if (source !== es) {
        return;
      }
      es.close();
      source = null;
      scheduleReconnect();
    });
  }

  function scheduleReconnect() {
    if (!isLeader || reconnectTimer !== null) {
      return;
    }
    const ceiling = Math.min(config.backoffCapMs, config.backoffBaseMs * 2 ** attempts);
    attempts += 1;
    // Full jitter, at least half the ceiling: tabs of many users do not reconnect in step.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    reconnectTimer = window.setTimeout(connect, delay);
  }

  function disconnect() {
    if (reconnectTimer !== null) {
      window.clearTimeout(reconnectTimer);
      reconnectTimer = null;
    }
    if (source) {
      source.close();
      source = null;
    }
  }

  function becomeLeader() {
    if (isLeader) {
      return;
    }
    isLeader = true;
    root.dataset.leader = "true";
    attempts = 0;
    connect();
    post({ kind: "leader" });
  }

  function resign() {
    if (!isLeader) {
      return;
    }
    isLeader = false;
    root.dataset.leader = "false";
    disconnect();
  }

  // --- leader election -------------------------------------------------------------------------

  let leaderSeenAt = Date.now();
  let usingLocks = Boolean(channel && config.useWebLocks && navigator.locks);

  function electWithLocks() {
    // The lock is held until this page goes away; then the browser grants it to the next
    // waiting tab, which opens the stream.
    navigator.locks
      .request(LOCK_NAME, () => new Promise(() => becomeLeader()))
      .catch(() => {
        usingLocks = false; // e.g. not a secure context
        electWithHeartbeats();
      });
  }

  function electWithHeartbeats() {
    // Without Web Locks: the leader says so every heartbeatMs; a follower that has not heard
    // it for leaderTimeoutMs takes over. Of two leaders that hear each other, the one with
    // the larger tab id steps down.
    window.setInterval(() => {
      if (isLeader) {
        post({ kind: "heartbeat" });
      } else if (Date.now() - leaderSeenAt > config.leaderTimeoutMs) {
        becomeLeader();
      }
    }, config.heartbeatMs);
    window.addEventListener("pagehide", () => {
      if (isLeader) {
        post({ kind: "resign" });
      }
    });
  }

  if (channel) {
    channel.addEventListener("message", (event) => {
      const message = event.data || {};
      switch (message.kind) {
        case "unread":
          applyUnread(message.data);
          break;
        case "notification":
          applyNotification(message.data);
          break;
        case "read":
          applyItemRead(message.id);
          break;
        case "heartbeat":
        case "leader":
          leaderSeenAt = Date.now();
          if (isLeader && !usingLocks && message.from < tabId) {
            resign();
          }
          break;
        case "resign":
          leaderSeenAt = 0;
          break;
        default:
          break;
      }
    });
  }

  if (!channel) {
    becomeLeader(); // no way to share: every tab streams for itself
  } else if (usingLocks) {
    electWithLocks();
  } else {
    electWithHeartbeats();
  }

  // --- HTTP ------------------------------------------------------------------------------------

  function postJson(url) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      keepalive: true, // a click on a link navigates away while this is in flight
      headers: { "X-CSRFToken": root.dataset.csrfToken, Accept: "application/json" },
    }).then((response) => (response.ok ? response.json() : null));
  }

  function markRead(id) {
    applyItemRead(id);
    post({ kind: "read", id });
    const url = root.dataset.readUrl.replace(/\/0\/read\/$/, `/${id}/read/`);
    return postJson(url)
      .then((data) => data && applyUnread(data))
      .catch(() => {});
  }

  function loadList() {
    const url = new URL(root.dataset.listUrl, window.location.href);
    url.searchParams.set("limit", String(config.listLimit));
    return fetch(url.href, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((response) => (response.ok ? response.json() : null))
      .then((data) => {
        if (!data) {
          return;
        }
        for (const item of data.notifications) {
          state.items.set(item.id, item);
        }
        if (data.last_id >= state.upto) {
          applyUnread({ count: data.unread, last_id: data.last_id });
        }
        renderList();
      })
      .catch(() => {});
  }

  button.addEventListener("click", () => {
    const open = panel.hidden;
    panel.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    if (open) {
      loadList();
    }
  });
  document.addEventListener("click", (event) => {
    if (!panel.hidden && !root.contains(event.target)) {
      panel.hidden = true;
      button.setAttribute("aria-expanded", "false");
    }
  });
  // Escape closes the panel and gives the focus back to the bell.
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !panel.hidden) {
      panel.hidden = true;
      button.setAttribute("aria-expanded", "false");
      button.focus();
    }
  });
  readAll.addEventListener("click", () => {
    postJson(root.dataset.readAllUrl)
      .then((data) => data && applyUnread(data))
      .catch(() => {});
  });
  window.addEventListener("pagehide", disconnect);
  window.addEventListener("pageshow", (event) => {
    if (event.persisted && isLeader) {
      connect(); // restored from the back/forward cache: resume with ?last_event_id=
    }
  });

  // Followers learn the count from the list; the leader's stream sends it too.
  loadList();
  renderCount();

  window.notificationsBell = {
    get isLeader() {
      return isLeader;
    },
    get connected() {
      return Boolean(source && source.readyState === EventSource.OPEN);
    },
    get count() {
      return unreadCount();
    },
    get lastEventId() {
      return state.lastEventId;
    },
    get connects() {
      return connects;
    },
    get election() {
      return !channel ? "none" : usingLocks ? "locks" : "heartbeats";
    },
  };
})();
