"""The renewal agent: enroll once with a join token, renew over mTLS, reload the workload.

One :meth:`Agent.ensure` call looks at the files in the output directory and does
what is needed: nothing while the certificate is in the first 2/3 of its life, a
renewal (new key, mTLS with the current certificate) after that, an enrollment (new
key, join token) when there is no valid certificate. :meth:`Agent.run` repeats it,
sleeping until the next renewal point (with jitter) and backing off exponentially
while the CA cannot be reached; the current files stay in place meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.client import DEFAULT_TIMEOUT, CAClient, EnrollResult, check_ca_url
from trustmesh.errors import APIError, ConfigError, TransportError, TrustmeshError
from trustmesh.pki import (
    KeyType,
    PrivateKey,
    SpiffeID,
    format_duration,
    load_private_key,
    parse_dns_name,
    parse_duration,
    parse_ip_address,
    verify_chain,
)
from trustmesh.tls import BundleUpdate

from ._identity import (
    IDENTITY_FILES,
    LocalIdentity,
    Unusable,
    inspect_identity,
    load_roots,
    new_key_and_csr,
    prepare_out,
    replace_files,
    write_identity,
)
from ._schedule import MAX_BACKOFF, backoff_delay, next_renewal
from ._stores import PKCS12Stores

__all__ = ["MAX_SLEEP", "RELOAD_TIMEOUT", "Agent", "Outcome", "Reload"]

log = logging.getLogger("trustmesh.agent")

#: Seconds a reload command may run before it counts as failed.
RELOAD_TIMEOUT = 60.0
#: The loop looks at its files at least this often (seconds), so a suspended machine
#: or files changed behind its back are noticed.
MAX_SLEEP = 600.0

_TIME = "%Y-%m-%dT%H:%M:%SZ"
#: Problem reasons of a CA refusing a requested DNS/IP SAN: bad input (exit 2), and
#: waiting will not fix it.
_SAN_REASONS = frozenset({"san_not_allowed", "bad_san"})


def _parse_signal(name: str) -> signal.Signals:
    text = name.strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ConfigError(
            f"Unknown signal {name!r}: use a name such as HUP, USR1 or TERM, or a number.",
            field="signal",
        ) from None


@dataclass(frozen=True, slots=True)
class Reload:
    """What tells the workload to load new files: a command or a signal.

    Build one with :meth:`from_command` or :meth:`from_signal`.

    .. versionadded:: 0.1
    """

    argv: tuple[str, ...] = ()
    pid: int | None = None
    signum: signal.Signals | None = None

    @classmethod
    def from_command(cls, command: str, *, option: str = "--exec") -> Reload:
        """Run ``command`` (split like a shell would, but run without one).

        Args:
            command: The command line.
            option: The CLI option it came from, for error messages.

        Raises:
            ConfigError: The command is empty, badly quoted or not found.
        """
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ConfigError(
                f"{option} {command!r} cannot be split into arguments ({exc}): check the quotes.",
                field=option.lstrip("-"),
            ) from None
        if not argv:
            raise ConfigError(f"{option} is empty: give the command that reloads the workload.")
        if shutil.which(argv[0]) is None:
            raise ConfigError(
                f"{option}: {argv[0]!r} is not an executable file or on PATH: give the full "
                f"path of the reload command.",
                field=option.lstrip("-"),
            )
        return cls(argv=tuple(argv))

    @classmethod
    def from_signal(cls, spec: str) -> Reload:
        """Send a signal: ``spec`` is ``PID:SIGNAL``, e.g. ``1234:HUP``.

        Raises:
            ConfigError: Not PID:SIGNAL, an unknown signal, or no such process.
        """
        pid_text, sep, name = spec.partition(":")
        if not sep or not pid_text.isdigit() or int(pid_text) <= 0 or not name:
            raise ConfigError(
                f"--signal {spec!r} is not PID:SIGNAL, e.g. 1234:HUP.", field="signal"
            )
        signum = _parse_signal(name)
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise ConfigError(
                f"--signal {spec!r}: no process {pid} is running; give the workload's PID.",
                field="signal",
            ) from None
        except PermissionError:
            raise ConfigError(
                f"--signal {spec!r}: not allowed to signal process {pid}; run the agent as "
                f"the workload's user.",
                field="signal",
            ) from None
        return cls(pid=pid, signum=signum)

    def describe(self) -> str:
        """Say what this reload does, e.g. ``ran nginx -s reload``."""
        if self.signum is not None:
            return f"sent {self.signum.name} to {self.pid}"
        return f"ran {shlex.join(self.argv)}"

    def __call__(self, env: Mapping[str, str]) -> None:
        """Reload: run the command with ``env`` added to the environment, or signal.

        Raises:
            TrustmeshError: The command failed, timed out or could not start, or the
                process is gone.
        """
        if self.signum is not None and self.pid is not None:
            try:
                os.kill(self.pid, self.signum)
            except OSError as exc:
                raise TrustmeshError(
                    f"Could not send {self.signum.name} to process {self.pid} "
                    f"({exc.strerror}); the new files are in place, reload the workload "
                    f"yourself and fix --signal."
                ) from None
            return
        command = shlex.join(self.argv)
        try:
            # The operator's own command, split without a shell: nothing is interpolated.
            done = subprocess.run(  # noqa: S603
                self.argv,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=RELOAD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise TrustmeshError(
                f"The reload command {command!r} did not finish within {RELOAD_TIMEOUT:g}s; "
                f"the new files are in place."
            ) from None
        except OSError as exc:
            raise TrustmeshError(
                f"The reload command {command!r} could not start ({exc.strerror}); the new "
                f"files are in place."
            ) from None
        said = " ".join(done.stdout.decode(errors="replace").split())[-500:]
        if done.returncode != 0:
            raise TrustmeshError(
                f"The reload command {command!r} exited with status {done.returncode}"
                f"{': ' + said if said else ''}; the new files are in place."
            )
        if said:
            log.info("reload command %r said: %s", command, said)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one :meth:`Agent.ensure` call did.

    Attributes:
        action: ``enrolled``, ``renewed`` or ``unchanged``.
        renew_after: When the certificate on disk is due for renewal.
        reloaded: What reloaded the workload (None when nothing changed or no reload
            is configured).
        reload_error: Why the reload failed, when it did (the files are in place).

    .. versionadded:: 0.1
    """

    action: Literal["enrolled", "renewed", "unchanged"]
    spiffe_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    renew_after: datetime
    out: Path
    files: tuple[Path, ...] = ()
    reloaded: str | None = None
    reload_error: str | None = None

    def describe(self) -> str:
        """Return one line for people, e.g. ``enrolled spiffe://… serial 1a2b…``."""
        line = (
            f"{self.action} {self.spiffe_id}: serial {self.serial}, valid until "
            f"{self.not_after:{_TIME}}, renews after {self.renew_after:{_TIME}}, files in "
            f"{self.out}"
        )
        if self.action == "unchanged" and self.files:
            line += f"; wrote {', '.join(str(p) for p in self.files)}"
        if self.reloaded:
            line += f"; {self.reloaded}"
        if self.reload_error:
            line += "; reload failed"
        return line

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready mapping (times as RFC 3339)."""
        return {
            "action": self.action,
            "spiffe_id": self.spiffe_id,
            "serial": self.serial,
            "not_before": f"{self.not_before:{_TIME}}",
            "not_after": f"{self.not_after:{_TIME}}",
            "renew_after": f"{self.renew_after:{_TIME}}",
            "out": str(self.out),
            "files": [str(p) for p in self.files],
            "reloaded": self.reloaded,
            "reload_error": self.reload_error,
        }


@contextlib.contextmanager
def _san_refusal_is_bad_input() -> Iterator[None]:
    """Raise the CA's refusal of a requested DNS/IP SAN as a ConfigError (exit code 2):
    the --dns/--ip given, the join token or the profile must change, not the network."""
    try:
        yield
    except APIError as exc:
        if exc.problem.get("reason") in _SAN_REASONS:
            raise ConfigError(exc.message, field="san", san=exc.problem.get("san")) from exc
        raise


def _retryable(exc: TrustmeshError) -> bool:
    """A failure that may go away by itself: the CA is down, overloaded or failing."""
    if isinstance(exc, TransportError):
        return True
    return isinstance(exc, APIError) and (exc.status >= 500 or exc.status in (408, 429))


@dataclass
class Agent:
    """Keeps one workload identity valid in a directory.

    Args:
        ca_url: The CA API, e.g. ``https://ca.internal:8443``.
        spiffe_id: The identity to hold.
        out: Directory for key.pem (0600), cert.pem, chain.pem and bundle.pem.
        bundle: PEM trust anchors to verify the CA server with (default: the
            bundle.pem in ``out``, present after the first enrollment).
        token: Join token for enrollment.
        token_file: Or a file holding it, read each time an enrollment is needed.
        key_type: The type of each new key.
        reload: What to do after new files are written.
        timeout: Seconds for each call to the CA.
        ttl: Lifetime to ask for, e.g. ``1h`` (default: the CA profile's).
        stores: A PKCS#12 keystore and/or Java truststore to write after the PEM
            files (and before the reload) on every enrollment and renewal, and
            whenever they are missing or do not hold the current files.
        dns: DNS names to ask for as SANs at enrollment and every renewal (for
            peers that check host names); the join token must allow them.
        ips: IP addresses to ask for as SANs likewise.

    Raises:
        ConfigError: Bad URL, unreadable bundle, ``out`` is a file, both token
            sources given, or a malformed ``dns`` name or ``ips`` address.
        SpiffeIDError: ``spiffe_id`` is not a SPIFFE ID.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``dns`` and ``ips``.
    """

    ca_url: str
    spiffe_id: SpiffeID
    out: Path
    bundle: Path | None = None
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    key_type: KeyType = KeyType.EC_P256
    reload: Reload | None = None
    timeout: float = DEFAULT_TIMEOUT
    ttl: str | None = None
    stores: PKCS12Stores | None = None
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Refuse malformed names before any call to the CA (and before a token is spent).
        self.dns = tuple(dict.fromkeys(parse_dns_name(name) for name in self.dns))
        self.ips = tuple(dict.fromkeys(str(parse_ip_address(ip)) for ip in self.ips))
        self.ca_url = check_ca_url(self.ca_url)
        if self.ttl is not None:
            parse_duration(self.ttl, field="--ttl")  # refuse a bad duration before any call
        if isinstance(self.spiffe_id, str):  # accept a plain string too
            self.spiffe_id = SpiffeID.parse(self.spiffe_id)
        if self.token is not None and self.token_file is not None:
            raise ConfigError("Give --token or --token-file, not both.", field="token")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(
                f"--out {self.out} is a file: give a directory for the identity files.",
                path=str(self.out),
            )
        if self.bundle is None:
            if not (self.out / "bundle.pem").exists():
                raise ConfigError(
                    f"No trust bundle to verify the CA with: {self.out / 'bundle.pem'} does not "
                    f"exist yet. Pass --bundle FILE with the CA's root certificate (from "
                    f"'trustmesh export bundle' on the CA host).",
                    field="bundle",
                )
            self.bundle = self.out / "bundle.pem"
        load_roots(self.bundle)  # fail now on an unreadable bundle
        if self.stores is not None:
            taken = {(self.out / name).resolve() for name in IDENTITY_FILES}
            for path in self.stores.paths:
                if path.resolve() in taken:
                    raise ConfigError(
                        f"{path} is one of the agent's PEM files: give the PKCS#12 stores "
                        f"other names, e.g. {self.out / 'app.p12'}.",
                        path=str(path),
                    )
            self.stores.check_existing()  # before any call: never re-key a store silently

    # -- state ------------------------------------------------------------------------

    @property
    def trust_bundle(self) -> Path:
        """The PEM file the CA server is verified against."""
        assert self.bundle is not None  # noqa: S101 - set in __post_init__
        return self.bundle

    def roots(self) -> list[x509.Certificate]:
        """Return the trust anchors: ``bundle``, plus the bundle.pem the CA last sent."""
        roots = load_roots(self.trust_bundle)
        written = self.out / "bundle.pem"
        if written.exists() and written != self.trust_bundle:
            try:
                roots += x509.load_pem_x509_certificates(written.read_bytes())
            except (OSError, ValueError):
                log.warning("ignoring unreadable %s", written)
        return roots

    def current(self, now: datetime | None = None) -> LocalIdentity | Unusable:
        """Return the valid identity on disk, or why there is none."""
        when = now or datetime.now(UTC)
        return inspect_identity(self.out, self.spiffe_id, self.roots(), when)

    def _token(self) -> str | None:
        if self.token:
            return self.token
        if self.token_file is None:
            return None
        try:
            value = self.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"Cannot read the join token from {self.token_file}: {exc.strerror}.",
                path=str(self.token_file),
            ) from None
        if not value:
            raise ConfigError(
                f"{self.token_file} is empty: put the join token in it "
                f"('trustmesh token create {self.spiffe_id}').",
                path=str(self.token_file),
            )
        return value

    def _no_token(self, state: Unusable) -> ConfigError:
        create = f"'trustmesh token create {self.spiffe_id}'"
        if state.expired:
            return ConfigError(
                f"{state.reason}. An expired certificate cannot renew: create a new join "
                f"token on the CA with {create} and pass it with --token or --token-file.",
                field="token",
            )
        return ConfigError(
            f"{state.reason}, so {self.spiffe_id} must enroll, and no join token was given: "
            f"create one on the CA with {create} and pass --token or --token-file.",
            field="token",
        )

    # -- calls to the CA --------------------------------------------------------------

    def ca_bundle(self) -> Path:
        """The PEM file to verify the CA server with: the bundle.pem the CA last sent
        (over TLS verified against the bundle before it), else ``bundle``.

        After a root rotation the CA's own certificate chains only to the new root,
        which an initial ``--bundle`` file does not hold.
        """
        written = self.out / "bundle.pem"
        if written != self.trust_bundle and written.exists():
            try:
                if x509.load_pem_x509_certificates(written.read_bytes()):
                    return written
            except (OSError, ValueError):
                log.warning("ignoring unreadable %s", written)
        return self.trust_bundle

    def apply_bundle(self, update: BundleUpdate, *, now: datetime | None = None) -> list[Path]:
        """Write a trust bundle the CA published to bundle.pem and the truststore, then
        reload the workload; nothing when the files already hold it.

        Returns:
            The files written.

        Raises:
            TrustmeshError: The bundle is empty, or our own certificate does not verify
                against it (it would cut us off): the current files stay.
            ConfigError: The files cannot be written (the current ones stay).

        .. versionadded:: 0.3
        """
        if not update.roots:
            raise TrustmeshError(f"bundle {update.sequence} holds no certificate")
        when = now or datetime.now(UTC)
        state = self.current(when)
        if isinstance(state, LocalIdentity):
            chain = x509.load_pem_x509_certificates((self.out / "chain.pem").read_bytes())
            try:
                verify_chain(
                    chain[0],
                    [*chain[1:], *update.intermediates],
                    update.roots,
                    usage="client",
                    now=when,
                )
            except TrustmeshError as exc:
                raise TrustmeshError(
                    f"bundle {update.sequence} does not trust our own certificate "
                    f"{state.serial} ({exc.message})"
                ) from None
        bundle_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in update.roots)
        path = self.out / "bundle.pem"
        try:
            same = path.read_bytes() == bundle_pem
        except OSError:
            same = False
        entries: list[tuple[Path, bytes, int]] = [] if same else [(path, bundle_pem, 0o644)]
        if self.stores is not None and self.stores.truststore is not None:
            trust_only = PKCS12Stores(
                truststore=self.stores.truststore,
                password=self.stores.password,
                legacy=self.stores.legacy,
            )
            if same is False or trust_only.outdated([], list(update.roots)):
                entries += trust_only.render(None, [], list(update.roots))  # type: ignore[arg-type]
        if not entries:
            return []
        self._prepare()
        written = replace_files(entries, what="trust bundle")
        self._reload(written, "bundle update", str(self.spiffe_id), f"bundle {update.sequence}")
        return written

    def _client(self, *, identity: bool) -> CAClient:
        return CAClient(
            self.ca_url,
            bundle=self.ca_bundle(),
            cert_dir=self.out if identity else None,
            timeout=self.timeout,
        )

    def _new_csr(self) -> tuple[PrivateKey, bytes]:
        return new_key_and_csr(self.spiffe_id, self.key_type, dns=self.dns, ips=self.ips)

    def _missing_sans(self, state: LocalIdentity) -> list[str]:
        """The asked-for SANs the certificate on disk lacks (a renewal adds them)."""
        return [f"DNS:{n}" for n in self.dns if n not in state.dns] + [
            f"IP:{ip}" for ip in self.ips if ip not in state.ips
        ]

    def _enroll(self, token: str) -> tuple[PrivateKey, EnrollResult]:
        key, csr = self._new_csr()
        with self._client(identity=False) as client:
            try:
                return key, client.enroll(token, csr, ttl=self.ttl)
            except APIError as exc:
                raise APIError(
                    f"The CA refused to enroll {self.spiffe_id}: {exc.message}",
                    status=exc.status,
                    problem=exc.problem,
                ) from exc

    def _renew(self) -> tuple[PrivateKey, EnrollResult]:
        key, csr = self._new_csr()
        with self._client(identity=True) as client:
            try:
                return key, client.renew(csr, ttl=self.ttl)
            except APIError as exc:
                hint = ""
                if exc.problem.get("reason") == "revoked":
                    hint = (
                        " A revoked identity cannot renew: enroll again with a new join token "
                        f"('trustmesh token create {self.spiffe_id}', then --token)."
                    )
                raise APIError(
                    f"The CA refused to renew {self.spiffe_id}: {exc.message}{hint}",
                    status=exc.status,
                    problem=exc.problem,
                ) from exc

    def _renew_or_enroll(self) -> tuple[str, PrivateKey, EnrollResult]:
        try:
            return ("renewed", *self._renew())
        except APIError as refused:
            token = self._token() if refused.status in (401, 403) else None
            if token is None:
                raise
            log.warning("%s Enrolling with the join token instead.", refused.message)
            try:
                return ("enrolled", *self._enroll(token))
            except APIError as exc:
                raise APIError(
                    f"{refused.message} Enrolling with the join token instead failed too: "
                    f"{exc.message}",
                    status=exc.status,
                    problem=exc.problem,
                ) from exc

    # -- one step ---------------------------------------------------------------------

    def ensure(
        self, *, force: bool = False, now: datetime | None = None, jitter: float = 0.0
    ) -> Outcome:
        """Enroll or renew if needed, write the files, reload the workload.

        Args:
            force: Renew even if the certificate is not due (``--renew-now``).
            now: The time to judge validity and the renewal point at.
            jitter: In [0, 1]; see :func:`~trustmesh.agent.next_renewal`.

        Returns:
            What was done. A failed reload is reported in ``reload_error``: the
            files are in place by then.

        Raises:
            ConfigError: Enrollment is needed and there is no join token (or it
                cannot be read), ``out`` cannot be written, or the CA refused a
                requested DNS/IP SAN (the token or the profile does not allow it).
            TransportError: The CA could not be reached; nothing was written.
            APIError: The CA refused; nothing was written.

        .. versionadded:: 0.1
        """
        when = now or datetime.now(UTC)
        state = self.current(when)
        if isinstance(state, LocalIdentity):
            due = next_renewal(state.not_before, state.not_after, when, jitter)
            missing = self._missing_sans(state)
            if missing and not force:
                log.info(
                    "certificate %s lacks %s: renewing now to add %s",
                    state.serial,
                    ", ".join(missing),
                    "it" if len(missing) == 1 else "them",
                )
                force = True
            if not force and when < due:
                written = self._refresh_stores()
                reloaded, reload_error = self._reload(
                    written, "store update", state.spiffe_id, state.serial
                )
                return Outcome(
                    action="unchanged",
                    spiffe_id=state.spiffe_id,
                    serial=state.serial,
                    not_before=state.not_before,
                    not_after=state.not_after,
                    renew_after=due,
                    out=self.out,
                    files=tuple(written),
                    reloaded=reloaded,
                    reload_error=reload_error,
                )
            self._prepare()  # before the CA issues anything we could not store
            with _san_refusal_is_bad_input():
                action, key, result = self._renew_or_enroll()
        else:
            token = self._token()
            if token is None:
                raise self._no_token(state)
            if (self.out / "cert.pem").exists():
                log.warning("%s; enrolling with the join token.", state.reason)
            self._prepare()  # a spent token must not end in files we cannot write
            with _san_refusal_is_bad_input():
                action, key, result = ("enrolled", *self._enroll(token))
        bundle_path = self.out / "bundle.pem"
        before = bundle_path.read_bytes() if bundle_path.exists() else None
        files = write_identity(
            self.out, key, result, self.spiffe_id, datetime.now(UTC), stores=self.stores
        )
        if before is not None and bundle_path in files and bundle_path.read_bytes() != before:
            # A rotation step reached this agent with its renewal (e.g. it was offline
            # while the feed announced it): say so as loudly as a feed bundle event.
            roots = x509.load_pem_x509_certificates(bundle_path.read_bytes())
            log.info(
                "trust bundle changed with the %s: %d root(s); wrote %s",
                "renewal" if action == "renewed" else "enrollment",
                len(roots),
                bundle_path,
                extra={"event": "bundle_updated"},
            )
        leaf = x509.load_pem_x509_certificate(result.certificate.encode())
        not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        reloaded, reload_error = self._reload(files, action, result.spiffe_id, result.serial)
        return Outcome(
            action="enrolled" if action == "enrolled" else "renewed",
            spiffe_id=result.spiffe_id,
            serial=result.serial,
            not_before=not_before,
            not_after=not_after,
            renew_after=next_renewal(not_before, not_after, max(when, not_before), jitter),
            out=self.out,
            files=tuple(files),
            reloaded=reloaded,
            reload_error=reload_error,
        )

    def _prepare(self) -> None:
        if self.stores is not None:
            self.stores.prepare()
        prepare_out(self.out)

    def _refresh_stores(self) -> list[Path]:
        """Write the PKCS#12 stores when they are missing or do not hold the current
        PEM files (e.g. ``--pkcs12`` added to an enrolled agent, or a failed write)."""
        if self.stores is None:
            return []
        try:
            chain = x509.load_pem_x509_certificates((self.out / "chain.pem").read_bytes())
            roots = x509.load_pem_x509_certificates((self.out / "bundle.pem").read_bytes())
            stale = self.stores.outdated(chain, roots)
            if not stale:
                return []
            key = load_private_key((self.out / "key.pem").read_bytes(), source="key.pem")
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"Cannot read the identity files in {self.out} to write the PKCS#12 stores "
                f"({exc}); run the agent with --renew-now to rewrite them.",
                path=str(self.out),
            ) from None
        self.stores.prepare()
        entries = [e for e in self.stores.render(key, chain, roots) if e[0] in stale]
        written = replace_files(entries, what="PKCS#12 stores")
        log.info("wrote %s for %s", ", ".join(map(str, written)), self.spiffe_id)
        return written

    def _reload(
        self, files: list[Path], action: str, spiffe_id: str, serial: str
    ) -> tuple[str | None, str | None]:
        """Run the reload after ``files`` were written (nothing when none were).

        Returns:
            What reloaded the workload, and why the reload failed (None when it did not).
        """
        if self.reload is None or not files:
            return None, None
        try:
            self.reload(
                {
                    "TRUSTMESH_SPIFFE_ID": spiffe_id,
                    "TRUSTMESH_SERIAL": serial,
                    "TRUSTMESH_OUT": str(self.out),
                }
            )
        except TrustmeshError as exc:
            log.error("reload after %s failed: %s", action, exc.message)
            return None, exc.message
        return self.reload.describe(), None

    # -- the loop ---------------------------------------------------------------------

    def _after_failure(
        self, exc: TrustmeshError, attempt: int, rng: random.Random, now: datetime
    ) -> float:
        state = self.current(now)
        if isinstance(state, LocalIdentity):
            lifetime = state.not_after - state.not_before
            left = state.not_after - now
            cap = min(MAX_BACKOFF, max(1.0, lifetime.total_seconds() / 20))
            delay = backoff_delay(attempt, cap=cap, jitter=rng.random())
            # Loud once less than half of the time between the renewal point and expiry is
            # left, and at once for what waiting cannot fix (e.g. a store it cannot write).
            urgent = left < lifetime / 6 or not _retryable(exc)
            level = logging.ERROR if urgent else logging.WARNING
            log.log(
                level,
                "Renewing %s failed: %s Keeping certificate %s, which expires in %s (%s); "
                "retrying in %.0fs.",
                self.spiffe_id,
                exc.message,
                state.serial,
                format_duration(left),
                f"{state.not_after:{_TIME}}",
                delay,
            )
            return delay
        delay = backoff_delay(attempt, cap=MAX_BACKOFF, jitter=rng.random())
        log.error(
            "%s has no valid certificate (%s): %s Retrying in %.0fs.",
            self.spiffe_id,
            state.reason,
            exc.message,
            delay,
        )
        return delay

    def run(
        self,
        stop: threading.Event,
        *,
        renew_now: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        """Keep the identity fresh until ``stop`` is set.

        Renews at 2/3 of each certificate's lifetime, moved earlier by a random jitter
        drawn once per certificate. While the CA cannot be reached (or answers 5xx),
        retries with capped exponential backoff and keeps the current files, logging a
        warning, then errors as expiry nears.

        Raises:
            ConfigError, APIError: Only on the first attempt, for a failure that
                retrying cannot fix (no token, refused token): the operator is
                watching then. Later, every failure is logged and retried.

        .. versionadded:: 0.1
        """
        chance = rng if rng is not None else secrets.SystemRandom()
        jitters: dict[str, float] = {}
        force, attempt, first = renew_now, 0, True
        while not stop.is_set():
            now = datetime.now(UTC)
            state = self.current(now)
            jitter = 0.0
            if isinstance(state, LocalIdentity):
                jitter = jitters.setdefault(state.serial, chance.random())
            try:
                outcome = self.ensure(force=force, now=now, jitter=jitter)
            except TrustmeshError as exc:
                if first and not _retryable(exc):
                    raise
                wait = self._after_failure(exc, attempt, chance, now)
                attempt += 1
            else:
                force, attempt = False, 0
                if outcome.action != "unchanged":
                    log.info("%s", outcome.describe())
                jitters = {outcome.serial: jitters.get(outcome.serial, chance.random())}
                jitter = jitters[outcome.serial]
                later = datetime.now(UTC)
                due = next_renewal(outcome.not_before, outcome.not_after, later, jitter)
                wait = min(MAX_SLEEP, max(1.0, (due - later).total_seconds()))
                log.debug("next look at %s in %.0fs", self.spiffe_id, wait)
            first = False
            stop.wait(wait)
