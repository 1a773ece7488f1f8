"""Who is calling: the kernel's credentials of each Unix socket connection.

grpcio does not expose a connection's file descriptor to handlers, so ``SO_PEERCRED``
cannot be read inside the gRPC server, and ``context.peer()`` of a Unix socket connection
is a bare ``unix:``. :class:`CredentialForwarder` therefore owns the public socket: for
each accepted connection it reads ``SO_PEERCRED`` (uid, gid, pid, filled in by the kernel
at ``connect()``, so the caller cannot choose them) and the executable behind
``/proc/PID/exe``, then opens a connection to the gRPC server's private socket from a
client socket *bound to a fresh path* in a private directory (mode 0700) and relays bytes
both ways. The gRPC server sees that path as ``context.peer()`` (``unix:/…/c-17``) and
looks up the credentials the forwarder recorded for it: nothing the caller sends is ever
used to attest it.

The relay runs on one asyncio event loop thread; it is a byte copy (no HTTP/2 parsing),
so gRPC keeps its own flow control end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from trustmesh.errors import ConfigError
from trustmesh.pki import Selector

__all__ = ["CredentialForwarder", "PeerInfo"]

log = logging.getLogger("trustmesh.workload.peer")

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_CHUNK = 256 * 1024


@dataclass
class PeerInfo:
    """The kernel's view of one caller: ``SO_PEERCRED`` and ``/proc/PID/exe``.

    Attributes:
        pid, uid, gid: From ``SO_PEERCRED`` of the connection.
        exe: The executable's path (``/proc/PID/exe``), or None when it could not be
            read (the process exited, or another user's process without privileges).

    .. versionadded:: 0.1
    """

    pid: int
    uid: int
    gid: int
    exe: str | None
    _exe_fd: int | None = field(default=None, repr=False)
    _sha256: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_socket(cls, sock: socket.socket) -> PeerInfo:
        """Read the peer's credentials from a connected Unix socket."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
        exe: str | None = None
        exe_fd: int | None = None
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            # Keep the executable open now: a later hash reads this very file even if
            # the process exits or its PID is reused meanwhile.
            exe_fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("cannot read /proc/%s/exe: %s", pid, exc)
        return cls(pid=pid, uid=uid, gid=gid, exe=exe, _exe_fd=exe_fd)

    def sha256(self) -> str | None:
        """Return the SHA-256 of the executable (hex), computed once; None if unreadable."""
        with self._lock:
            if self._sha256 is None and self._exe_fd is not None:
                digest = hashlib.sha256()
                try:
                    offset = 0
                    while chunk := os.pread(self._exe_fd, 1 << 20, offset):
                        digest.update(chunk)
                        offset += len(chunk)
                except OSError as exc:
                    log.debug("cannot hash the executable of pid %s: %s", self.pid, exc)
                    return None
                self._sha256 = digest.hexdigest()
            return self._sha256

    def selectors(self, *, with_hash: bool = False) -> list[Selector]:
        """Return the caller's selectors (the hash only when ``with_hash``: it reads the file)."""
        found = [Selector("unix", "uid", str(self.uid)), Selector("unix", "gid", str(self.gid))]
        if self.exe is not None:
            found.append(Selector("unix", "path", self.exe))
        if with_hash and (digest := self.sha256()) is not None:
            found.append(Selector("unix", "sha256", digest))
        return found

    def close(self) -> None:
        """Release the executable's file descriptor."""
        with self._lock:
            if self._exe_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._exe_fd)
                self._exe_fd = None

    def describe(self) -> str:
        """Return ``pid 123 uid 1001 gid 1001 (/usr/bin/python3)`` for logs."""
        return f"pid {self.pid} uid {self.uid} gid {self.gid} ({self.exe or 'exe unknown'})"


class CredentialForwarder:
    """Accept on the public socket, attest each connection, relay it to the gRPC server.

    Args:
        public: The socket path workloads connect to.
        mode: Its permission bits (0o666: any local user may ask; the entries decide
            what each one gets).

    Attributes:
        private_socket: Where the gRPC server must listen (inside a 0700 directory).

    Raises:
        ConfigError: The public socket cannot be created.

    .. versionadded:: 0.1
    """

    def __init__(self, public: Path, *, mode: int = 0o666) -> None:
        self.public = public
        self.mode = mode
        self._dir = Path(tempfile.mkdtemp(prefix="trustmesh-workload-"))  # mode 0700
        self.private_socket = self._dir / "grpc.sock"
        self._peers: dict[str, PeerInfo] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._listener: socket.socket | None = None

    def listen(self) -> None:
        """Create the public socket (replacing a stale socket file, never another file)."""
        if self._listener is not None:
            return
        path = self.public
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._remove_private_dir()
            raise ConfigError(
                f"Cannot create the socket directory {path.parent}: {exc.strerror}. Pass "
                f"--socket unix:///PATH in a directory the agent may write.",
                path=str(path),
            ) from None
        if path.is_symlink() or (path.exists() and not path.is_socket()):
            self._remove_private_dir()
            raise ConfigError(
                f"{path} exists and is not a socket: refusing to replace it. Remove it or "
                f"pass another --socket.",
                path=str(path),
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            sock.bind(str(staged))
            os.chmod(staged, self.mode)
            sock.listen(128)
            os.replace(staged, path)  # atomically: clients never see a half-made socket
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                staged.unlink()
            self._remove_private_dir()
            raise ConfigError(
                f"Cannot create the Workload API socket {path}: {exc.strerror}. Pass "
                f"--socket unix:///PATH in a directory the agent may write.",
                path=str(path),
            ) from None
        sock.setblocking(False)
        self._listener = sock

    def peer(self, grpc_peer: str) -> PeerInfo | None:
        """Return the credentials of the connection gRPC names ``grpc_peer`` (``unix:/…``)."""
        with self._lock:
            return self._peers.get(grpc_peer.removeprefix("unix:"))

    def start(self) -> None:
        """Start relaying on a daemon thread (call :meth:`listen` first)."""
        if self._listener is None:
            self.listen()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)

            async def serve() -> None:
                self._server = await asyncio.start_unix_server(self._handle, sock=self._listener)
                ready.set()

            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="workload-socket", daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        """Stop accepting, drop every relayed connection and remove both sockets."""
        if self._thread is not None:

            async def shutdown() -> None:
                if self._server is not None:
                    self._server.close()
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()

            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._thread = None
        for path in (self.public, self.private_socket):
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()
        with self._lock:
            for info in self._peers.values():
                info.close()
            self._peers.clear()
        self._remove_private_dir()

    def _remove_private_dir(self) -> None:
        # Also when listen() fails: a refused start leaves nothing behind. It is never
        # re-created (a name in /tmp freed once could be taken by another user).
        with contextlib.suppress(OSError):
            for leftover in self._dir.iterdir():
                leftover.unlink()
            self._dir.rmdir()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client: socket.socket = writer.get_extra_info("socket")
        try:
            info = PeerInfo.from_socket(client)
        except OSError as exc:
            log.warning("cannot read the caller's credentials: %s", exc)
            writer.close()
            return
        with self._lock:
            self._counter += 1
            name = str(self._dir / f"c-{self._counter}")
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind(name)
            upstream.setblocking(False)
            await self._loop.sock_connect(upstream, str(self.private_socket))
        except OSError as exc:
            log.error("cannot reach the gRPC server at %s: %s", self.private_socket, exc)
            upstream.close()
            with contextlib.suppress(OSError):
                os.unlink(name)
            info.close()
            writer.close()
            return
        with self._lock:
            self._peers[name] = info
        log.debug("connection from %s relayed as %s", info.describe(), name)
        up_reader, up_writer = await asyncio.open_unix_connection(sock=upstream)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
            with self._lock:
                self._peers.pop(name, None)
            info.close()
            with contextlib.suppress(OSError):
                os.unlink(name)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(_CHUNK):
                sink.write(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if sink.can_write_eof():
                    sink.write_eof()
