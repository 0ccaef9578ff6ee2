"""KV chunks on plain TCP connections beside the ``PullBlocks`` call that negotiated them.

Why: a Python gRPC stream copies every message into and out of a Python ``bytes`` on the
event loop, under the GIL; on the GPU host it moved 45–55% of what a raw loopback socket does
even as opaque bytes, whatever the stream count (``bench/kv_transfer.py``). Here each side
moves a chunk with socket calls in a worker thread, which hold no GIL while the kernel copies:
the receiver reads a chunk straight into one buffer and writes it into the reserved pool
blocks from there, as it does with a gRPC message.

What stays on gRPC: the pull itself (the request, its deadline, its final status, the mesh
token or mTLS that guards ``KvTransfer``). The sender answers a pull that asks for TCP
(``PullBlocksRequest.tcp_connections``) with a port and a one-time token; a connection must
open with that token within ``HELLO_TIMEOUT_S`` and gets the share of chunks dealt to its
index. The token is only ever sent on the guarded call, so a connection that presents it
comes from the caller that passed the guard. Chunks keep their encoding and checksums
(``kv_wire.py``); only the framing differs: an 8-byte little-endian length before each, 0 to
end. Plaintext, so a worker running TLS never offers it.

Threads: sockets stay non-blocking. Waiting for a frame (a prefill can take seconds) happens on
the event loop and costs no thread; a frame's bytes move in a thread of this module's own pools
(``_SENDING``, ``_RECEIVING``: a sender blocked on a slow receiver never holds up a receiving
thread), which polls when the kernel's buffer runs empty or full, so a stalled peer can hold one
of these threads for at most ``FRAME_TIMEOUT_S``, never one of the default pool's. A socket is
closed only once no thread uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from services.worker.kv_wire import TransferError
from services.worker.transfer_streams import UNCLAIMED_S

log = logging.getLogger(__name__)

TOKEN_BYTES = 16
HELLO_TIMEOUT_S = 5.0
# Connections still to send their hello: past this many, new ones are closed at once (each costs
# a socket until its hello or its timeout, and no token is needed to open one).
MAX_UNIDENTIFIED = 64
# A receiver gives up connecting after this long (a firewall that drops packets) and asks the
# sender for gRPC instead; one frame may take at most FRAME_TIMEOUT_S to move, either way.
CONNECT_TIMEOUT_S = 5.0
FRAME_TIMEOUT_S = 60.0
MAX_FRAME_BYTES = 64 << 20  # as gRPC's message limit (kvmesh.grpc_service.MAX_MESSAGE_BYTES)
_HELLO = struct.Struct(f"<{TOKEN_BYTES}sB")  # the transfer's token, the connection's index
_LENGTH = struct.Struct("<Q")
_ACCEPT_RETRY_S = 0.1
_SENDING = ThreadPoolExecutor(max_workers=32, thread_name_prefix="kv-tcp-send")
_RECEIVING = ThreadPoolExecutor(max_workers=32, thread_name_prefix="kv-tcp-receive")


class DataConnectionError(TransferError):
    """The offered data port could not be reached (refused, a firewall, another network
    namespace): the receiver should ask that sender for gRPC instead."""


def tcp_host(address: str) -> str:
    """The host of a ``host:port`` gRPC address (IPv6 in brackets): where the data port is."""
    return address.rpartition(":")[0].strip("[]")


@dataclass
class _Offer:
    transfer_id: str
    connections: int
    claimed: set[int] = field(default_factory=set)


class TcpDataListener:
    """The sender's side: one listening socket per worker. ``offer`` a transfer to get the token
    its connections present; each connection is then sent what ``shares(transfer_id, index)``
    yields (the encoded chunks dealt to it), framed, and closed."""

    def __init__(self, host: str, port: int, shares: Callable[[str, int], AsyncIterator[bytes]]) -> None:
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        dualstack = host == "::" and socket.has_dualstack_ipv6()  # as gRPC's [::]: IPv6 and IPv4 both
        self.sock = socket.create_server((host, port), family=family, backlog=128, dualstack_ipv6=dualstack)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.shares = shares
        self._offers: dict[bytes, _Offer] = {}
        self._tasks: set[asyncio.Task] = set()
        self._unidentified = 0
        self._accepting: asyncio.Task | None = None

    def start(self) -> None:
        self._accepting = asyncio.create_task(self._accept_all())

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop accepting; let connections still sending finish within ``grace_s`` (a draining
        worker's pulls have dealt their chunks, not necessarily sent them), then cut the rest."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._tasks and grace_s > 0:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close()

    def withdraw(self, token: bytes) -> None:
        """A token whose transfer ended before it was dealt: a connection that comes now is refused."""
        self._offers.pop(token, None)

    def offer(self, transfer_id: str, connections: int) -> bytes:
        """A new token for ``connections`` connections to ``transfer_id``'s shares, each index
        once; it lapses when all came or after ``UNCLAIMED_S`` (as the shares nobody came for)."""
        token = secrets.token_bytes(TOKEN_BYTES)
        self._offers[token] = _Offer(transfer_id, connections)
        asyncio.get_running_loop().call_later(UNCLAIMED_S, self._offers.pop, token, None)
        return token

    def _claim(self, token: bytes, index: int) -> str | None:
        """The transfer a connection's hello opens, None for an unknown token or a bad index."""
        offer = self._offers.get(token)
        if offer is None or index >= offer.connections or index in offer.claimed:
            return None
        offer.claimed.add(index)
        if len(offer.claimed) == offer.connections:
            del self._offers[token]
        return offer.transfer_id

    async def _accept_all(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:  # out of descriptors, a connection reset before accept, ...
                log.warning("KV data listener: accept failed (%s); retrying", exc)
                await asyncio.sleep(_ACCEPT_RETRY_S)
                continue
            if self._unidentified >= MAX_UNIDENTIFIED:
                conn.close()
                continue
            self._unidentified += 1  # counted at once: a burst of connections must not pass the cap
            task = asyncio.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sending: Future | None = None
        try:
            try:
                hello = await asyncio.wait_for(_recv_async(loop, conn, _HELLO.size), HELLO_TIMEOUT_S)
            finally:
                self._unidentified -= 1
            token, index = _HELLO.unpack(hello)
            transfer_id = self._claim(token, index)
            if transfer_id is None:
                log.debug("KV data connection with an unknown token or index refused")
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with contextlib.aclosing(self.shares(transfer_id, index + 1)) as messages:
                async for message in messages:
                    sending = _SENDING.submit(_send_frame, conn, message)
                    await asyncio.wrap_future(sending)
            await asyncio.wait_for(loop.sock_sendall(conn, _LENGTH.pack(0)), FRAME_TIMEOUT_S)
        except (OSError, TransferError) as exc:
            log.info("KV data connection ended early: %s", exc)
        except Exception:
            log.exception("KV data connection failed")
        finally:
            _close_after(conn, sending)


def _close_after(conn: socket.socket, work: Future | None) -> None:
    """Shut ``conn`` down (a thread waiting on it wakes) and close it, but only once ``work`` (a
    thread using it, if any) has ended: a descriptor closed under a thread could be reused by a
    new socket before that thread's next call on it."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    if work is not None and not work.done():
        work.add_done_callback(lambda _: conn.close())
    else:
        conn.close()


def _poll(conn: socket.socket, event: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(conn, event)
    if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
        raise TimeoutError(f"a KV data frame took over {FRAME_TIMEOUT_S}s")


def _send_frame(conn: socket.socket, message: bytes) -> None:
    """A frame (its length, then the message) within ``FRAME_TIMEOUT_S``."""
    deadline = time.monotonic() + FRAME_TIMEOUT_S
    for part in (_LENGTH.pack(len(message)), message):
        view = memoryview(part)
        while view:
            try:
                view = view[conn.send(view) :]
            except BlockingIOError:
                _poll(conn, select.POLLOUT, deadline)


def _recv_into_all(conn: socket.socket, view: memoryview, deadline: float) -> None:
    while view:
        try:
            received = conn.recv_into(view)
        except BlockingIOError:
            _poll(conn, select.POLLIN, deadline)
            continue
        if not received:
            raise TransferError("the KV data connection closed mid-transfer")
        view = view[received:]


def _read_body(conn: socket.socket, size: int) -> tuple[memoryview, int | None]:
    """A frame's message, in a buffer of its own (uninitialised memory: no pass to zero it,
    filled by the kernel), and the next frame's length when it has begun to arrive already (the
    sender writes each length and message back to back): then the caller reads on without
    going back to the event loop in between."""
    deadline = time.monotonic() + FRAME_TIMEOUT_S
    frame = memoryview(np.empty(size, dtype=np.uint8))
    _recv_into_all(conn, frame, deadline)
    length = bytearray(_LENGTH.size)
    try:
        received = conn.recv_into(length)
    except BlockingIOError:
        return frame, None
    if not received:
        raise TransferError("the KV data connection closed mid-transfer")
    _recv_into_all(conn, memoryview(length)[received:], deadline)
    return frame, _LENGTH.unpack(length)[0]


async def _recv_async(loop: asyncio.AbstractEventLoop, conn: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        received = await loop.sock_recv_into(conn, view)
        if not received:
            raise TransferError("the KV data connection closed mid-transfer")
        view = view[received:]
    return bytes(buffer)


async def receive_tcp(address: str, port: int, token: bytes, index: int,
                      on_message: Callable[[memoryview], Awaitable[None]]) -> None:  # fmt: skip
    """Connection ``index`` of a transfer offered on ``port`` of ``address``'s host: every framed
    message it brings, handed to ``on_message`` while the next one is read (one in hand at a
    time), until the end mark. One that cannot connect within ``CONNECT_TIMEOUT_S`` raises
    ``DataConnectionError``; one that fails, closes early or stalls mid-frame ``TransferError``
    (the caller bounds the whole transfer by the pull's deadline)."""
    loop = asyncio.get_running_loop()
    host = tcp_host(address)
    conn = await _connect(loop, host, port)
    handling: asyncio.Future | None = None
    reading: Future | None = None
    try:
        await loop.sock_sendall(conn, _HELLO.pack(token, index))
        size = _LENGTH.unpack(await _recv_async(loop, conn, _LENGTH.size))[0]
        while size:
            if size > MAX_FRAME_BYTES:
                raise TransferError(f"a KV data frame of {size} bytes is over the {MAX_FRAME_BYTES}-byte limit")
            reading = _RECEIVING.submit(_read_body, conn, size)
            message, size = await asyncio.wrap_future(reading)
            if handling is not None:
                await handling
            handling = asyncio.ensure_future(on_message(message))
            if size is None:  # nothing of the next frame yet: wait on the loop, not in a thread
                size = _LENGTH.unpack(await _recv_async(loop, conn, _LENGTH.size))[0]
        if handling is not None:
            await handling
    except OSError as exc:
        raise TransferError(f"KV data connection to {host}:{port}: {exc!r}") from exc
    finally:
        if handling is not None:  # its thread work, if any, is the caller's to settle
            handling.cancel()
            handling.add_done_callback(_retrieve)
        _close_after(conn, reading)


def _retrieve(done: asyncio.Future) -> None:
    if not done.cancelled():
        done.exception()


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A non-blocking TCP connection to the offered port; ``DataConnectionError`` when it is
    refused, unreachable or silent for ``CONNECT_TIMEOUT_S``. ``port`` is checked already
    (``kv_receive.check_offer``)."""
    try:
        target = (str(ipaddress.ip_address(host)), port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
    except ValueError:  # a name: resolved as the loop resolves
        try:
            family, _, _, _, target = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        except (OSError, UnicodeError) as exc:
            raise DataConnectionError(f"cannot resolve {host}: {exc!r}") from exc
    try:
        conn = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # this process is out of descriptors: not the sender's fault
        raise TransferError(f"no socket for the KV data connection: {exc!r}") from exc
    conn.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(conn, target), CONNECT_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, TimeoutError) as exc:
        conn.close()
        raise DataConnectionError(f"cannot open the KV data connection to {host}:{port}: {exc!r}") from exc
    except BaseException:
        conn.close()
        raise
    return conn
