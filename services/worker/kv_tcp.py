"""KV chunks on plain TCP connections beside the ``PullBlocks`` call that negotiated them.

Why: a Python gRPC stream copies every message into and out of a Python ``bytes`` on the
event loop, under the GIL; on the GPU host it moved 45–55% of what a raw loopback socket does
even as opaque bytes, whatever the stream count (``bench/kv_transfer.py``). Here each side
moves a chunk with blocking socket calls in a worker thread, which hold no GIL while the kernel
copies: the receiver reads a chunk straight into one buffer and writes it into the reserved
pool blocks from there, as it does with a gRPC message.

What stays on gRPC: the pull itself (the request, its deadline, its final status, the mesh
token or mTLS that guards ``KvTransfer``). The sender answers a pull that asks for TCP
(``PullBlocksRequest.tcp_data``) with a port and a one-time token; a connection must open
with that token within ``HELLO_TIMEOUT_S`` and gets the share of chunks dealt to its index.
The token is only ever sent on the guarded call, so a connection that presents it comes from
the caller that passed the guard. Chunks keep their encoding and checksums (``kv_wire.py``);
only the framing differs: an 8-byte little-endian length before each, 0 to end. Plaintext, so
a worker running TLS never offers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import select
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from services.worker.kv_wire import TransferError
from services.worker.transfer_streams import UNCLAIMED_S

log = logging.getLogger(__name__)

TOKEN_BYTES = 16
HELLO_TIMEOUT_S = 10.0
_HELLO = struct.Struct(f"<{TOKEN_BYTES}sB")  # the transfer's token, the connection's index
_LENGTH = struct.Struct("<Q")
MAX_FRAME_BYTES = 64 << 20  # as gRPC's message limit (kvmesh.grpc_service.MAX_MESSAGE_BYTES)
_SEND_TIMEOUT_S = 60.0


class DataConnectionError(TransferError):
    """The offered data port could not be reached (a firewall, another network namespace): the
    receiver should ask that sender for gRPC instead."""


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
        self.sock = socket.create_server((host or "0.0.0.0", port), family=_family(host), backlog=128)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.shares = shares
        self._offers: dict[bytes, _Offer] = {}
        self._tasks: set[asyncio.Task] = set()
        self._accepting: asyncio.Task | None = None

    def start(self) -> None:
        self._accepting = asyncio.create_task(self._accept_all())

    async def close(self) -> None:
        for task in [self._accepting, *self._tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._accepting, *self._tasks] if t is not None), return_exceptions=True)
        self.sock.close()

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
            conn, _ = await loop.sock_accept(self.sock)
            task = asyncio.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                hello = await asyncio.wait_for(_recv_async(loop, conn, _HELLO.size), HELLO_TIMEOUT_S)
                token, index = _HELLO.unpack(hello)
                transfer_id = self._claim(token, index)
                if transfer_id is None:
                    log.warning("KV data connection with an unknown token or index refused")
                    return
                async with contextlib.aclosing(self.shares(transfer_id, index + 1)) as messages:
                    async for message in messages:
                        await loop.sock_sendall(conn, _LENGTH.pack(len(message)))
                        await loop.run_in_executor(None, _send_all, conn, message, _SEND_TIMEOUT_S)
                await loop.sock_sendall(conn, _LENGTH.pack(0))
            except (OSError, TransferError) as exc:
                log.info("KV data connection ended early: %s", exc)
            finally:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# The sockets stay non-blocking: the event loop waits for a frame's length (a wait of any
# length costs no thread: a prefill can take seconds), then a worker thread moves the frame's
# bytes (the socket calls release the GIL), polling when the kernel's buffer is empty or full.
def _wait(conn: socket.socket, event: int, timeout_s: float) -> None:
    poller = select.poll()
    poller.register(conn, event)
    if not poller.poll(timeout_s * 1000):
        raise TimeoutError(f"the KV data connection stalled for {timeout_s}s")


def _send_all(conn: socket.socket, data: bytes, timeout_s: float) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view) :]
        except BlockingIOError:
            _wait(conn, select.POLLOUT, timeout_s)


def _recv_into_all(conn: socket.socket, view: memoryview, timeout_s: float) -> None:
    while view:
        try:
            received = conn.recv_into(view)
        except BlockingIOError:
            _wait(conn, select.POLLIN, timeout_s)
            continue
        if not received:
            raise TransferError("the KV data connection closed mid-transfer")
        view = view[received:]


async def _recv_async(loop: asyncio.AbstractEventLoop, conn: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        received = await loop.sock_recv_into(conn, view)
        if not received:
            raise TransferError("the KV data connection closed mid-transfer")
        view = view[received:]
    return bytes(buffer)


def _read_body(conn: socket.socket, size: int, timeout_s: float) -> memoryview:
    """A frame's message, in a buffer of its own: uninitialised memory (no pass to zero it),
    filled by the kernel."""
    frame = memoryview(np.empty(size, dtype=np.uint8))
    _recv_into_all(conn, frame, timeout_s)
    return frame


async def receive_tcp(address: str, port: int, token: bytes, index: int, timeout_s: float,
                      on_message: Callable[[memoryview], Awaitable[None]]) -> None:  # fmt: skip
    """Connection ``index`` of a transfer offered on ``port`` of ``address``'s host: every framed
    message it brings, handed to ``on_message`` while the next one is read (one in hand at a
    time), until the end mark. A connection that fails, stalls mid-frame for ``timeout_s`` or
    closes early raises ``TransferError`` (the caller bounds the whole transfer)."""
    loop = asyncio.get_running_loop()
    host = tcp_host(address)
    try:
        conn = await asyncio.wait_for(_connect(loop, host, port), timeout_s)
    except (OSError, TimeoutError) as exc:
        raise DataConnectionError(f"cannot open the KV data connection to {host}:{port}: {exc!r}") from exc
    handling: asyncio.Future | None = None
    try:
        await loop.sock_sendall(conn, _HELLO.pack(token, index))
        while size := _LENGTH.unpack(await _recv_async(loop, conn, _LENGTH.size))[0]:
            if size > MAX_FRAME_BYTES:
                raise TransferError(f"a KV data frame of {size} bytes is over the {MAX_FRAME_BYTES}-byte limit")
            message = await loop.run_in_executor(None, _read_body, conn, size, timeout_s)
            if handling is not None:
                await handling
            handling = asyncio.ensure_future(on_message(message))
        if handling is not None:
            await handling
    except OSError as exc:
        raise TransferError(f"KV data connection to {host}:{port}: {exc!r}") from exc
    finally:
        if handling is not None:  # its thread work, if any, is the caller's to settle
            handling.cancel()
            handling.add_done_callback(lambda done: done.cancelled() or done.exception())
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)  # ends a reading thread's wait, if this was cancelled
        conn.close()


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A non-blocking TCP connection to ``host:port`` (resolved as the loop resolves)."""
    family, kind, proto, _, target = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
    conn = socket.socket(family, kind, proto)
    conn.setblocking(False)
    try:
        await loop.sock_connect(conn, target)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        conn.close()
        raise
    return conn
