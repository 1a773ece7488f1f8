"""Following the CA's trust bundle: rotation steps reach bundle.pem and the truststores.

:class:`BundleFollower` subscribes to the CA's feed (the revocation stream, with the
bundle sequence it holds) and hands every new bundle to :meth:`Agent.apply_bundle`,
which checks it (never empty; our own certificate must still verify against it),
writes ``bundle.pem`` and the PKCS#12/Java truststore atomically and runs the reload.
:class:`~trustmesh.tls.RotatingCredentials` in ``run``, the gateway and the sidecars
notice the new ``bundle.pem`` and build new SSL contexts. An update that fails is
logged as an error and the current files stay; the feed delivers it again on the next
connection. An agent that was offline during a rotation step gets the current bundle
as soon as it connects.
"""

from __future__ import annotations

import logging
import ssl
import threading

from trustmesh.tls import BundleUpdate, RevocationSet, client_context

from ._agent import Agent

__all__ = ["BundleFollower"]

log = logging.getLogger("trustmesh.agent.bundle")


class BundleFollower:
    """Keeps an agent's trust bundle current from the CA's feed.

    Args:
        agent: The agent whose directory (and stores) to update.

    .. versionadded:: 0.3
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.feed = RevocationSet(
            agent.ca_url,
            self._context,
            on_bundle=self._apply,
            # Only its bundle events are used (no lookups): a lost feed delays updates.
            crl_interval=3600.0,
        )

    def _context(self) -> ssl.SSLContext:
        out = self.agent.out
        return client_context(
            cafile=self.agent.ca_bundle(), chain=out / "chain.pem", key=out / "key.pem"
        )

    def _apply(self, update: BundleUpdate) -> None:
        written = self.agent.apply_bundle(update)
        if written:
            log.info(
                "trust bundle %d applied: %d root(s); wrote %s",
                update.sequence,
                len(update.roots),
                ", ".join(map(str, written)),
                extra={"event": "bundle_updated", "bundle_sequence": update.sequence},
            )

    def start(self, stop: threading.Event | None = None) -> None:
        """Follow the feed in a daemon thread (until :meth:`stop`, or ``stop`` is set)."""
        self.feed.start()
        if stop is not None:

            def watch() -> None:
                stop.wait()
                self.feed.stop()

            threading.Thread(target=watch, name="trustmesh-bundle-stop", daemon=True).start()

    def stop(self) -> None:
        """Stop following the feed."""
        self.feed.stop()
