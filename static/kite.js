// Kite's only script: copy buttons, live invitation progress, the events tail.
// Every page works without it; it only adds.
(function () {
  "use strict";

  function copyButtons() {
    document.querySelectorAll("button.copy[data-copy]").forEach(function (button) {
      var source = document.getElementById(button.dataset.copy);
      if (!source) return;
      button.hidden = false;
      button.addEventListener("click", function () {
        var done = function () { button.textContent = "Copied"; setTimeout(function () { button.textContent = "Copy"; }, 2000); };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(source.value).then(done, function () { source.select(); document.execCommand("copy"); done(); });
        } else {
          source.select(); document.execCommand("copy"); done();
        }
      });
    });
  }

  var STEPS = ["proposed", "accepted", "enrolled", "active"];
  var HINTS = {
    proposed: "Waiting for the other side to paste the invitation.",
    accepted: "Handshake done: waiting for the first heartbeat.",
    enrolled: "Our ping was accepted: waiting for the other side's first request.",
    active: "Both sides have heard from each other: federation is live.",
    revoked: "This peering was deleted."
  };

  function progress() {
    var box = document.querySelector("[data-progress-url]");
    if (!box) return;
    var statusField = box.querySelector("[data-field=status]");
    var errorField = box.querySelector("[data-field=last_error]");
    var hintField = box.querySelector("[data-field=hint]");
    function show(state) {
      var reached = STEPS.indexOf(state.status);
      box.querySelectorAll("[data-step]").forEach(function (item) {
        var index = STEPS.indexOf(item.dataset.step);
        item.classList.toggle("done", index < reached);
        item.classList.toggle("current", index === reached);
        if (index === reached) item.setAttribute("aria-current", "step"); else item.removeAttribute("aria-current");
      });
      statusField.textContent = state.status + " · " + state.reachability;
      hintField.textContent = HINTS[state.status] || "";
      errorField.textContent = state.last_error ? "Last error: " + state.last_error : "";
      return state.status === "active" || state.status === "revoked";
    }
    function poll() {
      fetch(box.dataset.progressUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (state) { if (!state || !show(state)) setTimeout(poll, 1000); })
        .catch(function () { setTimeout(poll, 3000); });
    }
    poll();
  }

  function cell(text, className) {
    var td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function eventRow(event, unverified) {
    var tr = document.createElement("tr");
    tr.dataset.cursor = event.kitecursor || "";
    tr.className = "fresh";
    var when = new Date().toISOString().replace("T", " ").slice(0, 19);
    var fed = event.kitefedorigin ? "from " + event.kitefedorigin + " · " + event.kitefedhops + " hop" + (event.kitefedhops == 1 ? "" : "s") : "local";
    if (event.kitefedorigin && event.kitefedpeer) fed += " · via peer " + event.kitefedpeer;
    var source = (event.source || "").split("/").pop();
    var sourceCell = cell(source);
    if (unverified.indexOf(event.source) !== -1) {
      var badge = document.createElement("span");
      badge.className = "badge warn";
      badge.textContent = "unverified";
      sourceCell.appendChild(document.createTextNode(" "));
      sourceCell.appendChild(badge);
    }
    var idCell = cell("", "mono small");
    var journey = document.createElement("a");  // the event's journey page (ingest.screens.event_journey)
    journey.href = "/events/journey/?" + new URLSearchParams({ id: event.id, source: event.source || "" });
    journey.textContent = event.id;
    idCell.appendChild(journey);
    [cell(when, "nowrap"), cell(event.type), sourceCell, idCell, cell(fed, "small")].forEach(function (td) { tr.appendChild(td); });
    var data = document.createElement("td");
    var details = document.createElement("details");
    var summary = document.createElement("summary");
    var pre = document.createElement("pre");
    summary.textContent = "data";
    pre.className = "mono small";
    pre.textContent = JSON.stringify(event.data).slice(0, 2000);
    details.appendChild(summary); details.appendChild(pre); data.appendChild(details); tr.appendChild(data);
    return tr;
  }

  function tail() {
    var table = document.querySelector("table[data-tail]");
    if (!table || !window.WebSocket) return;
    var body = table.tBodies[0];
    var state = document.querySelector("[data-live-state]");
    var after = table.dataset.after;
    var retry = 1000;
    var unverified = (table.dataset.unverified || "").split(" ").filter(Boolean);
    function setState(text, cls) { state.innerHTML = ""; var badge = document.createElement("span"); badge.className = "badge " + cls; badge.textContent = text; state.appendChild(badge); }
    function connect() {
      var query = new URLSearchParams();
      if (table.dataset.source) query.set("source", table.dataset.source);
      if (table.dataset.type) query.set("type", table.dataset.type);
      query.set("after", after);
      var socket = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws/events?" + query);
      socket.onopen = function () { retry = 1000; setState("live", "ok"); };
      socket.onmessage = function (message) {
        var event = JSON.parse(message.data);
        if (event.kitecursor) after = event.kitecursor;
        if (body.querySelector('tr[data-cursor="' + after + '"]')) return;
        var empty = body.querySelector("tr.empty");
        if (empty) empty.remove();
        body.insertBefore(eventRow(event, unverified), body.firstChild);
        while (body.rows.length > 500) body.deleteRow(body.rows.length - 1);
      };
      socket.onclose = function () { setState("reconnecting…", "warn"); setTimeout(connect, retry); retry = Math.min(retry * 2, 30000); };
    }
    connect();
  }

  // A value shown once is the page's first thing: give it the focus, so a screen reader reads it first.
  function onceShown() {
    var panel = document.getElementById("once");
    if (panel) panel.focus({ preventScroll: true });
  }

  document.addEventListener("DOMContentLoaded", function () { copyButtons(); onceShown(); progress(); tail(); });
})();
