"""Rotating credentials: watch the agent's files and swap whole SSL contexts.

The agent writes ``key.pem``, ``chain.pem`` and ``bundle.pem`` one file at a time
(each by temp file + rename), so a reader may briefly see a new chain with the old
key. :class:`RotatingCredentials` polls the three files (inode, size, mtime), and
when they change it reads them once, checks them (key matches the leaf, the chain
verifies against the bundle, the SPIFFE ID is the expected one, the leaf is valid
now) and only then builds new server and client contexts. A failed reload keeps
the old credentials, logs an error naming the file and the problem, and is retried
at the next poll: rotation never fails silently, and never breaks a listener.

Servers use :meth:`RotatingCredentials.server_context`: a listener context whose
``sni_callback`` hands each new handshake the current context (``SSL_set_SSL_CTX``),
so new connections get the new certificate and trust bundle while open
connections keep the context they were established with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from trustmesh.errors import ConfigError, TrustmeshError
from trustmesh.pki import load_private_key, verify_chain

from ._contexts import _harden, client_context, server_context

__all__ = ["RotatingCredentials"]

log = logging.getLogger("trustmesh.tls")

_FILES = ("key.pem", "chain.pem", "bundle.pem")
#: A failed reload of files younger than this is retried quickly and logged only
#: if it persists: the agent's file-by-file rename settles within milliseconds.
_SETTLE = 1.0
_SETTLE_POLL = 0.05

_Signature = tuple[tuple[int, int, int], ...]


class _ReloadError(Exception):
    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class _Loaded:
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    spiffe_id: str
    server: ssl.SSLContext
    client: ssl.SSLContext
    client_no_hostname: ssl.SSLContext
    key_pem: bytes = field(repr=False)


@contextlib.contextmanager
def _identity_file(chain_pem: bytes, key_pem: bytes) -> Iterator[str]:
    """Yield a path holding key + chain that only this process can read.

    ``SSLContext.load_cert_chain`` reads files only; the bytes already checked are
    handed to it this way so a rename between the check and the load cannot mix
    two generations. An anonymous memory file where the OS has one (Linux).
    """
    data = key_pem + b"\n" + chain_pem
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("trustmesh-identity", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, name = tempfile.mkstemp(prefix="trustmesh-identity-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        yield name
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _usage(leaf: x509.Certificate) -> str:
    try:
        eku = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = set()
    return "server" if ExtendedKeyUsageOID.SERVER_AUTH in eku else "client"


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class RotatingCredentials:
    """A workload identity read from the agent's directory, swapped on change.

    Args:
        directory: Where the agent writes ``key.pem``, ``chain.pem`` (leaf first)
            and ``bundle.pem`` (trust anchors).
        expect_id: The SPIFFE ID the leaf must carry; files for another identity
            are refused.
        poll_interval: Seconds between checks of the files once :meth:`start`
            has been called.

    Raises:
        ConfigError: The files cannot be loaded now (there are no old credentials
            to keep): the message names the file and the problem.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        directory: Path,
        *,
        expect_id: str | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.directory = Path(directory)
        self.expect_id = expect_id
        self.poll_interval = poll_interval
        self.generation = 0
        #: The problem of the last failed reload (None after a successful one).
        self.last_error: str | None = None
        #: Counters for metrics: reloads that succeeded and that failed.
        self.reloads = 0
        self.failures = 0
        self._listeners: list[Callable[[int], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signature: _Signature | None = None
        self._logged_error: tuple[_Signature | None, str] | None = None
        self._expired_logged: int | None = None
        signature = self._stat()
        try:
            loaded = self._load()
        except _ReloadError as exc:
            raise ConfigError(
                f"Cannot load the workload identity from {exc.path}: {exc.problem}. "
                f"Check that the agent has written {self.directory} "
                f"('trustmesh agent --out {self.directory}').",
                path=str(exc.path),
            ) from None
        self._current = loaded
        self._signature = signature
        self.generation = 1
        self._listener = self._make_listener(loaded)

    # -- public API ---------------------------------------------------------------

    @property
    def leaf(self) -> x509.Certificate:
        """The certificate currently presented."""
        return self._current.leaf

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The leaf followed by its intermediates, as presented."""
        return self._current.chain

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """The trust anchors peers are verified against (``bundle.pem``)."""
        return self._current.roots

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE ID of the current leaf."""
        return self._current.spiffe_id

    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """Return the current chain without its leaf (the CA certificates above it)."""
        return self._current.chain[1:]

    def server_context(self) -> ssl.SSLContext:
        """Return the listener context: give it to the server once.

        It is hardened and ``CERT_REQUIRED`` itself, and its ``sni_callback``
        switches every new handshake (with or without SNI) to the current
        credentials' context, so rotations and trust-bundle changes apply to new
        connections without restarting the listener.
        """
        return self._listener

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        """Return the current client context (a new object after each rotation).

        It presents the current chain and verifies servers against the current
        bundle. Share it, but do not modify it.

        Args:
            check_hostname: False for a context that does not match the server's
                hostname (the caller checks the server's SPIFFE ID instead).
        """
        loaded = self._current
        return loaded.client if check_hostname else loaded.client_no_hostname

    def add_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(generation)`` after each successful reload (in the
        reloading thread; exceptions are logged and ignored)."""
        self._listeners.append(callback)

    def reload(self) -> bool:
        """Reload the files now if they changed since the last successful load.

        Returns:
            True if new credentials were loaded; False if nothing changed or the
            reload failed (then :attr:`last_error` says why and the old
            credentials stay in use).
        """
        with self._lock:
            return self._reload(force=False)

    def start(self) -> None:
        """Start polling the files in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"trustmesh-credentials:{self.directory}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (the current credentials stay usable)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> RotatingCredentials:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------

    def _make_listener(self, loaded: _Loaded) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(ctx)
        # No session tickets: a resumed session skips the client-certificate check,
        # and a trust-bundle change must apply to every new connection.
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET
        ctx.num_tickets = 0
        ctx.verify_mode = ssl.CERT_REQUIRED
        # The listener presents the first generation itself; the callback replaces
        # its context with the current one before the certificate is chosen.
        ctx.load_verify_locations(cadata=_pem(loaded.roots).decode())
        with _identity_file(_pem(loaded.chain), loaded.key_pem) as path:
            ctx.load_cert_chain(path)
        ctx.sni_callback = self._on_handshake
        return ctx

    def _on_handshake(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        # server_name is None for clients that send no SNI (IP address connections):
        # every handshake gets the same, current credentials.
        ssl_object.context = self._current.server

    def _stat(self) -> _Signature | None:
        out = []
        for name in _FILES:
            try:
                st = (self.directory / name).stat()
            except OSError:
                return None
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _read(self, name: str) -> bytes:
        path = self.directory / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _ReloadError(path, f"cannot read it ({exc.strerror})") from None
        if not data.strip():
            raise _ReloadError(path, "it is empty")
        return data

    def _load(self) -> _Loaded:
        key_path, chain_path, bundle_path = (self.directory / n for n in _FILES)
        key_pem, chain_pem, bundle_pem = (self._read(n) for n in _FILES)
        try:
            key = load_private_key(key_pem)
        except (TrustmeshError, ValueError, TypeError) as exc:
            raise _ReloadError(key_path, f"not a PEM private key ({_why(exc)})") from None
        try:
            chain = tuple(x509.load_pem_x509_certificates(chain_pem))
        except ValueError as exc:
            raise _ReloadError(chain_path, f"not PEM certificates ({_why(exc)})") from None
        try:
            roots = tuple(x509.load_pem_x509_certificates(bundle_pem))
        except ValueError as exc:
            raise _ReloadError(bundle_path, f"not PEM certificates ({_why(exc)})") from None
        leaf = chain[0]
        serial = format(leaf.serial_number, "x")
        if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
            raise _ReloadError(
                key_path, f"the key does not match the certificate {serial} in chain.pem"
            )
        try:
            sid = verify_chain(
                leaf, chain[1:], roots, usage=_usage(leaf), now=datetime.now(UTC)
            ).uri
        except TrustmeshError as exc:
            raise _ReloadError(
                chain_path, f"certificate {serial} does not verify against bundle.pem: {exc}"
            ) from None
        if self.expect_id is not None and sid != self.expect_id:
            raise _ReloadError(
                chain_path, f"certificate {serial} is for {sid}, expected {self.expect_id}"
            )
        roots_pem = _pem(roots).decode()
        try:
            with _identity_file(_pem(chain), key_pem) as path:
                server = server_context(Path(path), Path(path), cadata=roots_pem)
                client = client_context(cadata=roots_pem, chain=Path(path), key=Path(path))
                loose = client_context(cadata=roots_pem, chain=Path(path), key=Path(path))
        except (OSError, ssl.SSLError) as exc:
            raise _ReloadError(chain_path, f"OpenSSL refused it ({_why(exc)})") from None
        loose.check_hostname = False
        return _Loaded(leaf, chain, roots, sid, server, client, loose, key_pem)

    def _reload(self, *, force: bool) -> bool:
        signature = self._stat()
        if signature is not None and signature == self._signature and not force:
            return False
        try:
            if signature is None:
                missing = next(n for n in _FILES if not (self.directory / n).exists())
                raise _ReloadError(self.directory / missing, "it does not exist")
            loaded = self._load()
        except _ReloadError as exc:
            self.last_error = str(exc)
            self.failures += 1
            self._report(signature, exc)
            return False
        if self._stat() != signature:  # changed while reading: read again next time
            self.last_error = "the files changed while they were read"
            return False
        old = self._current
        self._current = loaded
        self._signature = signature
        self.generation += 1
        self.reloads += 1
        self.last_error = None
        self._logged_error = None
        log.info(
            "loaded new credentials for %s: certificate %s (was %s), generation %d",
            loaded.spiffe_id,
            format(loaded.leaf.serial_number, "x"),
            format(old.leaf.serial_number, "x"),
            self.generation,
            extra={"event": "credentials_rotated", "generation": self.generation},
        )
        for callback in list(self._listeners):
            try:
                callback(self.generation)
            except Exception:
                log.exception("credentials listener %r failed", callback)
        return True

    def _settling(self) -> bool:
        newest = 0
        for name in _FILES:
            with contextlib.suppress(OSError):
                newest = max(newest, (self.directory / name).stat().st_mtime_ns)
        return time.time() - newest / 1e9 < _SETTLE

    def _report(self, signature: _Signature | None, exc: _ReloadError) -> None:
        if self._settling():
            log.debug("credentials in %s not ready yet: %s", self.directory, exc)
            return
        key = (signature, str(exc))
        if key == self._logged_error:
            return
        self._logged_error = key
        log.error(
            "keeping the current credentials (certificate %s): reloading %s failed: %s; "
            "will retry at the next change",
            format(self._current.leaf.serial_number, "x"),
            exc.path,
            exc.problem,
            extra={"event": "credentials_reload_failed", "path": str(exc.path)},
        )

    def _check_expiry(self) -> None:
        leaf = self._current.leaf
        if datetime.now(UTC) <= leaf.not_valid_after_utc:
            self._expired_logged = None
            return
        serial = leaf.serial_number
        if self._expired_logged == serial:
            return
        self._expired_logged = serial
        log.error(
            "the certificate in use (%s, %s) expired at %s and no valid replacement has "
            "appeared in %s: peers will refuse it; check that the agent is running",
            format(serial, "x"),
            self._current.spiffe_id,
            f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            self.directory,
            extra={"event": "credentials_expired"},
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                try:
                    self._reload(force=self.last_error is not None)
                except Exception:  # never let the watcher die
                    log.exception("credentials watcher for %s failed", self.directory)
            self._check_expiry()
            wait = self.poll_interval
            if self.last_error is not None and self._settling():
                wait = min(wait, _SETTLE_POLL)
            self._stop.wait(wait)


def _pem(certs: tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__
