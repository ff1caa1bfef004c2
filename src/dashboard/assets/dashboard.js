// callbridge dashboard: keeps the page up to date from the server's event stream, ticks the
// durations of live calls and shows times in the viewer's time zone. Plain JavaScript, no
// build step. The server sends whole sections, already rendered and escaped; this script only
// puts them in place.
"use strict";

(function () {
  // How far the server's clock is ahead of this browser's, from the newest section received.
  let serverAhead = 0;

  function readServerClock(root) {
    const marked = root.querySelector("[data-now]");
    if (marked) serverAhead = Number(marked.dataset.now) - Date.now();
  }

  function clockText(ms) {
    const total = Math.max(0, Math.floor(ms / 1000));
    const h = Math.floor(total / 3600);
    const m = Math.floor(total / 60) % 60;
    const s = String(total % 60).padStart(2, "0");
    return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
  }

  function tick() {
    const now = Date.now() + serverAhead;
    for (const el of document.querySelectorAll("[data-since]")) {
      el.textContent = clockText(now - Number(el.dataset.since));
    }
  }

  function localTimes(root) {
    for (const el of root.querySelectorAll("time[datetime]")) {
      const at = new Date(el.getAttribute("datetime"));
      if (!Number.isNaN(at.getTime())) {
        el.title = el.textContent;
        el.textContent = at.toLocaleString();
      }
    }
  }

  // Which transcripts were scrolled to their end, so new lines keep them there.
  function scrollState() {
    const state = new Map();
    for (const card of document.querySelectorAll(".card[data-call]")) {
      const list = card.querySelector(".transcript");
      if (list) {
        const atEnd = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
        state.set(card.dataset.call, atEnd ? null : list.scrollTop);
      }
    }
    return state;
  }

  function restoreScroll(state) {
    for (const card of document.querySelectorAll(".card[data-call]")) {
      const list = card.querySelector(".transcript");
      if (!list) continue;
      const kept = state.get(card.dataset.call);
      list.scrollTop = kept == null ? list.scrollHeight : kept;
    }
  }

  function replace(id, html) {
    const target = document.getElementById(id);
    if (!target) return;
    const scroll = scrollState();
    target.innerHTML = html;
    readServerClock(target);
    localTimes(target);
    restoreScroll(scroll);
    tick();
  }

  function connection(state, text) {
    const el = document.getElementById("connection");
    if (!el) return;
    el.hidden = false;
    el.dataset.state = state;
    el.textContent = text;
  }

  function follow(url) {
    const events = new EventSource(url);
    events.onopen = () => connection("live", "live");
    events.onerror = () => {
      if (events.readyState === EventSource.CLOSED) {
        // Refused (signed out, or the dashboard turned off): the sign-in page says which.
        window.location.assign("/dashboard/login");
      } else {
        connection("reconnecting", "reconnecting…");
      }
    };
    for (const section of ["live", "recent", "history"]) {
      events.addEventListener(section, (event) => replace(section, event.data));
    }
    events.addEventListener("end", () => {
      events.close();
      connection("ended", "call ended");
    });
    events.addEventListener("signed-out", () => {
      events.close();
      window.location.assign("/dashboard/login");
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    readServerClock(document);
    localTimes(document);
    restoreScroll(new Map());
    tick();
    setInterval(tick, 1000);
    const streamed = document.querySelector("[data-stream]");
    if (streamed && "EventSource" in window) follow(streamed.dataset.stream);
  });
})();
