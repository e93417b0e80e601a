"""The proxy's own errors, each knowing the status and JSON body a client gets.

    ProxyError                      (500) anything the proxy itself refuses or fails at
     ├── ConfigurationError         bad settings; the CLI prints one line and exits 2 (never sent over HTTP)
     ├── TokenUnavailable           (503) no token can be had from the credential
     ├── TokenRefused               (503) the service refuses every token it is given (audience, role)
     ├── NotReady                   (503) /-/ready before the first token
     ├── UpstreamUnreachable        (502) the upstream cannot be connected to or broke before answering
     ├── UpstreamTimeout            (504) the upstream did not answer in time
     ├── RequestRefused             (400) a request the proxy will not forward (bad target, bad framing)
     ├── ClientTimeout              (408) the client went silent while sending its request
     ├── ExpectationFailed          (417) an Expect header other than 100-continue
     ├── NotFound                   (404) a local endpoint that does not exist
     ├── PolicyRefused              (403) a request the policy forbids
     ├── HostNotAllowed             (421) a Host header outside the allowlist
     └── AccessKeyRequired          (401) the local access key is missing or wrong

Errors of azure-identity and aiohttp are translated into these at their boundary (tokens.py, forward.py),
and app.py is the single place where they become HTTP responses. Nothing here knows about HTTP servers.
"""

from __future__ import annotations

import re

# C0 and C1 control characters and DEL, Unicode line and paragraph separators, and the invisible format
# characters that reorder or hide text (bidi overrides, zero-width): a logged path holding them could
# forge log lines, drive a terminal or show one thing while saying another.
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]"
)


def loggable(text: str, limit: int = 300) -> str:
    """`text` (a client's path) with control characters escaped, cut to `limit`, safe for one log line."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class ProxyError(Exception):
    """Base of the tree; `code` is the short machine-readable name in the JSON body."""

    status = 500
    code = "internal_error"
    hint = "This is a bug in dicom-auth-proxy; please report it with the log lines around it."

    def __init__(self, detail: str, *, hint: str | None = None, retry_after: int | None = None) -> None:
        """`retry_after`: whole seconds after which trying again can succeed (the Retry-After header)."""
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        if hint is not None:
            self.hint = hint

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail, "hint": self.hint}


class ConfigurationError(ProxyError):
    code = "configuration_error"
    hint = "Run 'dicom-auth-proxy serve --help' for the accepted options."


class TokenUnavailable(ProxyError):
    status = 503
    code = "token_unavailable"
    hint = (
        "Sign in with 'az login' (and 'az account set --subscription ...' if needed), "
        "then retry; run 'dicom-auth-proxy check' to diagnose."
    )


class TokenRefused(ProxyError):
    status = 503
    code = "token_refused"
    hint = (
        "A 401 naming the audience means --audience is wrong (use https://dicom.healthcareapis.azure.com); "
        "otherwise give the identity a DICOM role on the service. Run 'dicom-auth-proxy check' to see which."
    )


class NotReady(ProxyError):
    status = 503
    code = "not_ready"
    hint = "Wait a moment and retry."


class UpstreamUnreachable(ProxyError):
    status = 502
    code = "upstream_unreachable"
    hint = "Check the --upstream URL, your network, HTTPS_PROXY/NO_PROXY and --ca-bundle."


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"
    hint = "The DICOM service is slow or unreachable; retry, or check your network."


class RequestRefused(ProxyError):
    status = 400
    code = "bad_request"
    hint = "Send an origin-form request such as 'GET /v2/studies HTTP/1.1' to the proxy."


class ClientTimeout(ProxyError):
    status = 408
    code = "request_timeout"
    hint = "Send the whole request without pausing longer than the proxy's --read-timeout."


class ExpectationFailed(ProxyError):
    status = 417
    code = "expectation_failed"
    hint = "Only 'Expect: 100-continue' is understood; send the request without another Expect."


class NotFound(ProxyError):
    status = 404
    code = "not_found"
    hint = "Local endpoints: /-/ (status page), /-/status.json, /-/health, /-/ready, /-/metrics."


class PolicyRefused(ProxyError):
    status = 403
    code = "forbidden"
    hint = "The proxy's policy (for example --read-only) does not allow this request."


class HostNotAllowed(ProxyError):
    status = 421
    code = "host_not_allowed"
    hint = "Use http://localhost:<port>, or add this name with --allow-host."


class AccessKeyRequired(ProxyError):
    status = 401
    code = "access_key_required"
    hint = "Send the proxy's access key as the Basic auth password or in the X-Dicom-Proxy-Key header."
