"""CA keys in a PKCS#11 token (SoftHSM2) and the offline root: real `trustmesh`
processes, a real token, `openssl verify` as the independent check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError
from trustmesh.hsm import PKCS11URI, PKCS11Signer
from trustmesh.pki import pem_certificates

from ._server import running_server
from .test_ca_server import client, enroll, make_csr

MODULE = os.environ.get("TRUSTMESH_TEST_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
PIN = "4711-test"

pytestmark = pytest.mark.skipif(
    not Path(MODULE).exists() or shutil.which("softhsm2-util") is None,
    reason="SoftHSM2 is not installed (apt-get install softhsm2; .ci/run does)",
)


class Token:
    """A SoftHSM2 token in a temp SOFTHSM2_CONF directory, with its PIN in a file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pin_file = root / "pin"
        self.pin_file.write_text(PIN + "\n")

    def uri(self, obj: str, *, pin_file: Path | None = None, label: str = "trustmesh") -> str:
        pin = pin_file or self.pin_file
        return f"pkcs11:token={label};object={obj}?module-path={MODULE}&pin-source=file:{pin}"


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "trustmesh",
            "--pin",
            PIN,
            "--so-pin",
            f"so-{PIN}",
        ],
        check=True,
        capture_output=True,
    )
    yield Token(root)
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


def tm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m trustmesh ARGS` (a real process)."""
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    done = tm(*args, env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def refused(*args: str) -> str:
    """Run a command that must fail with exit 2 and one line on stderr; return it."""
    done = tm(*args)
    assert done.returncode == 2, done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def openssl_verify(
    root: Path, chain: Path, leaf: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(chain), *extra, str(leaf)],
        capture_output=True,
        text=True,
    )


def key_files(home: Path) -> list[str]:
    return sorted(p.name for p in home.iterdir() if p.suffix == ".key")


# -- the URI ---------------------------------------------------------------------------


def test_uri_round_trips_and_refuses_a_pin_inside() -> None:
    """An RFC 7512 URI parses and prints back; pin-value and a missing module are refused."""
    text = (
        "pkcs11:token=my%20token;object=ca;id=%01%ff?module-path=/usr/lib/x.so"
        "&pin-source=file:/etc/pin"
    )
    uri = PKCS11URI.parse(text)
    assert (uri.token, uri.object, uri.id, uri.module_path, uri.pin_source) == (
        "my token",
        "ca",
        b"\x01\xff",
        "/usr/lib/x.so",
        "file:/etc/pin",
    )
    assert PKCS11URI.parse(str(uri)) == uri
    with pytest.raises(ConfigError, match="pin-value"):
        PKCS11URI.parse("pkcs11:token=t?module-path=/x.so&pin-value=1234")
    with pytest.raises(ConfigError, match="module-path"):
        PKCS11URI.parse("pkcs11:token=t")
    with pytest.raises(ConfigError, match="unknown or empty attribute 'slot'"):
        PKCS11URI.parse("pkcs11:token=t;slot=1?module-path=/x.so")


# -- a CA in the token -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hsm_home(token: Token, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("hsm-ca") / "home"
    out = ok(
        "ca",
        "init",
        "--home",
        str(home),
        "--trust-domain",
        "example.org",
        "--pkcs11",
        token.uri("ca"),
        env={"TRUSTMESH_CA_PASSPHRASE": ""},
    )
    assert "PKCS#11 token" in out
    return home


@pytest.mark.slow
def test_ca_signs_in_the_token_and_openssl_verifies(hsm_home: Path, tmp_path: Path) -> None:
    """Leaves and the CRL are signed by a non-extractable token key; openssl verifies them."""
    assert key_files(hsm_home) == []
    with CertificateAuthority.open(hsm_home) as ca:
        refs = {i.role: i.key_ref for i in ca.issuers.issuers}
    for role in ("root", "intermediate"):
        assert refs[role].startswith("pkcs11:token=trustmesh;object=ca-" + role)
        signer = PKCS11Signer(PKCS11URI.parse(refs[role]))
        attrs = signer.attributes()
        assert attrs == {
            "sensitive": True,
            "extractable": False,
            "never_extractable": True,
            "always_sensitive": True,
        }
        with pytest.raises(TypeError, match="cannot be exported"):
            signer.private_key().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    show = ok("ca", "show", "--home", str(hsm_home), "--json")
    assert '"key_ref": "pkcs11:token=trustmesh;object=ca-intermediate' in show
    # issue two leaves without any passphrase: the token PIN comes from pin-source
    no_pass = {"TRUSTMESH_CA_PASSPHRASE": ""}
    for name in ("a", "b"):
        ok(
            "issue",
            f"spiffe://example.org/svc/{name}",
            "--home",
            str(hsm_home),
            "--out",
            str(tmp_path / name),
            env=no_pass,
        )
    root, inter = hsm_home / "root.pem", hsm_home / "intermediate.pem"
    for name in ("a", "b"):
        done = openssl_verify(root, inter, tmp_path / name / "cert.pem")
        assert done.returncode == 0, done.stdout + done.stderr
    serial = format(
        x509.load_pem_x509_certificate((tmp_path / "a" / "cert.pem").read_bytes()).serial_number,
        "x",
    )
    ok("revoke", serial, "--home", str(hsm_home), env=no_pass)
    crls = tmp_path / "chain.crl.pem"
    crls.write_text(ok("crl", "--home", str(hsm_home), "--chain", env=no_pass))
    revoked = openssl_verify(
        root, inter, tmp_path / "a" / "cert.pem", "-crl_check_all", "-CRLfile", str(crls)
    )
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr
    good = openssl_verify(
        root, inter, tmp_path / "b" / "cert.pem", "-crl_check_all", "-CRLfile", str(crls)
    )
    assert good.returncode == 0, good.stdout + good.stderr


@pytest.mark.slow
def test_ca_serve_on_the_token_key_enrolls_and_renews(hsm_home: Path, tmp_path: Path) -> None:
    """`ca serve` signs in the token: enrollment and mTLS renewal over the API."""
    with running_server(hsm_home, tmp_path) as server:
        identity, first = enroll(server, "spiffe://example.org/web", tmp_path / "web")
        _key, csr = make_csr("spiffe://example.org/web")
        with client(server, identity) as http:
            response = http.post("/v1/renew", json={"csr": csr})
        assert response.status_code == 201, response.text
        renewed = response.json()
        assert renewed["serial"] != first["serial"]
        # the OCSP answer is signed in the token too, and openssl verifies it
        (tmp_path / "renewed.pem").write_text(renewed["certificate"])
        ocsp = subprocess.run(
            ["openssl", "ocsp", "-issuer", str(hsm_home / "intermediate.pem"), "-cert",
             str(tmp_path / "renewed.pem"), "-url", f"{server.url}/v1/ocsp", "-CAfile",
             str(server.bundle)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "Response verify OK" in ocsp.stdout + ocsp.stderr, ocsp.stderr
        assert f"{tmp_path / 'renewed.pem'}: good" in ocsp.stdout
        for n, body in enumerate((first, renewed)):
            (tmp_path / f"leaf{n}.pem").write_text(
                body["chain"].split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
            )
            done = openssl_verify(
                hsm_home / "root.pem", hsm_home / "intermediate.pem", tmp_path / f"leaf{n}.pem"
            )
            assert done.returncode == 0, done.stdout + done.stderr
    assert key_files(hsm_home) == []


@pytest.mark.slow
def test_wrong_pin_missing_token_one_line_nothing_changed(
    token: Token, hsm_home: Path, tmp_path: Path
) -> None:
    """A wrong PIN or a missing token: exit 2, one line, no files, no records."""
    before = ok("list", "--home", str(hsm_home), "--json")
    good_pin = token.pin_file.read_text()
    token.pin_file.write_text("0000-wrong\n")
    try:
        line = refused(
            "issue",
            "spiffe://example.org/svc/x",
            "--home",
            str(hsm_home),
            "--out",
            str(tmp_path / "x"),
        )
        assert "PIN for PKCS#11 token 'trustmesh' is wrong" in line
        assert not (tmp_path / "x").exists()
        line = refused(
            "ca",
            "init",
            "--home",
            str(tmp_path / "new"),
            "--trust-domain",
            "example.org",
            "--pkcs11",
            token.uri("wrongpin"),
        )
        assert "PIN" in line
        assert not (tmp_path / "new").exists()
    finally:
        token.pin_file.write_text(good_pin)
    assert ok("list", "--home", str(hsm_home), "--json") == before
    line = refused(
        "ca",
        "init",
        "--home",
        str(tmp_path / "new"),
        "--trust-domain",
        "example.org",
        "--pkcs11",
        token.uri("x", label="nosuch"),
    )
    assert "No PKCS#11 token labelled 'nosuch'" in line
    assert not (tmp_path / "new").exists()
    line = refused(
        "ca",
        "init",
        "--home",
        str(tmp_path / "new"),
        "--trust-domain",
        "example.org",
        "--pkcs11",
        f"pkcs11:token=trustmesh?module-path={MODULE}&pin-value={PIN}",
    )
    assert "pin-value" in line
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_rotation_prepare_puts_the_new_intermediate_in_the_token(
    token: Token, tmp_path: Path
) -> None:
    """With a token CA, prepare generates the next intermediate in the token too, and it signs."""
    home = tmp_path / "home"
    ok(
        "ca",
        "init",
        "--home",
        str(home),
        "--trust-domain",
        "example.org",
        "--pkcs11",
        token.uri("rot"),
    )
    ok(
        "ca",
        "rotate",
        "intermediate",
        "prepare",
        "--home",
        str(home),
        env={"TRUSTMESH_CA_PASSPHRASE": ""},
    )
    assert key_files(home) == []
    with CertificateAuthority.open(home) as ca:
        prepared = ca.issuers.in_state("intermediate", "prepared")[0]
        assert prepared.key_ref.startswith("pkcs11:token=trustmesh;object=rot-intermediate-2-")
        assert prepared.key_pem is None
        later = prepared.prepared_at + ca.config.rotation_min_overlap + timedelta(minutes=1)
        ca.rotate("intermediate", "activate", now=later)
        issued = ca.issue("spiffe://example.org/after")
        assert issued.certificate.issuer == prepared.certificate.subject
        (tmp_path / "leaf.pem").write_bytes(pem_certificates([issued.certificate]))
        (tmp_path / "inter.pem").write_bytes(pem_certificates([prepared.certificate]))
        (tmp_path / "root.pem").write_bytes(pem_certificates([ca.root]))
    done = openssl_verify(tmp_path / "root.pem", tmp_path / "inter.pem", tmp_path / "leaf.pem")
    assert done.returncode == 0, done.stdout + done.stderr


# -- the offline root ------------------------------------------------------------------


@pytest.mark.slow
def test_offline_root_flow_then_ca_serve(tmp_path: Path) -> None:
    """Root on the 'offline' side only; the online CA serves and issues without root.key."""
    offline, online = tmp_path / "offline-root", tmp_path / "online"
    ok("ca", "root", "init", "--trust-domain", "example.org", "--out", str(offline))
    assert (offline / "root.key").exists()
    ok(
        "ca",
        "csr",
        "--trust-domain",
        "example.org",
        "--home",
        str(online),
        "--out",
        str(tmp_path / "inter.csr"),
    )
    ok(
        "ca",
        "root",
        "sign-intermediate",
        str(tmp_path / "inter.csr"),
        "--root",
        str(offline),
        "--root-crl-url",
        "http://ca.internal:8080/crl/root",
        "--out",
        str(tmp_path / "inter.pem"),
    )
    ok("ca", "root", "sign-crl", "--root", str(offline), "--out", str(tmp_path / "root.crl"))
    # bad input first: another root's certificate; nothing is written
    other = tmp_path / "other-root"
    ok("ca", "root", "init", "--trust-domain", "example.org", "--out", str(other))
    line = refused(
        "ca",
        "init",
        "--home",
        str(online),
        "--import-intermediate",
        str(tmp_path / "inter.pem"),
        "--root-cert",
        str(other / "root.pem"),
    )
    assert "not signed by --root-cert" in line
    assert not (online / "config.toml").exists()
    ok(
        "ca",
        "init",
        "--home",
        str(online),
        "--import-intermediate",
        str(tmp_path / "inter.pem"),
        "--root-cert",
        str(offline / "root.pem"),
        "--root-crl",
        str(tmp_path / "root.crl"),
    )
    assert not (online / "root.key").exists()
    assert key_files(online) == ["intermediate.key"]
    show = ok("ca", "show", "--home", str(online))
    assert "offline (not on this machine)" in show
    assert "rotation_auto = false" in (online / "config.toml").read_text()
    line = refused("ca", "rotate", "intermediate", "prepare", "--home", str(online))
    assert "kept offline" in line
    with running_server(online, tmp_path) as server:
        _identity, body = enroll(server, "spiffe://example.org/web", tmp_path / "web")
        with client(server) as http:
            chain_crls = http.get("/v1/crl/chain")
        assert chain_crls.status_code == 200, chain_crls.text
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(
        body["chain"].split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )
    (tmp_path / "chain.crl.pem").write_bytes(chain_crls.content)
    done = openssl_verify(
        offline / "root.pem",
        online / "intermediate.pem",
        leaf,
        "-crl_check_all",
        "-CRLfile",
        str(tmp_path / "chain.crl.pem"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # a later root CRL signed offline is imported; one from another root is refused
    ok("ca", "root", "sign-crl", "--root", str(other), "--out", str(tmp_path / "other.crl"))
    line = refused("ca", "root", "import-crl", str(tmp_path / "other.crl"), "--home", str(online))
    assert "not signed by this CA's root" in line
    ok("ca", "root", "sign-crl", "--root", str(offline), "--out", str(tmp_path / "root2.crl"))
    ok("ca", "root", "import-crl", str(tmp_path / "root2.crl"), "--home", str(online))
    assert (online / "root.crl").read_bytes() == (tmp_path / "root2.crl").read_bytes()


@pytest.mark.slow
def test_offline_root_with_the_intermediate_in_the_token(token: Token, tmp_path: Path) -> None:
    """`ca csr --pkcs11`: the online intermediate lives in the token; no key file at all."""
    offline, online = tmp_path / "offline-root", tmp_path / "online"
    ok("ca", "root", "init", "--trust-domain", "example.org", "--out", str(offline))
    ok(
        "ca",
        "csr",
        "--trust-domain",
        "example.org",
        "--home",
        str(online),
        "--pkcs11",
        token.uri("offl"),
        "--out",
        str(tmp_path / "inter.csr"),
    )
    ok(
        "ca",
        "root",
        "sign-intermediate",
        str(tmp_path / "inter.csr"),
        "--root",
        str(offline),
        "--out",
        str(tmp_path / "inter.pem"),
    )
    ok("ca", "root", "sign-crl", "--root", str(offline), "--out", str(tmp_path / "root.crl"))
    ok(
        "ca",
        "init",
        "--home",
        str(online),
        "--import-intermediate",
        str(tmp_path / "inter.pem"),
        "--root-cert",
        str(offline / "root.pem"),
        "--root-crl",
        str(tmp_path / "root.crl"),
        env={"TRUSTMESH_CA_PASSPHRASE": ""},
    )
    assert key_files(online) == []
    ok(
        "issue",
        "spiffe://example.org/svc/a",
        "--home",
        str(online),
        "--out",
        str(tmp_path / "a"),
        env={"TRUSTMESH_CA_PASSPHRASE": ""},
    )
    done = openssl_verify(
        offline / "root.pem", online / "intermediate.pem", tmp_path / "a" / "cert.pem"
    )
    assert done.returncode == 0, done.stdout + done.stderr
