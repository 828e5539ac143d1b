"""The MLLP listener: orders from the RIS, each answered with an HL7 v2 ACK.

One asyncio server (python-hl7's MLLP framing) serves every client; a slow or silent client
holds nothing but its own connection. What each input gets:

- a client whose address no configured sender has (``TRIAGE_RIS_SENDERS``), and which did not
  present a certificate of ``TRIAGE_RIS_TLS_CA`` over TLS: the connection is closed at once;
- ORM^O01 or OMI^O23 from an admitted sender, read and stored: ``AA``;
- a message that is not HL7 v2, of another type or version, from an application or facility
  (MSH-3/MSH-4) no sender has: ``AR`` with the reason in MSA-3;
- an order that says too little (no order control, neither a Study Instance UID nor an
  accession number with a patient ID) or that cannot be stored now (Redis down): ``AE``;
- bytes outside an MLLP frame, a frame larger than ``TRIAGE_RIS_MAX_MESSAGE_BYTES``, a frame cut
  by the end of the connection: the connection is closed (the stream cannot be trusted to find
  the next frame), without an answer;
- nothing for ``TRIAGE_RIS_IDLE_SECONDS`` (between messages, or inside one): closed.

Everything not answered ``AA`` is kept for administrators (``store.rejected_messages``) and
logged without patient data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import hl7
import redis
from hl7.mllp import start_hl7_server

from triage.ris import intake, store
from triage.ris.orders import OrderError, header, message_type, parse_message, read_orders
from triage.settings import RisSender, Settings

log = logging.getLogger(__name__)

# An ACK to a message too broken to answer from its own header.
_BLANK_HEADER = "MSH|^~\\&|||||||ACK^||P|2.5.1"
WRITE_SECONDS = 10.0
START_BLOCK = b"\x0b"
END = b"\x1c\r"


@dataclass(frozen=True)
class Peer:
    address: str
    certificate: bool  # presented a certificate the CA signed (TLS with client certificates)
    subject: str = ""

    def senders(self, settings: Settings) -> list[RisSender]:
        return [s for s in settings.ris_senders if s.host is None or s.host == self.address]


@dataclass(frozen=True)
class Answer:
    code: str  # AA, AE, AR
    text: str
    ack: bytes


def _now() -> datetime:
    return datetime.now(UTC)


def decode(block: bytes) -> str:
    """HL7 text from a frame: UTF-8 when it is valid UTF-8 (ASCII included), else Latin-1
    (the 8859/1 character set most RIS products send otherwise)."""
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        return block.decode("latin-1")


def acknowledgement(message: hl7.Message | None, code: str, text: str,
                    settings: Settings) -> bytes:
    """The ACK of ``message`` (MSA-2 its MSH-10), or of a message too broken to answer from
    its own header (then MSA-2 is its MSH-10 when that much could be read)."""
    ack = None
    if message is not None:
        try:
            ack = message.create_ack(code, message_id=_control_id(message),
                                     application=settings.hl7_application,
                                     facility=settings.hl7_facility or None)
        except Exception:  # a header python-hl7 cannot answer from (MSH-9 of one component)
            ack = None
    if ack is None:
        blank = hl7.parse(_BLANK_HEADER)
        ack = blank.create_ack(code, message_id=_control_id(message or blank),
                               application=settings.hl7_application,
                               facility=settings.hl7_facility or None)
        control = header(message, "MSH.10") if message is not None else ""
        if control:
            ack["MSA.2"] = blank.escape(control[:20])
    if text:
        ack["MSA.3"] = ack.escape(text[:80])
    return str(ack).encode("utf-8")


def _control_id(message: hl7.Message) -> str:
    """A control id for our ACK: derived from the message's own, so it is unique per answer."""
    try:
        own = str(message["MSH.10"])
    except (KeyError, IndexError):
        own = ""
    # Only plain characters: the sender's value (unescaped by the parser) must not be able
    # to write delimiters, or a segment, into our header.
    own = re.sub(r"[^A-Za-z0-9._-]", "", own)
    return f"A{own}"[:20] if own else f"A{int(_now().timestamp() * 1000)}"


def _admitted(message: hl7.Message, peer: Peer, settings: Settings) -> str | None:
    """The name of the configured sender the message comes from, or None."""
    application, facility = header(message, "MSH.3.1.1"), header(message, "MSH.4.1.1")
    for sender in peer.senders(settings):
        if sender.application is not None and sender.application != application:
            continue
        if sender.facility is not None and sender.facility != facility:
            continue
        return sender.name
    if peer.certificate and not settings.ris_senders:
        return f"tls:{peer.subject}"[:32]
    return None


def answer(block: bytes, peer: Peer, connection: redis.Redis, settings: Settings) -> Answer:
    """Read one framed message, take its orders, and say what the sender gets."""
    text = decode(block)
    message, sender = None, None
    try:
        message = parse_message(text)
        sender = _admitted(message, peer, settings)
        if sender is None:
            raise OrderError("AR", "sender not admitted (MSH-3/MSH-4 and address are not "
                                   "those of a configured RIS sender)")
        orders = read_orders(message, sender=sender, received_at=_now(),
                             zone=settings.site_zone)
        try:
            for order in orders:
                intake.take(connection, order, days=settings.ris_order_days)
        except redis.RedisError as error:
            raise OrderError("AE", "the order could not be stored now; send it again") from error
    except OrderError as refused:
        kind = ""
        if message is not None:
            kind = "^".join(p for p in message_type(message) if p)
        _keep(connection, peer, refused.answer, refused.reason, len(block), text,
              message_type=kind,
              control_id=header(message, "MSH.10")[:64] if message is not None else "",
              sender=sender)
        return Answer(refused.answer, refused.reason,
                      acknowledgement(message, refused.answer, refused.reason, settings))
    log.info("order message from %s taken (%d order%s)", sender, len(orders),
             "" if len(orders) == 1 else "s")
    return Answer("AA", "", acknowledgement(message, "AA", "", settings))


def _keep(connection: redis.Redis, peer: Peer, answer_code: str, reason: str, size: int,
          text: str, *, message_type: str = "", control_id: str = "",
          sender: str | None = None) -> None:
    log.warning("HL7 message from %s not accepted: %s (%s)", peer.address, reason, answer_code)
    try:
        store.keep_rejected(connection, store.RejectedMessage(
            at=_now(), peer=peer.address, sender=sender or "", answer=answer_code,
            reason=reason, message_type=message_type[:16], control_id=control_id[:64],
            size=size, excerpt=text[:store.EXCERPT_CHARS].replace("\r", "\n")))
    except redis.RedisError as error:
        log.warning("rejected HL7 message not kept (%s)", type(error).__name__)


class Listener:
    """The MLLP server; ``start`` it in a running event loop."""

    def __init__(self, settings: Settings, connection: redis.Redis) -> None:
        self.settings = settings
        self.connection = connection
        self.server: asyncio.Server | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        settings = self.settings
        if settings.ris_tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.ris_tls_cert, settings.ris_tls_key)
        if settings.ris_tls_ca is not None:
            context.load_verify_locations(settings.ris_tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def start(self) -> asyncio.Server:
        self.server = await start_hl7_server(
            self._client, self.settings.ris_listen_host, self.settings.ris_listen_port,
            limit=self.settings.ris_max_message_bytes, ssl=self.tls_context())
        return self.server

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    def _peer(self, writer: asyncio.StreamWriter) -> Peer:
        address = writer.get_extra_info("peername")
        host = str(address[0]) if address else ""
        certificate = writer.get_extra_info("peercert")
        subject = ""
        if certificate:
            for entry in certificate.get("subject", ()):
                for name, value in entry:
                    if name == "commonName":
                        subject = str(value)
        return Peer(host, bool(certificate) and self.settings.ris_tls_ca is not None, subject)

    async def _client(self, reader: hl7.mllp.HL7StreamReader,
                      writer: hl7.mllp.HL7StreamWriter) -> None:
        peer = self._peer(writer)
        try:
            if not peer.senders(self.settings) and not peer.certificate:
                _keep(self.connection, peer, "closed", "address not admitted", 0, "")
                return
            await self._serve(peer, reader, writer)
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError, OSError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), WRITE_SECONDS)

    async def _serve(self, peer: Peer, reader: hl7.mllp.HL7StreamReader,
                     writer: hl7.mllp.HL7StreamWriter) -> None:
        idle = self.settings.ris_idle_seconds
        while True:
            try:
                start = await asyncio.wait_for(reader.readexactly(1), idle)
                while start in (b"\r", b"\n"):  # line ends some senders put between frames
                    start = await asyncio.wait_for(reader.readexactly(1), idle)
                if start != START_BLOCK:
                    _keep(self.connection, peer, "closed", "bytes outside an MLLP frame", 0,
                          "")
                    return
                block = (await asyncio.wait_for(reader.readuntil(END), idle))[:-len(END)]
            except TimeoutError:
                log.info("HL7 client %s silent for %.0f s: disconnected", peer.address, idle)
                return
            except asyncio.IncompleteReadError as error:
                if error.partial.strip():
                    _keep(self.connection, peer, "closed", "frame cut by the end of the "
                          "connection", len(error.partial), decode(error.partial))
                return
            except asyncio.LimitOverrunError:
                _keep(self.connection, peer, "closed", "message larger than "
                      f"{self.settings.ris_max_message_bytes} bytes", 0, "")
                return
            reply = await asyncio.to_thread(answer, block, peer, self.connection,
                                            self.settings)
            writer.writeblock(reply.ack)
            await asyncio.wait_for(writer.drain(), WRITE_SECONDS)


HEARTBEAT_SECONDS = 10
HEARTBEAT_KEY = f"{store.PREFIX}:listener"


def heartbeat_key(host: str) -> str:
    """Set while the listener of ``host`` (its host name) runs: its health check."""
    return f"{HEARTBEAT_KEY}:{host}"


async def _heartbeat(connection: redis.Redis, stop: asyncio.Event) -> None:
    key = heartbeat_key(socket.gethostname())
    while not stop.is_set():
        try:
            await asyncio.to_thread(connection.set, key, _now().isoformat(),
                                    ex=3 * HEARTBEAT_SECONDS)
        except redis.RedisError as error:
            log.warning("listener heartbeat not written (%s)", type(error).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HEARTBEAT_SECONDS)


def serve(settings: Settings, connection: redis.Redis,
          ready: Callable[[int], None] | None = None) -> None:
    """Run the listener until SIGTERM or SIGINT."""

    async def main() -> None:
        listener = Listener(settings, connection)
        server = await listener.start()
        log.info("MLLP listener on %s:%d (%d senders%s)", settings.ris_listen_host,
                 listener.port, len(settings.ris_senders),
                 ", TLS" if settings.ris_tls_cert else "")
        if ready is not None:
            ready(listener.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        beating = asyncio.create_task(_heartbeat(connection, stop))
        async with server:
            await stop.wait()
        await beating

    asyncio.run(main())
