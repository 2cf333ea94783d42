/* Conveyor console: live regions and confirmations. No inline script anywhere (CSP). */
(function () {
  "use strict";

  function openSteps(el) {
    var open = {};
    el.querySelectorAll("[data-step] > details[open]").forEach(function (d) {
      open[d.parentElement.getAttribute("data-step")] = true;
    });
    return open;
  }

  function refresh(el, timer) {
    var url = el.getAttribute("data-live");
    fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (r.url.indexOf("/console/sign-in") !== -1) {
          window.location.assign("/console/sign-in");
          return null;
        }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById(el.id);
        if (!fresh) { return; }
        var open = openSteps(el);
        el.replaceChildren.apply(el, Array.prototype.slice.call(fresh.childNodes));
        el.querySelectorAll("[data-step] > details").forEach(function (d) {
          if (open[d.parentElement.getAttribute("data-step")]) { d.open = true; }
        });
        el.removeAttribute("data-stale");
        el.setAttribute("data-refreshed", String(Date.now()));
        if (el.querySelector("[data-final]")) { window.clearInterval(timer.id); }
      })
      .catch(function () { el.setAttribute("data-stale", "1"); });
  }

  document.querySelectorAll("[data-live]").forEach(function (el) {
    var every = parseInt(el.getAttribute("data-every") || "3000", 10);
    var timer = { id: 0 };
    if (el.querySelector("[data-final]")) { return; }
    timer.id = window.setInterval(function () {
      if (!document.hidden) { refresh(el, timer); }
    }, every);
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("[data-confirm]") : null;
    if (button && !window.confirm(button.getAttribute("data-confirm"))) {
      event.preventDefault();
    }
  });
})();
