// Live refresh without reloading: every N seconds (the "Auto-refresh" choice, remembered in a
// cookie by the server, so it follows you from page to page) fetch this page again and swap in
// its status strip and content, keeping expanded rows open and the scroll position. It waits
// while you type in a field. Without JavaScript the page has a <noscript> meta refresh instead.
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-refresh") || 0);
  if (!seconds || !window.fetch || !window.DOMParser) {
    return;
  }

  function typing() {
    var active = document.activeElement;
    return active && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }

  function swap(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    var open = Array.prototype.map.call(
      document.querySelectorAll("details[data-key][open]"),
      function (details) { return details.getAttribute("data-key"); }
    );
    ["#status-strip", "main"].forEach(function (selector) {
      var now = document.querySelector(selector);
      var next = fresh.querySelector(selector);
      if (now && next) {
        now.replaceWith(next);
      }
    });
    Array.prototype.forEach.call(document.querySelectorAll("details[data-key]"), function (d) {
      if (open.indexOf(d.getAttribute("data-key")) !== -1) {
        d.open = true;
      }
    });
    document.body.setAttribute("data-refreshed", new Date().toISOString());
  }

  function tick() {
    if (document.hidden || typing()) {
      schedule();
      return;
    }
    var y = window.scrollY;
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (answer) { return answer.ok ? answer.text() : null; })
      .then(function (html) {
        if (html) {
          swap(html);
          window.scrollTo(0, y);
        }
      })
      .catch(function () { /* offline for a moment: try again next time */ })
      .then(schedule);
  }

  function schedule() {
    window.setTimeout(tick, seconds * 1000);
  }

  schedule();
})();
