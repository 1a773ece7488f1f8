"""The chain CRL file: kept fresh from the revocation feed for nginx, HAProxy and Node.

nginx ``ssl_crl``, HAProxy ``crl-file`` and Node's ``crl`` option read one PEM file
holding a CRL for every CA of the chain: the intermediate's (it lists revoked leaves)
and the root-signed one (it lists revoked intermediates). :class:`CRLKeeper` fetches
both from the CA's ``GET /v1/crl/chain``, checks their signatures against the trust
bundle and the agent's chain, and writes them atomically (temp file + rename) when
they change: within a second of a revocation (it follows the revocation feed), and
before the CRLs' ``nextUpdate`` otherwise. After each new file it runs the reload
hooks: a command (``nginx -s reload``) and/or HAProxy's runtime API
(``set ssl crl-file`` + ``commit ssl crl-file``). A failing hook is logged with its
reason and retried with backoff until it succeeds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from cryptography import x509

from trustmesh.errors import ConfigError, TransportError, TrustmeshError
from trustmesh.files import atomic_write, stage_file
from trustmesh.pki import pem_crls, verify_ca_certificate
from trustmesh.tls import RevocationSet, client_context

from ._agent import Reload
from ._identity import load_roots

__all__ = ["CRLKeeper", "HAProxyRuntime"]

log = logging.getLogger("trustmesh.agent.crl")

#: Seconds between CRL fetches while the revocation feed is down.
POLL_WITHOUT_FEED = 30.0
#: Longest wait between retries of a failed fetch or hook (seconds).
MAX_RETRY = 30.0
#: A CRL is fetched again once this fraction of its thisUpdate..nextUpdate has passed.
REFRESH_FRACTION = 2 / 3


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


@dataclass(frozen=True)
class HAProxyRuntime:
    """HAProxy's runtime API on a Unix socket (``stats socket PATH level admin``).

    Args:
        socket_path: The stats socket.
        timeout: Seconds for each command.

    .. versionadded:: 0.1
    """

    socket_path: Path
    timeout: float = 5.0

    def command(self, line: str, payload: str | None = None) -> str:
        """Send one command (with an optional ``<<`` payload) and return the answer.

        Raises:
            TransportError: The socket cannot be reached or does not answer.
        """
        text = f"{line} <<\n{payload.rstrip()}\n\n" if payload is not None else f"{line}\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(text.encode())
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise TransportError(
                f"Cannot reach HAProxy's runtime API at {self.socket_path} ({_why(exc)}): "
                f"add 'stats socket {self.socket_path} level admin' to the global section "
                f"of haproxy.cfg, or fix --haproxy-socket."
            ) from None
        return b"".join(chunks).decode(errors="replace")

    def check(self, crl_file: Path) -> None:
        """Refuse a socket that does not answer, or an HAProxy without ``crl_file`` loaded.

        Raises:
            ConfigError: Either problem, with the fix.
        """
        try:
            listing = self.command("show ssl crl-file")
        except TransportError as exc:
            raise ConfigError(exc.message, path=str(self.socket_path)) from None
        names = {line.strip().lstrip("*") for line in listing.splitlines()}
        if str(crl_file) not in names:
            known = sorted(n for n in names if n and not n.startswith("#"))
            raise ConfigError(
                f"HAProxy at {self.socket_path} has no crl-file {crl_file} loaded (it has "
                f"{known or 'none'}): put 'crl-file {crl_file}' on the bind line (the same "
                f"absolute path as --crl) and reload HAProxy once.",
                path=str(crl_file),
            )

    def update(self, crl_file: Path, pem: bytes) -> None:
        """Replace the CRLs HAProxy holds for ``crl_file`` without a restart.

        Raises:
            TrustmeshError: HAProxy is unreachable or refused the CRLs.
        """
        name = str(crl_file)
        said = self.command(f"set ssl crl-file {name}", pem.decode())
        if "transaction" not in said.lower():
            with contextlib.suppress(TrustmeshError):
                self.command(f"abort ssl crl-file {name}")
            raise TrustmeshError(
                f"HAProxy refused 'set ssl crl-file {name}': {' '.join(said.split())[:300]}"
            )
        said = self.command(f"commit ssl crl-file {name}")
        if "Success!" not in said:
            raise TrustmeshError(
                f"HAProxy refused 'commit ssl crl-file {name}': {' '.join(said.split())[:300]}"
            )

    def describe(self) -> str:
        """Say what this hook does."""
        return f"HAProxy runtime API {self.socket_path}"


def _split_pem_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    marker = b"-----BEGIN X509 CRL-----"
    parts = [marker + p for p in data.split(marker)[1:]]
    if not parts:
        raise ValueError("the answer holds no PEM CRL")
    return [x509.load_pem_x509_crl(p) for p in parts]


def _signed_by(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    return crl.issuer == cert.subject and crl.is_signature_valid(
        cert.public_key()  # type: ignore[arg-type]
    )


def _check_creatable(directory: Path, path: Path) -> None:
    """Refuse ``path`` when ``directory`` (not there yet) cannot be created: its nearest
    existing ancestor must be a directory the agent may write. Creates nothing."""
    parent = directory.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"Cannot write {path}: --out {directory} does not exist and {parent} is not a "
            f"writable directory to create it in. Give --out and --crl paths the agent may "
            f"write.",
            path=str(path),
        )


@dataclass
class _Hook:
    """One reload hook and its retry state."""

    describe: str
    run: Callable[[bytes], None]
    failing: str | None = None
    attempt: int = 0
    retry_at: float = 0.0


@dataclass
class CRLKeeper:
    """Keeps ``path`` holding the CA's current chain CRLs (PEM), and reloads readers.

    Args:
        ca_url: The CA API, e.g. ``https://ca.internal:8443``.
        out: The agent's identity directory (chain.pem, key.pem: the feed needs mTLS).
        bundle: PEM trust anchors (verifies the CA server and the root CRL).
        path: The chain CRL file to keep.
        reload: Command or signal run after each new file (``--on-crl``).
        haproxy: HAProxy runtime API to push each new file to (``--haproxy-socket``).
        timeout: Seconds for each call to the CA.

    .. versionadded:: 0.1
    """

    ca_url: str
    out: Path
    bundle: Path
    path: Path
    reload: Reload | None = None
    haproxy: HAProxyRuntime | None = None
    timeout: float = 10.0
    _hooks: list[_Hook] = field(default_factory=list, init=False, repr=False)
    _refresh_at: float = field(default=0.0, init=False, repr=False)
    _fetch_attempt: int = field(default=0, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    writes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.ca_url = self.ca_url.rstrip("/")
        if self.reload is not None:
            reload = self.reload
            self._hooks.append(
                _Hook(reload.describe(), lambda _pem: reload({"TRUSTMESH_CRL": str(self.path)}))
            )
        if self.haproxy is not None:
            haproxy = self.haproxy
            self._hooks.append(
                _Hook(haproxy.describe(), lambda pem: haproxy.update(self.path, pem))
            )

    # -- startup ----------------------------------------------------------------------

    def check(self) -> None:
        """Refuse what cannot work before anything is written or enrolled.

        Raises:
            ConfigError: ``path`` is a directory or cannot be written there, or the
                HAProxy socket is unreachable or does not know ``path``.
        """
        if self.path.is_dir():
            raise ConfigError(
                f"--crl {self.path} is a directory: give the CRL file's path, e.g. "
                f"{self.path / 'chain-crl.pem'}.",
                path=str(self.path),
            )
        if self.path.parent.absolute() == self.out.absolute() and not self.out.exists():
            # the agent creates --out before its first write: check what it will create it in
            _check_creatable(self.out, self.path)
        else:
            probe = stage_file(self.path, b"")  # the same temp file + rename a write uses
            probe.unlink()
        if self.haproxy is not None:
            self.haproxy.check(self.path)

    # -- one refresh ------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        return client_context(cafile=self.bundle)

    def fetch(self) -> bytes:
        """Fetch the chain CRLs and return them as PEM after checking each signature.

        Raises:
            TransportError: The CA could not be reached or did not answer 200.
            TrustmeshError: The answer is not CRLs signed by our intermediate and root.
        """
        url = f"{self.ca_url}/v1/crl/chain"
        try:
            with httpx.Client(verify=self._context(), timeout=self.timeout, trust_env=False) as c:
                response = c.get(url, headers={"accept": "application/x-pem-file"})
        except (httpx.HTTPError, OSError) as exc:
            raise TransportError(f"Cannot fetch the chain CRLs from {url}: {_why(exc)}.") from None
        if response.status_code != 200:
            raise TransportError(
                f"The CA answered {response.status_code} to GET {url}: "
                f"{' '.join(response.text.split())[:300]}"
            )
        try:
            crls = _split_pem_crls(response.content)
        except ValueError as exc:
            raise TrustmeshError(f"GET {url} did not return PEM CRLs: {exc}.") from None
        roots = load_roots(self.bundle)
        try:
            issuers = x509.load_pem_x509_certificates((self.out / "chain.pem").read_bytes())[1:]
        except (OSError, ValueError):
            issuers = []
        now = datetime.now(UTC)
        if not all(any(_signed_by(crl, c) for c in (*roots, *issuers)) for crl in crls):
            # During a CA rotation the chain CRLs include the other intermediate's.
            issuers += self._published_intermediates(roots, now)
        for crl in crls:
            if not any(_signed_by(crl, c) for c in (*roots, *issuers)):
                raise TrustmeshError(
                    f"GET {url} returned a CRL of {crl.issuer.rfc4514_string()} that neither "
                    f"the trust bundle {self.bundle} nor the agent's chain signed; keeping "
                    f"{self.path} as it is."
                )
            if crl.next_update_utc is not None and crl.next_update_utc <= now:
                raise TrustmeshError(
                    f"GET {url} returned a CRL of {crl.issuer.rfc4514_string()} whose "
                    f"nextUpdate {crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ} has passed."
                )
        if not any(any(_signed_by(crl, r) for r in roots) for crl in crls):
            raise TrustmeshError(
                f"GET {url} returned no root-signed CRL: nginx and HAProxy would refuse "
                f"every client with it; upgrade the CA."
            )
        self._schedule_refresh(crls, now)
        return pem_crls(crls)

    def _published_intermediates(
        self, roots: list[x509.Certificate], now: datetime
    ) -> list[x509.Certificate]:
        """The CA's published intermediates that chain to ``roots`` (none on failure)."""
        url = f"{self.ca_url}/v1/bundle"
        try:
            with httpx.Client(verify=self._context(), timeout=self.timeout, trust_env=False) as c:
                response = c.get(url, params={"format": "intermediates"})
            published = x509.load_pem_x509_certificates(response.content)
        except (httpx.HTTPError, OSError, ValueError):
            return []
        good = []
        for cert in published:
            try:
                verify_ca_certificate(cert, published, roots, now=now)
            except TrustmeshError:
                continue
            good.append(cert)
        return good

    def _schedule_refresh(self, crls: list[x509.CertificateRevocationList], now: datetime) -> None:
        due = min(
            crl.last_update_utc
            + ((crl.next_update_utc or crl.last_update_utc) - crl.last_update_utc)
            * REFRESH_FRACTION
            for crl in crls
        )
        self._refresh_at = time.monotonic() + max(1.0, (due - now).total_seconds())

    def refresh(self) -> bool:
        """Fetch the CRLs, rewrite the file when they changed, then run the hooks.

        Returns:
            True when a new file was written.

        Raises:
            TransportError, TrustmeshError: Fetching or checking failed; the file
                is left as it was.
            ConfigError: The file cannot be written (the old one stays).
        """
        pem = self.fetch()
        try:
            current = self.path.read_bytes()
        except OSError:
            current = None
        if current == pem:
            return False
        atomic_write(self.path, pem)
        self.writes += 1
        log.info("wrote the chain CRLs to %s", self.path, extra={"event": "crl_written"})
        for hook in self._hooks:
            hook.failing, hook.attempt, hook.retry_at = "pending", 0, 0.0
        self.run_hooks()
        return True

    @property
    def failing_hooks(self) -> list[str]:
        """Why each failing hook failed (empty when all ran)."""
        return [h.failing for h in self._hooks if h.failing not in (None, "pending")]

    def run_hooks(self) -> list[str]:
        """Run the hooks that are due (new file, or a retry); return the failures."""
        failures = []
        now = time.monotonic()
        for hook in self._hooks:
            if hook.failing is None or now < hook.retry_at:
                continue
            try:
                hook.run(self.path.read_bytes())
            except (TrustmeshError, OSError) as exc:
                why = exc.message if isinstance(exc, TrustmeshError) else _why(exc)
                delay = min(MAX_RETRY, 2.0**hook.attempt)
                hook.failing, hook.attempt, hook.retry_at = why, hook.attempt + 1, now + delay
                failures.append(why)
                log.error(
                    "CRL reload (%s) failed: %s Retrying in %.0fs.",
                    hook.describe,
                    why,
                    delay,
                    extra={"event": "crl_reload_failed"},
                )
                continue
            if hook.attempt:
                log.warning(
                    "CRL reload (%s) succeeded after %d failure(s)", hook.describe, hook.attempt
                )
            else:
                log.info("CRL reloaded (%s)", hook.describe, extra={"event": "crl_reloaded"})
            hook.failing, hook.attempt = None, 0
        return failures

    # -- the loop ---------------------------------------------------------------------

    def _feed_context(self) -> ssl.SSLContext:
        return client_context(
            cafile=self.bundle, chain=self.out / "chain.pem", key=self.out / "key.pem"
        )

    def _intermediates(self) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates((self.out / "chain.pem").read_bytes())[1:]
        except (OSError, ValueError):
            return []

    def run(self, stop: threading.Event) -> None:
        """Keep the file fresh until ``stop`` is set: on every feed event, before
        ``nextUpdate``, every :data:`POLL_WITHOUT_FEED` s while the feed is down."""
        while not stop.is_set() and not (self.out / "key.pem").exists():
            stop.wait(0.5)  # the agent enrolls first: the feed needs its identity
        feed = RevocationSet(
            self.ca_url,
            self._feed_context,
            issuers=self._intermediates,
            crl_url=f"{self.ca_url}/v1/crl",
        )
        feed.start()
        seen = -1
        try:
            while not stop.is_set():
                now = time.monotonic()
                changed = feed.cursor != seen
                failing = self._fetch_attempt > 0
                if (changed and not failing) or now >= self._refresh_at:
                    cursor = feed.cursor
                    try:
                        self.refresh()
                    except TrustmeshError as exc:
                        delay = min(MAX_RETRY, 2.0**self._fetch_attempt)
                        self._fetch_attempt += 1
                        self._refresh_at = now + delay
                        log.warning(
                            "Keeping %s: %s Retrying in %.0fs.",
                            self.path,
                            exc.message,
                            delay,
                            extra={"event": "crl_refresh_failed"},
                        )
                    else:
                        if self._fetch_attempt:
                            log.warning("fetched the chain CRLs again after a failure")
                        self._fetch_attempt = 0
                        seen = cursor
                        if not feed.connected:
                            self._refresh_at = min(self._refresh_at, now + POLL_WITHOUT_FEED)
                self.run_hooks()
                if self._fetch_attempt or seen < 0:
                    stop.wait(0.25)
                else:  # wakes at once on a feed event
                    feed.wait_for(seen + 1, 0.25)
        finally:
            feed.stop()

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run :meth:`run` in a daemon thread."""
        self._thread = threading.Thread(
            target=self.run, args=(stop,), name="trustmesh-agent-crl", daemon=True
        )
        self._thread.start()
        return self._thread
