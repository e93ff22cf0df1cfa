/*
 * Rooms in the app: the room list (live unread badges and tab title, new rooms, the "new
 * room" form) and the room page's owner panel (rename, privacy, invite, remove) or "leave"
 * button. Talks to the room endpoints (docs/protocol.md, "Room endpoints") with the session
 * cookie and the CSRF token; user text only ever goes into textContent.
 */
(function () {
  "use strict";

  // Counts above this show as "99+" (badges and the tab title).
  const BADGE_CAP = 99;

  function csrfToken() {
    const input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  // fetch() a room endpoint; resolves to {status, body} (body null for 204), throws on network.
  async function api(method, url, body) {
    const options = {
      method,
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    };
    if (method !== "GET") options.headers["X-CSRFToken"] = csrfToken();
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(url, options);
    const data = response.status === 204 ? null : await response.json().catch(() => null);
    return { status: response.status, body: data };
  }

  function errorText(result) {
    const error = result.body && result.body.error;
    return error ? error.message : `Request failed (${result.status}).`;
  }

  function capped(n) {
    return n > BADGE_CAP ? `${BADGE_CAP}+` : String(n);
  }

  // --- the room list -----------------------------------------------------------------------

  function roomList(root) {
    const list = root.querySelector("[data-testid=room-list]");
    const apiUrl = root.dataset.apiUrl;
    const pollMs = Math.max(1, Number(root.dataset.pollSeconds) || 10) * 1000;
    const baseTitle = document.title;

    function roomItem(room) {
      const li = document.createElement("li");
      li.dataset.room = room.slug;
      const link = document.createElement("a");
      link.href = room.url;
      link.className = "room-title";
      link.textContent = room.title;
      li.append(link);
      if (room.is_private) {
        const tag = document.createElement("span");
        tag.className = "tag";
        tag.textContent = "private";
        li.append(" ", tag);
      }
      const meta = document.createElement("span");
      meta.className = "room-meta";
      const members = document.createElement("span");
      members.dataset.testid = "member-count";
      members.textContent = `${room.member_count} member${room.member_count === 1 ? "" : "s"}`;
      meta.append(members);
      if (room.last_message_at) {
        const time = document.createElement("time");
        time.dateTime = room.last_message_at;
        time.textContent = new Date(room.last_message_at).toLocaleString();
        meta.append(" · last message ", time);
      }
      li.append(" ", meta);
      if (room.unread > 0) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.dataset.testid = "unread";
        badge.title = `${room.unread} unread messages`;
        badge.textContent = capped(room.unread);
        li.append(" ", badge);
      }
      return li;
    }

    function render(rooms) {
      const items = rooms.map(roomItem);
      if (!items.length) {
        const empty = document.createElement("li");
        empty.className = "empty";
        empty.textContent = "No rooms yet.";
        items.push(empty);
      }
      list.replaceChildren(...items);
      setTitle(rooms.reduce((sum, room) => sum + Math.max(0, room.unread), 0));
    }

    function setTitle(unread) {
      document.title = unread > 0 ? `(${capped(unread)}) ${baseTitle}` : baseTitle;
    }

    async function refresh() {
      try {
        const result = await api("GET", apiUrl);
        if (result.status === 200) render(result.body.rooms);
      } catch (_) {
        // Offline for a moment: the next poll tries again.
      }
    }

    // The count the server rendered, before the first poll.
    setTitle(
      [...list.querySelectorAll("[data-testid=unread]")].reduce(
        (sum, badge) => sum + (parseInt(badge.title, 10) || 0),
        0,
      ),
    );
    setInterval(() => {
      if (!document.hidden) refresh();
    }, pollMs);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refresh();
    });

    const form = root.querySelector("[data-testid=new-room]");
    if (!form) return;
    const errorBox = form.querySelector("[data-testid=new-room-error]");
    form.elements.title.addEventListener("input", () => {
      // Suggest a slug from the title until the user types one.
      if (form.elements.slug.dataset.touched) return;
      form.elements.slug.value = form.elements.title.value
        .toLowerCase()
        .normalize("NFKD")
        .replace(/[^a-z0-9]+/g, "-")
        .replace(/^-+|-+$/g, "")
        .slice(0, 64);
    });
    form.elements.slug.addEventListener("input", () => {
      form.elements.slug.dataset.touched = "1";
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      errorBox.hidden = true;
      const body = {
        slug: form.elements.slug.value.trim(),
        title: form.elements.title.value.trim(),
        is_private: form.elements.is_private.checked,
      };
      let result;
      try {
        result = await api("POST", apiUrl, body);
      } catch (_) {
        result = { status: 0, body: null };
      }
      if (result.status === 201) {
        location.href = result.body.url;
        return;
      }
      errorBox.textContent = errorText(result);
      errorBox.hidden = false;
    });
  }

  // --- the room page -----------------------------------------------------------------------

  function roomTools(root) {
    const apiUrl = root.dataset.apiUrl;
    const status = root.querySelector("[data-testid=manage-status]");
    const me = root.dataset.username;

    function say(text) {
      if (status) status.textContent = text;
    }

    const leave = root.querySelector("[data-testid=leave-room]");
    if (leave) {
      leave.addEventListener("click", async () => {
        const result = await api("DELETE", `${apiUrl}members/${encodeURIComponent(me)}/`);
        if (result.status === 204) location.href = "../";
        else say(errorText(result));
      });
    }

    const panel = root.querySelector("[data-testid=owner-panel]");
    if (!panel) return;
    const memberList = panel.querySelector("[data-testid=member-admin]");
    const owner = root.dataset.owner;

    function memberItem(username) {
      const li = document.createElement("li");
      li.dataset.username = username;
      const name = document.createElement("span");
      name.textContent = username;
      li.append(name);
      if (username !== owner) {
        const remove = document.createElement("button");
        remove.type = "button";
        remove.className = "link";
        remove.dataset.testid = "remove-member";
        remove.textContent = "remove";
        remove.setAttribute("aria-label", `Remove ${username}`);
        remove.addEventListener("click", () => removeMember(username));
        li.append(" ", remove);
      } else {
        const tag = document.createElement("span");
        tag.className = "tag";
        tag.textContent = "owner";
        li.append(" ", tag);
      }
      return li;
    }

    async function loadMembers() {
      const result = await api("GET", apiUrl);
      if (result.status !== 200) return say(errorText(result));
      memberList.replaceChildren(...result.body.members.map(memberItem));
    }

    async function removeMember(username) {
      const result = await api("DELETE", `${apiUrl}members/${encodeURIComponent(username)}/`);
      if (result.status !== 204) return say(errorText(result));
      say(`${username} was removed.`);
      loadMembers();
    }

    panel.addEventListener("toggle", () => {
      if (panel.open) loadMembers();
    });
    // Escape closes the panel (like the members list and the bell) and returns to its summary.
    panel.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && panel.open) {
        panel.open = false;
        panel.querySelector("summary").focus();
      }
    });

    const rename = panel.querySelector("[data-testid=rename-form]");
    rename.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = { title: rename.elements.title.value.trim(), is_private: rename.elements.is_private.checked };
      const result = await api("PATCH", apiUrl, body);
      if (result.status !== 200) return say(errorText(result));
      const heading = document.querySelector(".room-header h1");
      if (heading) heading.textContent = result.body.title;
      say("Saved.");
    });

    const invite = panel.querySelector("[data-testid=invite-form]");
    invite.addEventListener("submit", async (event) => {
      event.preventDefault();
      const username = invite.elements.username.value.trim();
      const result = await api("POST", `${apiUrl}members/`, { username });
      if (result.status !== 201) return say(errorText(result));
      invite.elements.username.value = "";
      say(`${username} was invited.`);
      loadMembers();
    });
  }

  const listRoot = document.getElementById("room-list-page");
  if (listRoot) roomList(listRoot);
  const toolsRoot = document.getElementById("room-tools");
  if (toolsRoot) roomTools(toolsRoot);
})();
