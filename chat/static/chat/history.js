/*
 * Older history for the room page: when the reader scrolls to the top (or presses "Load older
 * messages"), fetch GET <data-history-url>?before=<oldest seq shown> and put the page above.
 * Companion of chat.js (window.chatClient.prependOlder / oldestSeq); the endpoint is keyset
 * paged (docs/protocol.md, "History"), so pages never shift while live messages arrive, and
 * prependOlder skips any seq already on screen: no duplicates, no gaps.
 */
(function () {
  "use strict";

  // Start loading when the reader is this close to the top, in pixels.
  const NEAR_TOP_PX = 80;

  const root = document.getElementById("chat-room");
  if (!root || !root.dataset.historyUrl) return;
  const list = root.querySelector("[data-testid=messages]");
  const row = list.querySelector("li.load-older");
  const button = row.querySelector("button");
  let loading = false;
  let exhausted = false;

  list.addEventListener("scroll", () => {
    if (list.scrollTop < NEAR_TOP_PX) loadOlder();
  });
  button.addEventListener("click", loadOlder);
  // The first history batch decides whether there is anything older at all.
  root.addEventListener("chat:message", update);

  // A link to one message (notifications link mentions as /chat/<slug>/#seq-<n>): page back
  // until it is on screen, then show it.
  const wanted = /^#seq-(\d+)$/.exec(location.hash);
  let target = wanted ? Number(wanted[1]) : null;
  if (target !== null) {
    root.addEventListener("chat:message", (event) => {
      // Mid-page the list is half built: look again once the page is complete.
      if (!event.detail.older) seekTarget();
    });
  }

  function seekTarget() {
    if (target === null) return;
    const li = list.querySelector(`li[data-seq="${target}"]`);
    if (li) {
      target = null;
      li.classList.add("highlight");
      li.scrollIntoView({ block: "center" });
      return;
    }
    const oldest = oldestSeq();
    if (oldest === null || oldest < target || exhausted) {
      target = null; // not in this room's history any more
      return;
    }
    if (!loading) loadOlder().then(seekTarget);
  }

  function oldestSeq() {
    return window.chatClient ? window.chatClient.oldestSeq : null;
  }

  function update() {
    const oldest = oldestSeq();
    if (oldest !== null && oldest <= 1) exhausted = true;
    row.hidden = exhausted || oldest === null;
    button.disabled = loading;
    if (!loading && !button.dataset.failed) button.textContent = "Load older messages";
  }

  async function loadOlder() {
    const before = oldestSeq();
    if (loading || exhausted || before === null) return;
    loading = true;
    button.textContent = "Loading…";
    update();
    try {
      const url = `${root.dataset.historyUrl}?before=${before}`;
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const page = await response.json();
      window.chatClient.prependOlder(page.messages);
      exhausted = !page.has_more;
      delete button.dataset.failed;
    } catch (err) {
      button.dataset.failed = "true";
      button.textContent = "Could not load older messages: retry";
    } finally {
      loading = false;
      update();
    }
  }

  window.chatHistory = Object.freeze({
    loadOlder,
    get exhausted() {
      return exhausted;
    },
  });
})();
