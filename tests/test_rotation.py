"""Staged rotation in the authority: the steps, their refusals, CRLs and OCSP per
issuer, renewals across the switch, the schedule of `ca serve`, and the agent's
bundle update (never to a bundle that does not trust it)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from trustmesh.agent import Agent
from trustmesh.agent._identity import new_key_and_csr
from trustmesh.authority import CertificateAuthority
from trustmesh.ca_server._keeper import schedule_step
from trustmesh.cli import main
from trustmesh.errors import ConfigError, ConflictError, PKIError, TrustmeshError
from trustmesh.files import atomic_write
from trustmesh.pki import (
    KeyType,
    LeafRequest,
    SpiffeID,
    create_root,
    dump_private_key,
    generate_private_key,
    issue_leaf,
    pem_certificates,
    verify_chain,
)
from trustmesh.store import advance_state
from trustmesh.tls import BundleUpdate

from .conftest import PASSPHRASE

TD = "example.org"


def _ca(tmp_path: Path, overlap: str = "1h") -> CertificateAuthority:
    home = tmp_path / "home"
    CertificateAuthority.init(home, trust_domain=TD, passphrase=PASSPHRASE).close()
    config = (home / "config.toml").read_text()
    (home / "config.toml").write_text(
        config.replace('rotation_min_overlap = "1h"', f'rotation_min_overlap = "{overlap}"')
    )
    return CertificateAuthority.open(home, passphrase=PASSPHRASE)


def _audit_count(ca: CertificateAuthority) -> int:
    return len(ca.audit_tail(10_000))


def test_steps_are_refused_out_of_order_with_when_they_are_allowed(tmp_path: Path) -> None:
    """Activate before the minimum overlap says when it will be allowed; prepare twice,
    retire with live certificates and retire with nothing replaced are refused; a
    refused step changes nothing (same bundle sequence, no audit event)."""
    with _ca(tmp_path) as ca:
        now = datetime.now(UTC).replace(microsecond=0)
        with pytest.raises(ConfigError, match="No intermediate rotation is prepared"):
            ca.rotate("intermediate", "activate", now=now)
        with pytest.raises(ConfigError, match="No replaced intermediate to retire"):
            ca.rotate("intermediate", "retire", now=now)
        ca.rotate("intermediate", "prepare", now=now)
        sequence, events = ca.bundle_sequence, _audit_count(ca)
        allowed = now + timedelta(hours=1)
        with pytest.raises(ConfigError, match=f"allowed from {allowed:%Y-%m-%dT%H:%M:%SZ}"):
            ca.rotate("intermediate", "activate", now=now + timedelta(minutes=30))
        with pytest.raises(ConfigError, match="is prepared and not active yet"):
            ca.rotate("intermediate", "prepare", now=now)
        with pytest.raises(ConfigError, match="Refusing to prepare a new root"):
            ca.rotate("root", "prepare", now=now)
        assert (ca.bundle_sequence, _audit_count(ca)) == (sequence, events)
        old = ca.issue("spiffe://example.org/old", ttl=timedelta(hours=2), now=now)
        ca.rotate("intermediate", "activate", now=allowed)
        with pytest.raises(ConfigError, match=r"1 certificate it signed is still valid") as info:
            ca.rotate("intermediate", "retire", now=allowed)
        assert old.record.serial in info.value.message
        assert info.value.details["count"] == 1
        later = old.record.not_after + timedelta(seconds=1)
        ca.rotate("intermediate", "retire", now=later)
        assert ca.rotation_status("intermediate", now=later).stage == "idle"


def test_wrong_passphrase_changes_nothing(tmp_path: Path) -> None:
    """A step that cannot unlock the key it needs fails with PKIError (exit 2) and
    writes nothing: no issuer row, no audit event, the same bundle sequence."""
    with _ca(tmp_path) as good:
        home = good.home
        sequence, events = good.bundle_sequence, _audit_count(good)
    with CertificateAuthority.open(home, passphrase=b"wrong") as ca:
        with pytest.raises(PKIError, match="Wrong passphrase"):
            ca.rotate("root", "prepare")
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        assert (ca.bundle_sequence, _audit_count(ca)) == (sequence, events)
        assert not ca.issuers.stored
    assert main(["ca", "rotate", "intermediate", "activate", "--home", str(home)]) == 2


def test_crl_and_ocsp_per_issuer_and_renewal_across_the_switch(tmp_path: Path) -> None:
    """During the overlap each intermediate has its own CRL and answers OCSP for its own
    certificates; a renewal of an old-issuer certificate yields a new-issuer one."""
    with _ca(tmp_path, overlap="1s") as ca:
        now = datetime.now(UTC).replace(microsecond=0)
        old = ca.issue("spiffe://example.org/a", now=now)
        ca.rotate("intermediate", "prepare", now=now)
        ca.rotate("intermediate", "activate", now=now + timedelta(seconds=2))
        new = ca.issue("spiffe://example.org/b")
        assert old.record.issuer != new.record.issuer
        ca.revoke(old.record.serial)
        old_inter, new_inter = old.chain[1], new.chain[1]
        crls = ca.chain_crls()
        assert len(crls) == 3  # two intermediates and the root
        by_issuer = {c.issuer: {e.serial_number for e in c} for c in crls}
        assert by_issuer[old_inter.subject] == {old.certificate.serial_number}
        assert by_issuer[new_inter.subject] == set()
        for cert, issuer, status in (
            (old.certificate, old_inter, ocsp.OCSPCertStatus.REVOKED),
            (new.certificate, new_inter, ocsp.OCSPCertStatus.GOOD),
        ):
            request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()  # noqa: S303 - OpenSSL's default CertID
            answer = ca.ocsp_response(request)
            assert answer.certificate_status == status
            # Signed by the certificate's own issuer.
            public = issuer.public_key()
            assert isinstance(public, ec.EllipticCurvePublicKey)
            algorithm = answer.signature_hash_algorithm
            assert algorithm is not None
            public.verify(answer.signature, answer.tbs_response_bytes, ec.ECDSA(algorithm))
        prior = ca.issuers.by_ski(old.record.issuer)
        assert prior is not None
        assert prior.state == "previous"


def test_renewal_of_an_old_issuer_certificate_gets_the_new_issuer(tmp_path: Path) -> None:
    """``renew`` accepts a certificate of the replaced intermediate and signs the renewal
    with the active one, whose chain verifies against the bundle."""
    with _ca(tmp_path, overlap="1s") as ca:
        now = datetime.now(UTC).replace(microsecond=0)
        spiffe_id = SpiffeID.parse("spiffe://example.org/renewing")
        old = ca.issue(spiffe_id.uri, now=now)
        ca.rotate("intermediate", "prepare", now=now)
        ca.rotate("intermediate", "activate", now=now + timedelta(seconds=2))
        _, csr = new_key_and_csr(spiffe_id, KeyType.EC_P256)
        renewed = ca.renew(old.certificate, csr)
        assert renewed.record.issuer == ca.issuer_id != old.record.issuer
        verify_chain(renewed.certificate, renewed.chain[1:], ca.bundle, usage="client")


def test_root_rotation_cross_certifies_and_retires_into_the_root_crl(tmp_path: Path) -> None:
    """A root rotation publishes both roots, gives new-chain leaves the new root certified
    by the old one, verifies both chains against either root alone, and on retire lists
    the old intermediate as superseded on the old root's CRL until the root goes."""
    with _ca(tmp_path, overlap="1s") as ca:
        now = datetime.now(UTC).replace(microsecond=0)
        r1 = ca.root
        ca.rotate("root", "prepare", now=now)
        assert len(ca.bundle) == 2
        before = ca.issue("spiffe://example.org/before", now=now)
        ca.rotate("root", "activate", now=now + timedelta(seconds=2))
        after = ca.issue("spiffe://example.org/after")
        r2 = ca.root
        assert r2 != r1
        assert [c.subject for c in after.chain[1:]] == [after.chain[1].subject, r2.subject]
        for leaf in (before, after):
            for anchor in (r1, r2):
                verify_chain(leaf.certificate, ca.chain_certificates, [anchor], usage="client")
        later = max(before.record.not_after, after.record.not_after) + timedelta(seconds=1)
        with pytest.raises(ConfigError, match="still valid"):
            ca.rotate("root", "retire", now=now + timedelta(seconds=3))
        # The old root certified by the new one lives as long as a leaf of the old chain
        # could (max_ttl after prepare), and retire waits for it too.
        cross_end = now + ca.config.profile(None).max_ttl
        assert before.chain[2].not_valid_after_utc == cross_end
        with pytest.raises(ConfigError, match=r"the cross certificate .* is valid until"):
            ca.rotate("root", "retire", now=later)
        later = max(later, cross_end + timedelta(seconds=1))
        ca.rotate("root", "retire", now=later)
        assert list(ca.bundle) == [r2]
        assert len(ca.issue("spiffe://example.org/final", now=later).chain) == 2


def test_a_prepared_root_rotation_is_steered_by_root_steps_only(tmp_path: Path) -> None:
    """While a root rotation is prepared, a second prepare names the root and the root
    step, and activating its intermediate alone (under a root that is not active) is
    refused without changing anything, so the later root activate still works."""
    with _ca(tmp_path, overlap="1s") as ca:
        now = datetime.now(UTC).replace(microsecond=0)
        ca.rotate("root", "prepare", now=now)
        sequence, events = ca.bundle_sequence, _audit_count(ca)
        with pytest.raises(ConfigError, match=r"root 2 \(.*rotate root activate") as info:
            ca.rotate("root", "prepare", now=now)
        assert "rotate intermediate" not in info.value.message
        later = now + timedelta(seconds=2)
        with pytest.raises(ConfigError, match="belongs to the prepared root rotation"):
            ca.rotate("intermediate", "activate", now=later)
        assert (ca.bundle_sequence, _audit_count(ca)) == (sequence, events)
        ca.rotate("root", "activate", now=later)
        assert ca.issue("spiffe://example.org/after").chain[-1].subject == ca.root.subject


def test_intermediate_retire_lists_it_on_the_root_crl(tmp_path: Path) -> None:
    """The root-signed CRL lists a retired intermediate (reason superseded)."""
    with _ca(tmp_path, overlap="1s") as ca:
        now = datetime.now(UTC).replace(microsecond=0)
        old_serial = ca.intermediate.serial_number
        ca.rotate("intermediate", "prepare", now=now)
        ca.rotate("intermediate", "activate", now=now + timedelta(seconds=2))
        ca.rotate("intermediate", "retire", now=now + timedelta(seconds=3))
        crl = ca.root_crl()
        entry = crl.get_revoked_certificate_by_serial_number(old_serial)
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason == x509.ReasonFlags.superseded
        assert len(ca.chain_crls()) == 2


def test_two_writers_cannot_both_move_the_state(tmp_path: Path) -> None:
    """The compare-and-set on ca_state refuses a step based on a stale read."""
    with _ca(tmp_path) as ca:
        stale = ca.bundle_sequence
        ca.rotate("intermediate", "prepare")
        with pytest.raises(ConflictError, match="changed while this step ran"):
            with ca.store.transaction() as conn:
                advance_state(conn, stale)


def test_another_process_step_is_picked_up_by_refresh(tmp_path: Path) -> None:
    """A CA object sees a step taken through another one after refresh()."""
    with _ca(tmp_path, overlap="1s") as serving:
        with CertificateAuthority.open(serving.home, passphrase=PASSPHRASE) as cli:
            cli.rotate("root", "prepare")
        assert len(serving.bundle) == 1
        assert serving.refresh() is True
        assert len(serving.bundle) == 2
        assert serving.refresh() is False


def test_schedule_prepares_activates_and_retires_the_intermediate(tmp_path: Path) -> None:
    """`ca serve`'s schedule prepares at 1/2 of the intermediate's life, activates at 2/3
    (not before the minimum overlap), and retires once nothing of the old one lives."""
    with _ca(tmp_path, overlap="1s") as ca:
        cert = ca.intermediate
        start, life = (
            cert.not_valid_before_utc,
            cert.not_valid_after_utc - cert.not_valid_before_utc,
        )
        assert schedule_step(ca, start + life * 0.4) is None
        assert schedule_step(ca, start + life * 0.51) == "prepare"
        assert schedule_step(ca, start + life * 0.6) is None
        assert schedule_step(ca, start + life * 0.7) == "activate"
        assert ca.intermediate != cert
        assert schedule_step(ca, start + life * 0.71) == "retire"
        assert schedule_step(ca, start + life * 0.72) is None


def test_agent_refuses_a_bundle_that_does_not_trust_it(tmp_path: Path) -> None:
    """A bundle update whose roots would not verify the agent's own certificate is
    refused and bundle.pem stays; an update with both roots is written; a bundle event
    without certificates does not parse."""
    with _ca(tmp_path, overlap="1s") as ca:
        out = tmp_path / "agent"
        out.mkdir()
        issued = ca.issue("spiffe://example.org/agent")
        assert issued.key is not None
        atomic_write(out / "key.pem", dump_private_key(issued.key), mode=0o600)
        atomic_write(out / "cert.pem", pem_certificates(issued.chain[:1]))
        atomic_write(out / "chain.pem", pem_certificates(issued.chain))
        atomic_write(out / "bundle.pem", pem_certificates(ca.bundle))
        agent = Agent("https://127.0.0.1:1", SpiffeID.parse("spiffe://example.org/agent"), out)
        foreign = create_root(generate_private_key(KeyType.EC_P256), "other.org")
        before = (out / "bundle.pem").read_bytes()
        with pytest.raises(TrustmeshError, match="does not trust our own certificate"):
            agent.apply_bundle(BundleUpdate(7, [foreign], []))
        assert (out / "bundle.pem").read_bytes() == before
        ca.rotate("root", "prepare")
        written = agent.apply_bundle(BundleUpdate(ca.bundle_sequence, ca.bundle, []))
        assert written == [out / "bundle.pem"]
        assert len(x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())) == 2
        assert agent.apply_bundle(BundleUpdate(ca.bundle_sequence, ca.bundle, [])) == []
    with pytest.raises(ValueError, match=r"no certificates|PEM"):
        BundleUpdate.from_event({"sequence": 3, "bundle": ""})
    with pytest.raises(ValueError, match="malformed bundle event"):
        BundleUpdate.from_event(json.loads('{"sequence": "x", "bundle": "y"}'))


def test_status_json_names_stage_issuers_and_live_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ca rotate intermediate status --json` shows the stage, each issuer with its
    not-after date, and the live certificates of the old one."""
    with _ca(tmp_path, overlap="1s") as ca:
        home = ca.home
        ca.issue("spiffe://example.org/x")
        now = datetime.now(UTC).replace(microsecond=0)
        ca.rotate("intermediate", "prepare", now=now - timedelta(seconds=5))
        ca.rotate("intermediate", "activate", now=now)
    assert main(["ca", "rotate", "intermediate", "status", "--json", "--home", str(home)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stage"] == "overlap"
    assert data["old_issuer_live_certificates"] == 1
    assert [(i["generation"], i["state"]) for i in data["issuers"]] == [
        (1, "previous"),
        (2, "active"),
    ]
    assert all(i["not_after"].endswith("Z") for i in data["issuers"])


def test_crl_chain_names_every_published_root_as_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """During a root rotation `crl --chain` describes the old root's CRL as a root CRL
    too, not as an intermediate's."""
    with _ca(tmp_path, overlap="1s") as ca:
        home = ca.home
        now = datetime.now(UTC).replace(microsecond=0)
        ca.rotate("root", "prepare", now=now - timedelta(seconds=5))
        ca.rotate("root", "activate", now=now)
    out = tmp_path / "chain.pem"
    argv = ["crl", "--chain", "--pem", "--out", str(out), "--home", str(home)]
    assert main(argv) == 0
    said = capsys.readouterr().err
    assert said.count("root CRL number") == 2
    assert said.count("intermediate CRL number") == 2


def _openssl_verify(
    anchor: x509.Certificate,
    untrusted: Sequence[x509.Certificate],
    leaf: x509.Certificate,
    at: datetime,
    tmp_path: Path,
) -> subprocess.CompletedProcess[str]:
    openssl = shutil.which("openssl")
    assert openssl is not None
    files = {
        "anchor.pem": pem_certificates([anchor]),
        "untrusted.pem": pem_certificates(list(untrusted)),
        "leaf.pem": pem_certificates([leaf]),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return subprocess.run(
        [
            openssl,
            "verify",
            "-attime",
            str(int(at.timestamp())),
            "-CAfile",
            str(tmp_path / "anchor.pem"),
            "-untrusted",
            str(tmp_path / "untrusted.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_old_by_new_cross_certificate_expires_before_root_retire(tmp_path: Path) -> None:
    """The old root certified by the new one chains leaves of the old root to a peer
    that trusts the new root alone during the overlap, and no longer once retire is
    possible: after retire, OpenSSL with the new root alone, the old intermediate and
    every old-by-new cross certificate the CA ever published refuses a leaf made with
    the old intermediate's key."""
    with _ca(tmp_path, overlap="1s") as ca:
        now = datetime.now(UTC).replace(microsecond=0)
        max_ttl = ca.config.profile(None).max_ttl
        r1 = ca.root
        old_inter = ca.issuers.active("intermediate")
        old_key = ca.key_of(old_inter)
        ca.rotate("root", "prepare", now=now)
        r2 = next(c for c in ca.bundle if c != r1)
        # Issued just before activate: one with the default lifetime, one with the
        # longest, which outlives the cross certificate of prepare (activate's covers it).
        late_at = now + max_ttl - timedelta(hours=1)
        early = ca.issue("spiffe://example.org/early", now=late_at - timedelta(minutes=1))
        late = ca.issue("spiffe://example.org/late", ttl=max_ttl, now=late_at)
        activated = late_at + timedelta(minutes=1)
        ca.rotate("root", "activate", now=activated)

        def old_by_new(certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
            return [c for c in certs if c.subject == r1.subject and c.issuer == r2.subject]

        published: dict[int, x509.Certificate] = {}
        for cert in old_by_new([*early.chain, *late.chain, *ca.chain_certificates]):
            published[cert.serial_number] = cert
        for issuer in ca.issuers.issuers:
            if issuer.cross is not None:
                published.update({c.serial_number: c for c in old_by_new([issuer.cross])})
        assert len(published) == 2  # prepare's and activate's
        ends = sorted(c.not_valid_after_utc for c in published.values())
        assert ends == [now + max_ttl, late.record.not_after]

        # During the overlap a leaf of the old chain verifies with the new root alone
        # and the chain it was issued with.
        overlap = activated + timedelta(minutes=1)
        for leaf in (early, late):
            done = _openssl_verify(r2, leaf.chain[1:], leaf.certificate, overlap, tmp_path)
            assert done.returncode == 0, done.stdout + done.stderr
        # After prepare's cross certificate expired, the late leaf verifies with the
        # cross certificate the CA publishes now (its own chain's has expired: the
        # narrow case docs/rotation.md names).
        after_prepare_cross = now + max_ttl + timedelta(hours=1)
        done = _openssl_verify(
            r2, ca.chain_certificates, late.certificate, after_prepare_cross, tmp_path
        )
        assert done.returncode == 0, done.stdout + done.stderr

        with pytest.raises(ConfigError, match="certificate it signed is still valid"):
            ca.rotate("root", "retire", now=late.record.not_after - timedelta(seconds=1))
        # Its last leaf has expired, the cross certificate of activate not yet.
        with pytest.raises(ConfigError, match=r"the cross certificate .* is valid until"):
            ca.rotate("root", "retire", now=late.record.not_after)
        retired_at = late.record.not_after + timedelta(seconds=1)
        ca.rotate("root", "retire", now=retired_at)
        assert list(ca.bundle) == [r2]

        forged = issue_leaf(
            LeafRequest(
                public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
                spiffe_id=SpiffeID.parse("spiffe://example.org/forged"),
            ),
            old_inter.certificate,
            old_key,
            ttl=timedelta(days=1),
            now=retired_at,
        )
        untrusted = [old_inter.certificate, *published.values()]
        for at in (retired_at, retired_at + timedelta(hours=1)):
            done = _openssl_verify(r2, untrusted, forged, at, tmp_path)
            assert done.returncode != 0, done.stdout
            assert "certificate has expired" in done.stdout + done.stderr
        # The same forgery with the old root as anchor still verifies: only the cross
        # certificate's expiry is what refuses it above.
        done = _openssl_verify(r1, [old_inter.certificate], forged, retired_at, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
