"use strict";
(function () {
  var STATE = __STATES__, CLASS = __CLASSES__, CLASSES = __STATUS_CLASSES__;
  function each(name, fn) { document.querySelectorAll('[data-f="' + name + '"]').forEach(fn); }
  function put(name, value) { each(name, function (el) { el.textContent = value; }); }
  function bytes(n) {
    if (n < 1024) return n + " B";
    var units = ["KiB", "MiB", "GiB", "TiB"], i = -1;
    do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
    return n.toFixed(n < 10 ? 2 : 1) + " " + units[i];
  }
  function duration(s) {
    var ms = s * 1000;
    return ms < 10 ? ms.toFixed(1) + " ms" : ms < 1000 ? ms.toFixed(0) + " ms" : s.toFixed(2) + " s";
  }
  function expiresIn(s) {
    if (s <= 0) return "expired";
    if (s < 120) return "in " + s + " s";
    var m = Math.floor(s / 60);
    return m < 120 ? "in " + m + " min" : "in " + Math.floor(m / 60) + " h " + (m % 60) + " min";
  }
  function cell(row, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
  }
  function show(s) {
    each("state", function (el) { el.textContent = STATE[s.state]; el.className = "pill " + CLASS[s.state]; });
    put("user", s.identity ? s.identity.user : "—");
    put("tenant", s.identity ? s.identity.tenant : "—");
    put("expiry", s.token ? "expires " + s.token.expires_at.replace("T", " ").replace("+00:00", " UTC") +
      " (" + expiresIn(s.token.expires_in_seconds) + ")" : "none held");
    each("problem", function (el) { el.hidden = !s.problem; });
    put("detail", s.problem ? s.problem.detail : "");
    put("hint", s.problem ? "Hint: " + s.problem.hint : "");
    each("refusals", function (el) { el.hidden = !s.refusals; });
    put("refusals-text", s.refusals ? s.refusals.text : "");
    var c = s.counters;
    CLASSES.forEach(function (k) { put("req-" + k, c.requests[k] || 0); });
    put("received", bytes(c.received_bytes));
    put("sent", bytes(c.sent_bytes));
    put("upstream-errors", Object.values(c.upstream_errors).reduce(function (a, b) { return a + b; }, 0));
    put("tokens-ok", c.token_acquisitions.ok);
    put("tokens-error", c.token_acquisitions.error);
    if (c.read_ahead) {
      put("read-ahead-hits", c.read_ahead.hits);
      put("read-ahead-misses", c.read_ahead.misses);
      put("read-ahead-wasted", bytes(c.read_ahead.wasted_bytes));
    }
    each("recent", function (body) {
      var rows = s.recent.map(function (r) {
        var tr = document.createElement("tr");
        cell(tr, r.time.slice(11, 19));
        cell(tr, r.method);
        cell(tr, r.path, "path mono");
        cell(tr, r.status === null ? "cut" : String(r.status), "num s" + (r.status ? Math.floor(r.status / 100) : 0));
        cell(tr, duration(r.seconds), "num");
        return tr;
      });
      if (rows.length) body.replaceChildren.apply(body, rows);
    });
  }
  function refresh() {
    if (document.hidden) return;
    fetch("/-/status.json", { cache: "no-store", credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (s) { show(s); put("live", "Live: updated " + new Date().toISOString().slice(11, 19) + " UTC"); })
      .catch(function (e) { put("live", "Live refresh failed (" + e.message + "); retrying"); });
  }
  put("live", "Live: refreshes every __SECONDS__ s");
  document.querySelectorAll("pre").forEach(function (pre) {
    if (!navigator.clipboard) return;
    var button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    button.addEventListener("click", function () {
      navigator.clipboard.writeText(pre.textContent).then(function () { button.textContent = "Copied"; });
    });
    pre.parentNode.appendChild(button);
  });
  setInterval(refresh, __SECONDS__ * 1000);
})();
