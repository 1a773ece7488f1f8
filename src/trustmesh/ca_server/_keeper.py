"""What ``ca serve`` keeps current by itself: its own server certificate (re-issued by
the active intermediate after every rotation step and at 2/3 of its life, swapped for
new handshakes without a restart) and, with ``rotation_auto``, the intermediate's
rotation schedule (prepare at ``rotation_prepare_at`` of its life, activate at
``rotation_activate_at`` once ``rotation_min_overlap`` has passed, retire when the
last certificate of the old one has expired)."""

from __future__ import annotations

import logging
import ssl
import threading
from datetime import UTC, datetime
from pathlib import Path

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError, ConflictError, TrustmeshError
from trustmesh.pki import pem_certificates
from trustmesh.serving import issue_server_identity
from trustmesh.tls import server_context

__all__ = ["ServerIdentity", "run_schedule", "schedule_step"]

log = logging.getLogger("trustmesh.ca_server")

#: Seconds between looks at the server certificate and the rotation schedule.
CHECK_INTERVAL = 5.0


class ServerIdentity:
    """The CA server's own certificate and the TLS context presenting it.

    Args:
        ca: The open CA (signing key unlocked).
        host: The listen host (named in the certificate).
        directory: A private directory for the key and chain files.
        path: The SPIFFE ID path of the server.
    """

    def __init__(self, ca: CertificateAuthority, host: str, directory: Path, *, path: str) -> None:
        self.ca = ca
        self.host = host
        self.directory = directory
        self.path = path
        self._lock = threading.Lock()
        self.chain, self.key = directory / "chain.pem", directory / "key.pem"
        self._current = self._issue()
        self._listener: ssl.SSLContext | None = None

    def _issue(self) -> ssl.SSLContext:
        # The default profile's lifetime, not 7 days: it renews itself at 2/3, and a
        # retire waits for the last certificate of the old issuer, this one included.
        chain, key = issue_server_identity(
            self.ca,
            self.host,
            self.directory,
            path=self.path,
            ttl=self.ca.config.profile(None).default_ttl,
        )
        self.sequence = self.ca.bundle_sequence
        context = server_context(
            chain, key, cadata=pem_certificates(self.ca.bundle).decode(), client_cert="optional"
        )
        cert = self.ca.store.get_certificate(self._serial(chain))
        self.not_before, self.not_after = cert.not_before, cert.not_after
        return context

    @staticmethod
    def _serial(chain: Path) -> str:
        from cryptography import x509

        return format(x509.load_pem_x509_certificate(chain.read_bytes()).serial_number, "x")

    def renew(self, reason: str) -> None:
        """Issue a new server certificate now and present it to new handshakes."""
        with self._lock:
            self._current = self._issue()
        log.info(
            "CA server certificate re-issued (%s): valid until %s, bundle sequence %d",
            reason,
            f"{self.not_after:%Y-%m-%dT%H:%M:%SZ}",
            self.sequence,
            extra={"event": "ca_server_identity_renewed", "reason": reason},
        )

    def on_bundle(self, sequence: int) -> None:
        """Hub listener: the CA's issuers changed."""
        if sequence != self.sequence:
            self.renew(f"bundle sequence {sequence}")

    def check(self, now: datetime | None = None) -> None:
        """Renew at 2/3 of the certificate's life."""
        when = now or datetime.now(UTC)
        if when >= self.not_before + (self.not_after - self.not_before) * 2 / 3:
            self.renew("2/3 of its lifetime passed")

    def listener(self) -> ssl.SSLContext:
        """The listener context: every new handshake is switched to the current one."""
        if self._listener is None:
            ctx = server_context(
                self.chain,
                self.key,
                cadata=pem_certificates(self.ca.bundle).decode(),
                client_cert="optional",
            )

            def switch(obj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _: object) -> None:
                obj.context = self._current

            ctx.sni_callback = switch
            self._listener = ctx
        return self._listener


def schedule_step(ca: CertificateAuthority, now: datetime | None = None) -> str | None:
    """Take the intermediate rotation step that is due, if any; return what was done.

    Raises:
        TrustmeshError: A step failed for another reason than "not allowed yet" or
            "another replica did it".
    """
    when = (now or datetime.now(UTC)).replace(microsecond=0)
    config = ca.config
    issuers = ca.issuers
    active = issuers.active("intermediate")
    cert = active.certificate
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    elapsed = (when - cert.not_valid_before_utc) / life
    try:
        if issuers.in_state("intermediate", "previous"):
            ca.rotate("intermediate", "retire", actor="ca-server:schedule", now=when)
            return "retire"
        prepared = issuers.in_state("intermediate", "prepared")
        if prepared:
            # The prepared one activates at rotation_activate_at of the life of the one it
            # replaces (the active one), and never before the minimum overlap.
            if elapsed >= config.rotation_activate_at:
                ca.rotate("intermediate", "activate", actor="ca-server:schedule", now=when)
                return "activate"
            return None
        if elapsed >= config.rotation_prepare_at and not issuers.in_state("root", "prepared"):
            ca.rotate("intermediate", "prepare", actor="ca-server:schedule", now=when)
            return "prepare"
    except ConflictError:
        ca.refresh()  # another replica took the step
    except ConfigError as exc:
        if exc.details.get("reason") not in {"too_early", "still_valid", "in_progress"}:
            raise
        log.debug("rotation schedule: %s", exc.message)
    return None


def run_schedule(
    ca: CertificateAuthority,
    identity: ServerIdentity,
    stop: threading.Event,
    *,
    interval: float = CHECK_INTERVAL,
) -> None:
    """Until ``stop``: keep the server certificate fresh and, with ``rotation_auto``,
    take the intermediate rotation steps when due."""
    if ca.config.rotation_auto:
        log.info(
            "automatic intermediate rotation on: prepare at %.0f%% of its life, activate at "
            "%.0f%% (after rotation_min_overlap), retire when the old one's last certificate "
            "has expired",
            ca.config.rotation_prepare_at * 100,
            ca.config.rotation_activate_at * 100,
            extra={"event": "rotation_schedule"},
        )
    failing: str | None = None
    while not stop.wait(interval):
        try:
            if ca.config.rotation_auto:
                done = schedule_step(ca)
                if done is not None:
                    log.info(
                        "rotation schedule: intermediate %s done (bundle sequence %d)",
                        done,
                        ca.bundle_sequence,
                        extra={"event": "rotation_scheduled_step", "step": done},
                    )
            if identity.sequence != ca.bundle_sequence:
                identity.renew(f"bundle sequence {ca.bundle_sequence}")
            identity.check()
            failing = None
        except TrustmeshError as exc:
            # Once per distinct failure (e.g. root.key kept offline), not every few seconds.
            if exc.message != failing:
                failing = exc.message
                log.error(
                    "rotation schedule failed: %s",
                    exc.message,
                    extra={"event": "rotation_schedule_failed"},
                )
        except Exception:  # the keeper must not die
            log.exception("CA keeper failed")
