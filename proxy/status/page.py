"""The page itself: `page.html`, `page.css` and `page.js` beside this module, filled from a snapshot.

The files are read once, at import. Every value reaches the HTML through `html.escape` (`string.Template`
over escaped values); the few fragments that are markup (rows, counters, client settings) are built here
from escaped values too. The Content-Security-Policy's hashes are computed from the files as served, so
editing the page can never desynchronise the policy.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from importlib.resources import files
from string import Template

from ..guard import ACCESS_KEY_HEADER
from .clients import KEY_PLACEHOLDER, client_settings
from .snapshot import RECENT_LIMIT, STATUS_CLASSES, Recent, Snapshot, TokenState

REFRESH_SECONDS = 3

STATE_TEXT = {
    "ready": "Signed in · token valid",
    "starting": "Getting the first token…",
    "no_token": "No token",
    "refused": "The service refuses the token",
    "denied": "Signed in · the service refuses requests",
}
_STATE_CLASS = {"ready": "ok", "starting": "wait", "no_token": "bad", "refused": "bad", "denied": "bad"}
CREDENTIAL_TEXT = {
    "cli": "cli (Azure CLI: az login)",
    "default": "default (azure-identity's DefaultAzureCredential)",
    "environment": "environment (service principal from AZURE_* variables)",
    "managed-identity": "managed-identity (this machine's managed identity)",
    "workload-identity": "workload-identity (Kubernetes workload identity)",
}
_REQUEST_STATS = (
    ("2xx", "2xx answers"),
    ("3xx", "3xx answers"),
    ("4xx", "4xx answers"),
    ("5xx", "5xx answers"),
    ("error", "cut off"),
)
# A favicon of our own, so that the browser does not ask the proxy (and so the service) for /favicon.ico.
_ICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect width='16' "
    "height='16' rx='4' fill='%230b5cd5'/%3E%3Cpath d='M4 8h8M8 4v8' stroke='white' stroke-width='2'/%3E%3C/svg%3E"
)


def _read(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


def _filled(script: str, values: dict[str, str]) -> str:
    """`script` with each `__NAME__` replaced (the script's own braces and dollars stay as they are)."""
    for name, value in values.items():
        script = script.replace(f"__{name}__", value)
    return script


TEMPLATE = Template(_read("page.html"))
STYLE = _read("page.css")
SCRIPT = _filled(
    _read("page.js"),
    {
        "STATES": json.dumps(STATE_TEXT, ensure_ascii=False),
        "CLASSES": json.dumps(_STATE_CLASS),
        "STATUS_CLASSES": json.dumps(list(STATUS_CLASSES)),
        "SECONDS": str(REFRESH_SECONDS),
    },
)


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only the page's script and style, fetches to this origin and a data: favicon; no frames, forms or bases.
PAGE_CSP = (
    f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
JSON_CSP = "default-src 'none'; frame-ancestors 'none'"


# Formatting, mirrored by page.js (keep the two alike) --------------------------------------------------


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


# The page -------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render(snapshot: Snapshot) -> str:
    """The page for `snapshot`: plain values escaped here, markup fragments built from escaped values."""
    state, who, token = snapshot["state"], snapshot["identity"], snapshot["token"]
    problem, refusals = snapshot["problem"], snapshot["refusals"]
    policy = ["read-only" if snapshot["read_only"] else "reads and writes"]
    policy.append("access key required" if snapshot["access_key_required"] else "no access key")
    text = {
        "version": snapshot["version"],
        "state_class": _STATE_CLASS[state],
        "state_text": STATE_TEXT[state],
        "user": who["user"] if who else "—",
        "tenant": who["tenant"] if who else "—",
        "credential": CREDENTIAL_TEXT.get(snapshot["credential"], snapshot["credential"]),
        "expiry": format_expiry(token) if token else "none held",
        "problem_detail": problem["detail"] if problem else "",
        "problem_hint": "Hint: " + problem["hint"] if problem else "",
        "refusals_text": refusals["text"] if refusals else "",
        "base_url": snapshot["base_url"],
        "upstream": snapshot["upstream"],
        "audience": snapshot["audience"],
        "policy": ", ".join(policy),
        "origins": ", ".join(snapshot["cors_origins"]) or "none (browser viewers on other origins are refused)",
        "recent_limit": RECENT_LIMIT,
    }
    markup = {
        "icon": _ICON,
        "style": STYLE,
        "script": SCRIPT,
        "problem_hidden": "" if problem else " hidden",
        "refusals_hidden": "" if refusals else " hidden",
        "clients": _clients(snapshot),
        "stats": _stats(snapshot),
        "recent_rows": _recent_rows(snapshot["recent"]),
    }
    return TEMPLATE.substitute({name: _e(value) for name, value in text.items()}, **markup)


def _stat(field: str, value: object, label: str) -> str:
    return f'<div class="stat"><b data-f="{field}">{_e(value)}</b><span>{_e(label)}</span></div>'


def _stats(snapshot: Snapshot) -> str:
    counts = snapshot["counters"]
    stats = [_stat(f"req-{name}", counts["requests"].get(name, 0), label) for name, label in _REQUEST_STATS]
    stats += [
        _stat("received", format_bytes(counts["received_bytes"]), "received from clients"),
        _stat("sent", format_bytes(counts["sent_bytes"]), "sent to clients"),
        _stat("upstream-errors", sum(counts["upstream_errors"].values()), "upstream errors"),
        _stat("tokens-ok", counts["token_acquisitions"]["ok"], "tokens acquired"),
        _stat("tokens-error", counts["token_acquisitions"]["error"], "token failures"),
    ]
    read_ahead = counts["read_ahead"]
    if read_ahead is not None:
        stats += [
            _stat("read-ahead-hits", read_ahead["hits"], "frames served from read-ahead"),
            _stat("read-ahead-misses", read_ahead["misses"], "read-ahead misses"),
            _stat("read-ahead-wasted", format_bytes(read_ahead["wasted_bytes"]), "read ahead, never asked for"),
        ]
    return "\n".join(stats)


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
