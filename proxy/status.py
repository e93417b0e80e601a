"""The status page (`/-/`) and its JSON (`/-/status.json`), for the person setting up a viewer (issue 14).

One self-contained page: who is signed in, the token's state, what the proxy forwards to, the DICOMweb base
URL and ready-to-copy client settings, the counters and the last requests. It is rendered on the server
(everything but live refresh works with JavaScript off); one inline script re-reads `/-/status.json` every
few seconds. The Content-Security-Policy allows exactly that script and that style, by hash, and nothing
from anywhere else. The token, the access key and query strings never reach either answer: the page knows
only the token's claims, whether a key is set, and paths.

The request path pays for one `deque.append` of a tuple (see `RecentRequest`); everything here runs only
when someone looks.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypedDict

from aiohttp import web
from prometheus_client import CollectorRegistry

from . import __version__
from .errors import ProxyError, loggable
from .forward import local_origin
from .guard import ACCESS_KEY_HEADER
from .settings import Settings
from .tokens import TokenSource, expiry_text

# One answered request, kept raw and formatted only when the page is rendered: (finished at, epoch
# seconds; method; path without the query; status, None when the exchange broke off; seconds taken).
RecentRequest = tuple[float, str, str, int | None, float]
RECENT_LIMIT = 50
REFRESH_SECONDS = 3
KEY_PLACEHOLDER = "<access key>"
STUDY_PLACEHOLDER = "<StudyInstanceUID>"
_PATH_LIMIT = 300
_STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")
_UPSTREAM_FAILURES = ("connect", "tls", "timeout", "reset")


def recent_requests() -> deque[RecentRequest]:
    """The ring buffer the proxy appends each answered request to; the oldest falls out."""
    return deque(maxlen=RECENT_LIMIT)


# The JSON snapshot: the facts both answers are made from ----------------------------------------------


class Identity(TypedDict):
    user: str
    tenant: str


class TokenState(TypedDict):
    expires_at: str
    expires_in_seconds: int


class Problem(TypedDict):
    error: str
    detail: str
    hint: str


class Counters(TypedDict):
    requests: dict[str, int]
    received_bytes: int
    sent_bytes: int
    in_flight: int
    upstream_errors: dict[str, int]
    token_acquisitions: dict[str, int]


class Recent(TypedDict):
    time: str
    method: str
    path: str
    status: int | None
    seconds: float


class Snapshot(TypedDict):
    version: str
    # ready: a token is held and not refused; starting: the first one is on its way;
    # no_token: the credential fails; refused: the service refuses the tokens it is given.
    state: str
    identity: Identity | None
    token: TokenState | None
    problem: Problem | None
    credential: str
    audience: str
    upstream: str
    base_url: str
    access_key_required: bool
    access_key_header: str
    read_only: bool
    cors_origins: list[str]
    counters: Counters
    recent: list[Recent]


def identity(claims: dict[str, Any]) -> Identity:
    """User and tenant from the token's claims (the same precedence as tokens.describe_identity)."""
    who = claims.get("upn") or claims.get("unique_name") or claims.get("appid") or claims.get("oid") or "unknown"
    return {"user": str(who), "tenant": str(claims.get("tid", "unknown"))}


def _problem(error: ProxyError) -> Problem:
    body = error.body()
    return {"error": body["error"], "detail": body["detail"], "hint": body["hint"]}


# Sample name -> the label its values are summed by (None: one number), as /-/metrics shows them.
_COUNTED = {
    "dicom_proxy_requests_total": "status",
    "dicom_proxy_received_bytes_total": None,
    "dicom_proxy_sent_bytes_total": None,
    "dicom_proxy_requests_in_flight": None,
    "dicom_proxy_upstream_errors_total": "kind",
    "dicom_proxy_token_acquisitions_total": "result",
}


def counters(registry: CollectorRegistry) -> Counters:
    """The counters, read from the proxy's Prometheus registry exactly as a scrape would read them."""
    totals: dict[str, dict[str, int]] = {name: {} for name in _COUNTED}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in _COUNTED:
                label = _COUNTED[sample.name]
                key = sample.labels.get(label, "") if label else ""
                sums = totals[sample.name]
                sums[key] = sums.get(key, 0) + int(sample.value)
    return {
        "requests": dict.fromkeys(_STATUS_CLASSES, 0) | totals["dicom_proxy_requests_total"],
        "received_bytes": totals["dicom_proxy_received_bytes_total"].get("", 0),
        "sent_bytes": totals["dicom_proxy_sent_bytes_total"].get("", 0),
        "in_flight": totals["dicom_proxy_requests_in_flight"].get("", 0),
        "upstream_errors": dict.fromkeys(_UPSTREAM_FAILURES, 0) | totals["dicom_proxy_upstream_errors_total"],
        "token_acquisitions": {"ok": 0, "error": 0} | totals["dicom_proxy_token_acquisitions_total"],
    }


def _recent(entries: Iterable[RecentRequest]) -> list[Recent]:
    """Newest first; paths cut and with control characters escaped, as in the log."""
    return [
        {
            "time": datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "method": loggable(method, 20),
            "path": loggable(path, _PATH_LIMIT),
            "status": status,
            "seconds": round(seconds, 6),
        }
        for at, method, path, status, seconds in reversed(list(entries))
    ]


# Formatting, mirrored by the page's script (keep the two alike) ---------------------------------------


def format_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"


def format_duration(seconds: float) -> str:
    milliseconds = seconds * 1000
    if milliseconds < 10:
        return f"{milliseconds:.1f} ms"
    if milliseconds < 1000:
        return f"{milliseconds:.0f} ms"
    return f"{seconds:.2f} s"


def format_expires_in(seconds: int) -> str:
    if seconds <= 0:
        return "expired"
    if seconds < 120:
        return f"in {seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"in {minutes} min"
    return f"in {minutes // 60} h {minutes % 60} min"


def format_expiry(token: TokenState) -> str:
    when = token["expires_at"].replace("T", " ").replace("+00:00", " UTC")
    return f"expires {when} ({format_expires_in(token['expires_in_seconds'])})"


STATE_TEXT = {
    "ready": "Signed in · token valid",
    "starting": "Getting the first token…",
    "no_token": "No token",
    "refused": "The service refuses the token",
}
_STATE_CLASS = {"ready": "ok", "starting": "wait", "no_token": "bad", "refused": "bad"}
CREDENTIAL_TEXT = {
    "cli": "cli (Azure CLI: az login)",
    "default": "default (azure-identity's DefaultAzureCredential)",
    "environment": "environment (service principal from AZURE_* variables)",
    "managed-identity": "managed-identity (this machine's managed identity)",
    "workload-identity": "workload-identity (Kubernetes workload identity)",
}


# Client settings with this proxy's URL filled in ------------------------------------------------------


class Client(TypedDict):
    name: str
    where: str
    code: str
    note: str


def client_settings(base_url: str, *, key_required: bool, cors_origins: list[str]) -> list[Client]:
    """What to paste where, for each client; never the key, only where it goes."""
    header = f"{ACCESS_KEY_HEADER}: {KEY_PLACEHOLDER}"
    origins = ", ".join(cors_origins) if cors_origins else "none yet"
    ohif = f"""defaultDataSourceName: 'azure',
dataSources: [
  {{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'azure',
    configuration: {{
      friendlyName: 'Azure DICOM service (dicom-auth-proxy)',
      name: 'azure',
      wadoUriRoot: '{base_url}',
      qidoRoot: '{base_url}',
      wadoRoot: '{base_url}',
      qidoSupportsIncludeField: false,
      supportsReject: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
    }},
  }},
],"""
    weasis = f'$dicom:rs --url "{base_url}" -r "studyUID={STUDY_PLACEHOLDER}"'
    slicer = (
        "from DICOMLib import DICOMUtils\n"
        f'DICOMUtils.importFromDICOMWeb(dicomWebEndpoint="{base_url}", studyInstanceUID="{STUDY_PLACEHOLDER}")'
    )
    python = (
        "from dicomweb_client import DICOMwebClient\n"
        f'client = DICOMwebClient(url="{base_url}"'
        + (f', headers={{"{ACCESS_KEY_HEADER}": "{KEY_PLACEHOLDER}"}}' if key_required else "")
        + ")\nstudies = client.search_for_studies(limit=10)"
    )
    curl = (
        "curl -H 'Accept: application/dicom+json' "
        + (f"-H '{header}' " if key_required else "")
        + f"'{base_url}/studies?limit=10'"
    )
    return [
        {
            "name": "OHIF Viewer",
            "where": "in OHIF's app-config.js, replacing its dataSources (they point at a public demo server)",
            "code": ohif,
            "note": "Start the proxy with --cors-origin set to the origin OHIF is served from, exactly as the "
            "browser's address bar shows it (http://127.0.0.1:3000 is not http://localhost:3000). "
            f"Allowed origins now: {origins}. omitQuotationForMultipartRequest: false works too, but its quoted "
            "Accept header costs a CORS preflight per request."
            + (
                " OHIF sends no fixed header or password (only its own sign-in token): it cannot present the "
                "access key, so run it against a proxy without one."
                if key_required
                else ""
            ),
        },
        {
            "name": "Weasis",
            "where": "as a DICOMweb node with this URL, or launched with this command (URL-encoded after "
            "weasis:// in a link)",
            "code": weasis + (f' -H "{header}"' if key_required else ""),
            "note": "",
        },
        {
            "name": "3D Slicer",
            "where": "in Slicer's Python console (or the DICOMweb Browser extension: server URL above)",
            "code": slicer,
            "note": "importFromDICOMWeb sends its accessToken as a Bearer header, which is not the access key: "
            "with a key set, use dicomweb-client in Slicer's Python console instead."
            if key_required
            else "",
        },
        {"name": "dicomweb-client (Python)", "where": "in a script or notebook", "code": python, "note": ""},
        {"name": "curl", "where": "in a terminal", "code": curl, "note": ""},
    ]


# The page ---------------------------------------------------------------------------------------------

STYLE = """
:root{color-scheme:light dark;--bg:#f4f5f7;--card:#fff;--fg:#1c2230;--muted:#5d6778;--line:#e1e4ea;
--code:#f3f5f8;--accent:#0b5cd5;--ok:#17803d;--okbg:#e6f4ea;--warn:#8a5a00;--bad:#c62828;--badbg:#fdecea;
--waitbg:#fff4d6}
@media (prefers-color-scheme:dark){:root{--bg:#0e1117;--card:#161b22;--fg:#e6e9ef;--muted:#9aa4b2;
--line:#2b313b;--code:#0f141b;--accent:#6ea8fe;--ok:#46c46b;--okbg:#14301d;--warn:#e0a526;--bad:#ff6b60;
--badbg:#3a1716;--waitbg:#3a2e0c}}
*{box-sizing:border-box}
[hidden]{display:none!important}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header{background:var(--card);border-bottom:1px solid var(--line)}
.bar{max-width:1120px;margin:0 auto;padding:14px 24px;display:flex;align-items:center;gap:14px;flex-wrap:wrap}
h1{font-size:19px;margin:0;font-weight:650}
h1 small{font-weight:400;color:var(--muted);font-size:13px;margin-left:6px}
.live{margin-left:auto;color:var(--muted);font-size:13px}
main{max-width:1120px;margin:0 auto;padding:20px 24px 8px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:16px;margin-bottom:16px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 20px}
main>.card{margin-bottom:16px}
h2{font-size:12px;letter-spacing:.07em;text-transform:uppercase;color:var(--muted);margin:0 0 12px;
font-weight:650}
h2 small{text-transform:none;letter-spacing:0;font-weight:400;margin-left:6px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:7px 18px;margin:0}
dt{color:var(--muted)}
dd{margin:0;overflow-wrap:anywhere}
code,pre,.mono{font:13px/1.5 ui-monospace,"SFMono-Regular",Menlo,Consolas,"DejaVu Sans Mono",monospace}
.pill{display:inline-block;padding:3px 11px;border-radius:999px;font-size:13px;font-weight:600}
.pill.ok{background:var(--okbg);color:var(--ok)}
.pill.bad{background:var(--badbg);color:var(--bad)}
.pill.wait{background:var(--waitbg);color:var(--warn)}
.base{display:flex;align-items:center;gap:10px;flex-wrap:wrap;background:var(--code);
border:1px solid var(--line);border-radius:8px;padding:10px 12px;margin:0 0 12px}
.base code{font-size:16px;font-weight:600;color:var(--accent);overflow-wrap:anywhere}
.problem{border-left:4px solid var(--bad);background:var(--badbg);border-radius:6px;padding:10px 14px;
margin-top:14px}
.problem p{margin:0}
.problem .hint{margin-top:6px}
.keynote{border-left:4px solid var(--accent);background:var(--code);border-radius:6px;padding:10px 14px;
margin:0 0 12px}
details{border-top:1px solid var(--line);padding:10px 0}
details:last-of-type{padding-bottom:0}
summary{cursor:pointer;font-weight:600}
summary span{font-weight:400;color:var(--muted);margin-left:8px}
.note{color:var(--muted);margin:8px 0 0}
.snippet{position:relative}
.snippet pre{padding-right:78px}
pre{background:var(--code);border:1px solid var(--line);border-radius:8px;padding:12px 14px;margin:8px 0 0;
white-space:pre-wrap;overflow-wrap:anywhere}
button.copy{position:absolute;top:8px;right:8px;font:12px system-ui,sans-serif;padding:3px 10px;
border:1px solid var(--line);border-radius:6px;background:var(--card);color:var(--fg);cursor:pointer}
.stats{display:grid;grid-template-columns:repeat(5,1fr);gap:10px}
@media (max-width:700px){.stats{grid-template-columns:repeat(2,1fr)}}
.stat{border:1px solid var(--line);border-radius:8px;padding:8px 12px}
.stat b{display:block;font-size:20px;font-weight:650;font-variant-numeric:tabular-nums;white-space:nowrap}
.stat span{color:var(--muted);font-size:12px}
table{width:100%;border-collapse:collapse;font-size:14px;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-size:12px;font-weight:600;text-transform:uppercase;letter-spacing:.05em;
white-space:nowrap}
td{white-space:nowrap}
.path{width:100%}
td.path{overflow-wrap:anywhere;white-space:normal}
td.num,th.num{text-align:right;white-space:nowrap}
tr:last-child td{border-bottom:0}
.s2{color:var(--ok)}.s3{color:var(--accent)}.s4{color:var(--warn)}.s5,.s0{color:var(--bad)}
.s2,.s3,.s4,.s5,.s0{font-weight:600}
.empty{color:var(--muted)}
footer{max-width:1120px;margin:0 auto;padding:4px 24px 28px;color:var(--muted);font-size:13px}
a{color:var(--accent)}
"""

# Re-reads /-/status.json and updates the fields marked data-f; builds table rows with textContent only.
_SCRIPT_TEMPLATE = """
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
    var c = s.counters;
    CLASSES.forEach(function (k) { put("req-" + k, c.requests[k] || 0); });
    put("received", bytes(c.received_bytes));
    put("sent", bytes(c.sent_bytes));
    put("upstream-errors", Object.values(c.upstream_errors).reduce(function (a, b) { return a + b; }, 0));
    put("tokens-ok", c.token_acquisitions.ok);
    put("tokens-error", c.token_acquisitions.error);
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
"""


def _filled(template: str, values: dict[str, str]) -> str:
    """`template` with each `__NAME__` replaced (str.format would trip over the script's braces)."""
    for name, value in values.items():
        template = template.replace(f"__{name}__", value)
    return template


SCRIPT = _filled(
    _SCRIPT_TEMPLATE,
    {
        "STATES": json.dumps(STATE_TEXT, ensure_ascii=False),
        "CLASSES": json.dumps(_STATE_CLASS),
        "STATUS_CLASSES": json.dumps(list(_STATUS_CLASSES)),
        "SECONDS": str(REFRESH_SECONDS),
    },
)


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only the two inline blocks above, fetches to this origin and a data: favicon; no frames, forms or bases.
PAGE_CSP = (
    f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
JSON_CSP = "default-src 'none'; frame-ancestors 'none'"
# A favicon of our own, so that the browser does not ask the proxy (and so the service) for /favicon.ico.
_ICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect width='16' "
    "height='16' rx='4' fill='%230b5cd5'/%3E%3Cpath d='M4 8h8M8 4v8' stroke='white' stroke-width='2'/%3E%3C/svg%3E"
)


def _headers(csp: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _stat(field: str, value: object, label: str) -> str:
    return f'<div class="stat"><b data-f="{field}">{_e(value)}</b><span>{_e(label)}</span></div>'


def _recent_rows(recent: list[Recent]) -> str:
    if not recent:
        return (
            '<tr><td colspan="5" class="empty">No requests yet: point a viewer at the base URL above. '
            "The proxy's own /-/ endpoints are not listed.</td></tr>"
        )
    rows = []
    for entry in recent:
        status = entry["status"]
        status_class = f"s{status // 100}" if status else "s0"
        rows.append(
            f"<tr><td>{_e(entry['time'][11:19])}</td><td>{_e(entry['method'])}</td>"
            f'<td class="path mono">{_e(entry["path"])}</td>'
            f'<td class="num {status_class}">{_e("cut" if status is None else status)}</td>'
            f'<td class="num">{_e(format_duration(entry["seconds"]))}</td></tr>'
        )
    return "".join(rows)


def _clients(snapshot: Snapshot) -> str:
    parts = []
    if snapshot["access_key_required"]:
        parts.append(
            '<p class="keynote">This proxy wants its access key on every request: as the password of HTTP Basic '
            f"authentication (any user name) or in the <code>{_e(ACCESS_KEY_HEADER)}</code> header. "
            f"It is the key given with --access-key-file or DICOM_PROXY_ACCESS_KEY; it is never shown here: "
            f"put it where the settings below say <code>{_e(KEY_PLACEHOLDER)}</code>.</p>"
        )
    settings = client_settings(
        snapshot["base_url"], key_required=snapshot["access_key_required"], cors_origins=snapshot["cors_origins"]
    )
    for number, client in enumerate(settings):
        note = f'<p class="note">{_e(client["note"])}</p>' if client["note"] else ""
        parts.append(
            f"<details{' open' if number == 0 else ''}><summary>{_e(client['name'])}"
            f"<span>{_e(client['where'])}</span></summary>"
            f'<div class="snippet"><pre><code>{_e(client["code"])}</code></pre></div>{note}</details>'
        )
    return "".join(parts)


def render(snapshot: Snapshot) -> str:
    """The page for `snapshot`; every value goes through html.escape."""
    state = snapshot["state"]
    who = snapshot["identity"]
    token = snapshot["token"]
    problem = snapshot["problem"]
    counts = snapshot["counters"]
    requests = counts["requests"]
    policy = ["read-only" if snapshot["read_only"] else "reads and writes"]
    policy.append("access key required" if snapshot["access_key_required"] else "no access key")
    origins = ", ".join(snapshot["cors_origins"]) or "none (browser viewers on other origins are refused)"
    request_stats = "".join(
        _stat(f"req-{name}", requests.get(name, 0), label)
        for name, label in (
            ("2xx", "2xx answers"),
            ("3xx", "3xx answers"),
            ("4xx", "4xx answers"),
            ("5xx", "5xx answers"),
            ("error", "cut off"),
        )
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>dicom-auth-proxy status</title>
<link rel="icon" href="{_ICON}">
<style>{STYLE}</style>
</head>
<body>
<header><div class="bar">
<h1>dicom-auth-proxy<small>{_e(snapshot["version"])}</small></h1>
<span class="pill {_STATE_CLASS[state]}" data-f="state">{_e(STATE_TEXT[state])}</span>
<span class="live" data-f="live">Reload the page for fresh numbers.</span>
</div></header>
<main>
<div class="grid">
<section class="card" id="identity">
<h2>Signed in</h2>
<dl>
<dt>User</dt><dd data-f="user">{_e(who["user"] if who else "—")}</dd>
<dt>Tenant</dt><dd data-f="tenant">{_e(who["tenant"] if who else "—")}</dd>
<dt>Credential</dt><dd>{_e(CREDENTIAL_TEXT.get(snapshot["credential"], snapshot["credential"]))}</dd>
<dt>Token</dt><dd data-f="expiry">{_e(format_expiry(token) if token else "none held")}</dd>
</dl>
<div class="problem" data-f="problem"{"" if problem else " hidden"}>
<p data-f="detail">{_e(problem["detail"] if problem else "")}</p>
<p class="hint" data-f="hint">{_e("Hint: " + problem["hint"] if problem else "")}</p>
</div>
</section>
<section class="card" id="forwarding">
<h2>DICOMweb base URL <small>paste this into your viewer</small></h2>
<div class="base"><code id="base-url">{_e(snapshot["base_url"])}</code></div>
<dl>
<dt>Upstream</dt><dd class="mono">{_e(snapshot["upstream"])}</dd>
<dt>Audience</dt><dd class="mono">{_e(snapshot["audience"])}</dd>
<dt>Policy</dt><dd>{_e(", ".join(policy))}</dd>
<dt>CORS origins</dt><dd>{_e(origins)}</dd>
</dl>
</section>
</div>
<section class="card" id="clients">
<h2>Connect a client <small>settings with this proxy's URL filled in</small></h2>
{_clients(snapshot)}
</section>
<section class="card" id="counters">
<h2>Counters <small>since start, every path (this page's refreshes too)</small></h2>
<div class="stats">
{request_stats}
{_stat("received", format_bytes(counts["received_bytes"]), "received from clients")}
{_stat("sent", format_bytes(counts["sent_bytes"]), "sent to clients")}
{_stat("upstream-errors", sum(counts["upstream_errors"].values()), "upstream errors")}
{_stat("tokens-ok", counts["token_acquisitions"]["ok"], "tokens acquired")}
{_stat("tokens-error", counts["token_acquisitions"]["error"], "token failures")}
</div>
</section>
<section class="card" id="recent">
<h2>Recent requests <small>last {RECENT_LIMIT}, newest first; paths without their query</small></h2>
<table>
<thead><tr><th>Time (UTC)</th><th>Method</th><th class="path">Path</th><th class="num">Status</th>
<th class="num">Duration</th></tr></thead>
<tbody data-f="recent">{_recent_rows(snapshot["recent"])}</tbody>
</table>
</section>
</main>
<footer>For scripts: <a href="/-/status.json">/-/status.json</a> ·
<a href="/-/metrics">/-/metrics</a> · <a href="/-/ready">/-/ready</a> · <a href="/-/health">/-/health</a></footer>
<script>{SCRIPT}</script>
</body>
</html>
"""


class StatusPage:
    """`/-/` and `/-/status.json`: the proxy's state, read from the parts that hold it when asked.

    `base_url` turns the origin the client used (its allowed Host) into the DICOMweb base URL to paste.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tokens: TokenSource,
        registry: CollectorRegistry,
        recent: deque[RecentRequest],
        base_url: Callable[[str], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._registry = registry
        self._recent = recent
        self._base_url = base_url
        self._clock = clock

    def snapshot(self, request: web.BaseRequest) -> Snapshot:
        settings, tokens = self._settings, self._tokens
        token = tokens.current
        failure: ProxyError | None = tokens.refusal or tokens.last_error
        if tokens.refusal is not None:
            state = "refused"
        elif token is not None:
            state = "ready"
        else:
            state = "no_token" if failure is not None else "starting"
        return {
            "version": __version__,
            "state": state,
            "identity": identity(token.claims) if token is not None else None,
            "token": {
                "expires_at": expiry_text(token.expires_on),
                "expires_in_seconds": max(0, int(token.expires_on - self._clock())),
            }
            if token is not None
            else None,
            # With a token still held, a failed refresh is shown too: it will matter once the token expires.
            "problem": _problem(failure) if failure is not None else None,
            "credential": settings.credential,
            "audience": settings.audience,
            "upstream": str(settings.upstream),
            "base_url": self._base_url(local_origin(request)),
            "access_key_required": settings.access_key is not None,
            "access_key_header": ACCESS_KEY_HEADER,
            "read_only": settings.read_only,
            "cors_origins": list(settings.cors_origins),
            "counters": counters(self._registry),
            "recent": _recent(self._recent),
        }

    async def page(self, request: web.BaseRequest) -> web.Response:
        return web.Response(text=render(self.snapshot(request)), content_type="text/html", headers=_headers(PAGE_CSP))

    async def json(self, request: web.BaseRequest) -> web.Response:
        body = json.dumps(self.snapshot(request), indent=2, ensure_ascii=False)
        return web.Response(text=body, content_type="application/json", headers=_headers(JSON_CSP))
