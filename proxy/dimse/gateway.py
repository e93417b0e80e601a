"""The DIMSE gateway: a pynetdicom AE in the proxy's process, its association policy and its bridge to the loop.

pynetdicom runs each association in threads of its own. Its event handlers (proxy/dimse/services.py) stay
thin: they ask the one DICOMweb client, which lives on the proxy's event loop, through `LoopBridge`
(`asyncio.run_coroutine_threadsafe(...).result(timeout)`), so the loop never waits on an association and the
HTTP side and the gateway share one TokenSource and one upstream session.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from pathlib import Path, PurePath
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts

from ..errors import ConfigurationError, loggable
from ..metrics import Metrics
from ..settings import Settings, is_loopback
from .bridge import LoopBridge
from .client import DicomWebClient
from .report import Report
from .services import Services
from .syntaxes import QUERY_RETRIEVE, TRANSFER_SYNTAXES, UNCOMPRESSED, VERIFICATION
from .wire import (
    AE_VALIDATOR,
    DIMSE_PROVIDER,
    RECEIVING_MESSAGE,
    RECEIVING_MESSAGE_ATTRIBUTES,
    pack_final_get_responses,
)

logger = logging.getLogger("proxy.dimse")

# Associations served at once; each costs two threads.
MAXIMUM_ASSOCIATIONS = 64
# A-ASSOCIATE-RJ diagnostics (PS3.8 9.3.4): rejected-permanent, by the service user.
_CALLING_AE_NOT_RECOGNIZED = 0x03
_CALLED_AE_NOT_RECOGNIZED = 0x07
# What an AE title may hold (PS3.5 6.2, AE): no backslash, no control character.
_AE_FORBIDDEN = frozenset("\\") | frozenset(map(chr, range(32))) | {chr(127)}


def _any_ae(value: str) -> tuple[bool, str]:
    """pynetdicom's AE validator, for the titles it decodes from a peer's association request.

    pynetdicom refuses a malformed title while decoding the request, which ends in an A-ABORT and a traceback
    in the log; accepted here, the title reaches `association_refusal`, which rejects it properly.
    """
    return True, ""


def well_formed_ae(title: str) -> bool:
    return bool(title.strip()) and len(title) <= 16 and not any(char in _AE_FORBIDDEN for char in title)


def association_refusal(settings: Settings, called_ae: str, calling_ae: str, address: str) -> int | None:
    """Why an association must be rejected (an A-ASSOCIATE-RJ diagnostic), or None to accept it."""
    if called_ae.strip() != settings.dimse_aet:
        return _CALLED_AE_NOT_RECOGNIZED
    calling_ae = calling_ae.strip()
    if not well_formed_ae(calling_ae):
        return _CALLING_AE_NOT_RECOGNIZED
    if not settings.dimse_allow:
        return None if is_loopback(_plain_address(address)) else _CALLING_AE_NOT_RECOGNIZED
    for title, host in settings.dimse_allow:
        if title == calling_ae and (host is None or host == _plain_address(address)):
            return None
    return _CALLING_AE_NOT_RECOGNIZED


def _plain_address(address: str) -> str:
    """An IPv4-mapped IPv6 peer (::ffff:192.0.2.1) as the IPv4 address an allow list names."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = getattr(parsed, "ipv4_mapped", None)
    return str(mapped or parsed)


def _prefer_stored_syntaxes_for_retrieval(event: Event) -> None:
    """For storage SOP classes a C-GET requester takes the SCP role for, pick compressed syntaxes first.

    The gateway sends what the service stored and converts only between uncompressed syntaxes: a requester
    that offers JPEG beside Explicit VR Little Endian in one context gets JPEG instances as they are. A
    storescu, which offers the opposite role, keeps the uncompressed-first order, so that the gateway never
    makes it compress what it holds uncompressed. (These are the association's own copies of the contexts.)
    """
    retrieving = {uid for uid, item in event.assoc.requestor.role_selection.items() if item.scp_role}
    if not retrieving:
        return
    contexts = event.assoc.acceptor.supported_contexts
    for context in contexts:
        if context.abstract_syntax in retrieving:
            context.transfer_syntax = [*TRANSFER_SYNTAXES[len(UNCOMPRESSED) :], *UNCOMPRESSED]
    event.assoc.acceptor.supported_contexts = contexts


def _application_entity(title: str) -> AE:
    """The gateway's AE with every context it serves."""
    ae = AE(ae_title=title)
    ae.require_called_aet = True
    ae.maximum_associations = MAXIMUM_ASSOCIATIONS
    ae.add_supported_context(VERIFICATION, list(TRANSFER_SYNTAXES[:3]))
    for sop_class in QUERY_RETRIEVE:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES[:3]))
    for storage in AllStoragePresentationContexts:
        # Both roles: a storescu sends to the gateway; a getscu takes the SCP role for C-GET's C-STOREs.
        assert storage.abstract_syntax is not None
        ae.add_supported_context(storage.abstract_syntax, list(TRANSFER_SYNTAXES), scu_role=True, scp_role=True)
    return ae


class Gateway:
    """The AE: `start()` listens (non-blocking), `close()` aborts associations and stops listening."""

    def __init__(self, settings: Settings, *, client: DicomWebClient, metrics: Metrics) -> None:
        assert settings.dimse_listen is not None, "the gateway needs --dimse-listen"
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.report = Report(metrics)
        self._ae: AE | None = None

    def start(self) -> None:
        settings = self.settings
        assert settings.dimse_listen is not None
        bridge = LoopBridge(asyncio.get_running_loop(), settings.connect_timeout + settings.read_timeout)
        # Received instances go to a temporary file as they arrive, never whole into memory; identifiers
        # (patient names and IDs) stay out of pynetdicom's log, which is kept to warnings.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        _config.VALIDATORS[AE_VALIDATOR] = _any_ae

        ae = _application_entity(settings.dimse_aet)
        services = Services(settings, bridge=bridge, client=self.client, report=self.report)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._requested),
            (evt.EVT_C_ECHO, services.echo),
            (evt.EVT_C_STORE, services.store),
            (evt.EVT_C_FIND, services.find),
            (evt.EVT_C_GET, services.get),
            (evt.EVT_C_MOVE, services.move),
            (evt.EVT_CONN_CLOSE, self._discard_partial_store),
        ]
        host, port = settings.dimse_listen
        try:
            ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as error:
            raise ConfigurationError(f"--dimse-listen: cannot listen on {host}:{port}: {error.strerror}") from error
        self._ae = ae
        logger.info(
            "DIMSE gateway: AE title %s on %s:%d, calling AEs %s, move destinations %s",
            settings.dimse_aet,
            host,
            port,
            ", ".join(f"{title}@{where}" if where else title for title, where in settings.dimse_allow)
            or "any from loopback",
            ", ".join(f"{title}={where}:{port}" for title, where, port in settings.move_destinations) or "none",
        )

    async def close(self) -> None:
        if self._ae is not None:
            # In a thread: shutting down waits for handlers, which may be waiting on this loop.
            await asyncio.to_thread(self._ae.shutdown)
            self._ae = None

    def _discard_partial_store(self, event: Event) -> None:
        """Delete the temporary file of a C-STORE cut off mid-transfer: it holds patient data.

        pynetdicom deletes a received instance's file only after the C-STORE handler ran, which it never
        does for an instance whose association broke while it arrived (pynetdicom's DIMSE message keeps
        the file until the next one; these attributes are its own).
        """
        message = getattr(getattr(event.assoc, DIMSE_PROVIDER, None), RECEIVING_MESSAGE, None)
        handle, path = (getattr(message, name, None) for name in RECEIVING_MESSAGE_ATTRIBUTES)
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()
        if isinstance(path, PurePath):
            with contextlib.suppress(OSError):
                Path(path).unlink(missing_ok=True)
            self.report.warn("an association closed while an instance arrived; its partial copy was deleted")

    def _requested(self, event: Event) -> None:
        """The association policy, before pynetdicom negotiates: called AE, then calling AE and address."""
        requestor = event.assoc.requestor
        primitive = requestor.primitive
        assert primitive is not None
        called, calling = str(primitive.called_ae_title), str(primitive.calling_ae_title)
        address = str(requestor.address)
        refusal = association_refusal(self.settings, called, calling, address)
        if refusal is None:
            self.metrics.dimse_associations.labels(result="accepted").inc()
            _prefer_stored_syntaxes_for_retrieval(event)
            pack_final_get_responses(event.assoc)
            return
        self.metrics.dimse_associations.labels(result="rejected").inc()
        reason = (
            f"this gateway's AE title is {self.settings.dimse_aet} (--dimse-aet)"
            if refusal == _CALLED_AE_NOT_RECOGNIZED
            else "the calling AE is not allowed here (--dimse-allow AET[@HOST])"
        )
        self.report.warn(
            f"association from {address} (calling AE {loggable(calling.strip(), 16)}, "
            f"called AE {loggable(called.strip(), 16)}) rejected: {reason}"
        )
        event.assoc.acse.send_reject(0x01, 0x01, refusal)
        event.assoc.kill()
