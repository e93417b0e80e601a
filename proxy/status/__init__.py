"""The status page (`/-/`) and its JSON (`/-/status.json`), for the person setting up a viewer.

One self-contained page: who is signed in, the token's state, what the proxy forwards to, the DICOMweb base
URL and ready-to-copy client settings, the counters and the last requests, and a warning while the service
refuses the forwarded requests. It is rendered on the server (everything but live refresh works with
JavaScript off); its one script re-reads `/-/status.json` every few seconds. The page is files
(`page.html`, `page.css`, `page.js`), so a web developer can edit it without reading Python.

    snapshot.py   the facts, read from the token source, the metrics and the last requests when asked
    clients.py    ready-to-copy settings for each client
    page.py       the files, filled with escaped values; the Content-Security-Policy from their hashes
    endpoints.py  StatusPage: the two answers
"""

from .endpoints import StatusPage
from .page import format_bytes, format_duration, format_expires_in
from .snapshot import RecentRequest, recent_requests

__all__ = ["RecentRequest", "StatusPage", "format_bytes", "format_duration", "format_expires_in", "recent_requests"]
