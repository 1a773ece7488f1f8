"""The CLI contract: commands, files, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from rich.console import Console as RichConsole

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main

from .conftest import PASSPHRASE


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def initialized(capsys: pytest.CaptureFixture[str], home: Path) -> Path:
    code, _, err = run(capsys, "ca", "init", "--trust-domain", "example.org")
    assert code == 0, err
    return home


def issue(
    capsys: pytest.CaptureFixture[str], out: Path, spiffe_id: str, *extra: str
) -> dict[str, Any]:
    code, stdout, err = run(capsys, "issue", spiffe_id, "--out", str(out), "--json", *extra)
    assert code == 0, err
    data: dict[str, Any] = json.loads(stdout)
    return data


def make_csr(
    spiffe_ids: list[str], *, key: object = None, dns: list[str] | None = None, ca: bool = False
) -> bytes:
    private = key or ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(s) for s in spiffe_ids]
    names += [x509.DNSName(d) for d in dns or []]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "example.org")])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    csr = builder.sign(private, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


def test_init_writes_encrypted_keys_with_mode_0600(initialized: Path) -> None:
    for name in ("root.key", "intermediate.key"):
        path = initialized / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    config = (initialized / "config.toml").read_text()
    assert 'trust_domain = "example.org"' in config
    assert "[profiles.service]" in config


def test_issue_writes_four_files_and_key_is_private(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    out = tmp_path / "api"
    data = issue(
        capsys, out, "spiffe://example.org/api", "--dns", "api.internal", "--ip", "10.1.2.3"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "bundle.pem",
        "cert.pem",
        "chain.pem",
        "key.pem",
    ]
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert format(cert.serial_number, "x") == data["serial"]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/api"]
    assert san.get_values_for_type(x509.DNSName) == ["api.internal"]
    chain = x509.load_pem_x509_certificates((out / "chain.pem").read_bytes())
    assert chain[0] == cert
    assert len(chain) == 2
    # the default profile: 24 h
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() == 24 * 3600 + 60


def test_sign_csr_and_list_revoke_crl_audit(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    csr = tmp_path / "req.pem"
    csr.write_bytes(make_csr(["spiffe://example.org/worker"], dns=["worker.svc"]))
    out = tmp_path / "worker.pem"
    code, stdout, err = run(capsys, "sign", str(csr), "--ttl", "1h", "--out", str(out), "--json")
    assert code == 0, err
    serial = json.loads(stdout)["serial"]
    assert len(x509.load_pem_x509_certificates(out.read_bytes())) == 2

    code, stdout, _ = run(capsys, "list", "--id", "spiffe://example.org/*", "--json")
    assert [r["serial"] for r in json.loads(stdout)] == [serial]
    code, stdout, _ = run(capsys, "list", "--expiring", "2h", "--json")
    assert [r["serial"] for r in json.loads(stdout)] == [serial]

    code, stdout, err = run(capsys, "revoke", serial, "--reason", "superseded", "--json")
    assert code == 0, err
    assert json.loads(stdout)[0]["revocation_reason"] == "superseded"
    code, stdout, _ = run(capsys, "list", "--revoked", "--json")
    assert [r["status"] for r in json.loads(stdout)] == ["revoked"]

    crl_path = tmp_path / "crl.der"
    code, _, err = run(capsys, "crl", "--out", str(crl_path))
    assert code == 0, err
    crl = x509.load_der_x509_crl(crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None

    code, stdout, _ = run(capsys, "audit", "tail", "-n", "3", "--json")
    assert [e["action"] for e in json.loads(stdout)] == ["sign", "revoke", "crl"]
    code, stdout, _ = run(capsys, "audit", "verify")
    assert code == 0
    assert "4 event(s)" in stdout


def test_revoke_by_id_revokes_every_valid_certificate(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    first = issue(capsys, tmp_path / "a", "spiffe://example.org/api")
    second = issue(capsys, tmp_path / "b", "spiffe://example.org/api")
    issue(capsys, tmp_path / "c", "spiffe://example.org/other")
    code, stdout, _ = run(capsys, "revoke", "--id", "spiffe://example.org/api", "--json")
    assert code == 0
    assert {r["serial"] for r in json.loads(stdout)} == {first["serial"], second["serial"]}


def test_ca_show_json(capsys: pytest.CaptureFixture[str], initialized: Path) -> None:
    code, stdout, _ = run(capsys, "ca", "show", "--json")
    info = json.loads(stdout)
    assert code == 0
    assert info["trust_domain"] == "example.org"
    assert info["root"]["subject"] == "CN=trustmesh Root CA,O=example.org"
    assert info["intermediate"]["not_after"] < info["root"]["not_after"]


def test_passphrase_file_and_prompt_free_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRUSTMESH_CA_PASSPHRASE")
    secret = tmp_path / "pass"
    secret.write_text("from a file\n")
    code, _, err = run(
        capsys, "ca", "init", "--trust-domain", "example.org", "--passphrase-file", str(secret)
    )
    assert code == 0, err
    code, _, err = run(capsys, "issue", "spiffe://example.org/a", "--out", str(tmp_path / "a"))
    assert code == 2
    assert "No CA passphrase" in err
    code, _, err = run(
        capsys,
        "issue",
        "spiffe://example.org/a",
        "--out",
        str(tmp_path / "a"),
        "--passphrase-file",
        str(secret),
    )
    assert code == 0, err


# -- bad input: one line, exit 2, nothing written --------------------------------------


def _bad_csr_signature() -> bytes:
    pem = make_csr(["spiffe://example.org/api"])
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit inside the signature
    return bytes(der)


@pytest.mark.parametrize(
    ("argv", "csr", "expected"),
    [
        (["issue", "spiffe://other.org/api"], None, "allows SPIFFE IDs matching"),
        (
            ["issue", "spiffe://example.org/api", "--dns", "www.google.com"],
            None,
            "Refusing DNS name",
        ),
        (["issue", "spiffe://example.org/api", "--ip", "8.8.8.8"], None, "Refusing IP address"),
        (["issue", "spiffe://example.org/api", "--ttl", "30d"], None, "at most 7d"),
        (["issue", "spiffe://example.org/api", "--ttl", "soon"], None, "--ttl"),
        (
            ["issue", "spiffe://example.org/api", "--profile", "nope"],
            None,
            "Unknown profile 'nope'",
        ),
        (["issue", "http://example.org/api"], None, "spiffe"),
        (
            ["sign", "{csr}"],
            b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n",
            "not a certificate signing request",
        ),
        (["sign", "{csr}"], _bad_csr_signature(), "signature"),
        (
            ["sign", "{csr}"],
            make_csr(["spiffe://example.org/a"], key=rsa.generate_private_key(65537, 1024)),  # noqa: S505 - the weak key under test
            "RSA 1024-bit",
        ),
        (["sign", "{csr}"], make_csr([]), "exactly one"),
        (
            ["sign", "{csr}"],
            make_csr(["spiffe://example.org/a", "spiffe://example.org/b"]),
            "exactly one",
        ),
        (["sign", "{csr}"], make_csr(["spiffe://example.org/a"], ca=True), "CA certificate"),
        (["sign", "{csr}"], b"x" * 20000, "limited to 16384 bytes"),
        (["revoke", "abcdef"], None, "No certificate with serial"),
        (["revoke", "xyz"], None, "not a certificate serial"),
        (["revoke", "1", "--reason", "bored"], None, "Unknown revocation reason"),
        # click's own refusals are one line too, naming the option and where help is
        (
            ["issue", "spiffe://example.org/a", "--key-type", "ecp256"],
            None,
            "error: Invalid value for '--key-type': 'ecp256' is not one of",
        ),
        (["list", "--limit", "0"], None, "See 'trustmesh list --help'."),
        (["issue", "spiffe://example.org/a", "--tll", "1h"], None, "No such option '--tll'"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
    initialized: Path,
    tmp_path: Path,
    argv: list[str],
    csr: bytes | None,
    expected: str,
) -> None:
    csr_path = tmp_path / "req.pem"
    if csr is not None:
        csr_path.write_bytes(csr)
    out = tmp_path / "out"
    args = [a.replace("{csr}", str(csr_path)) for a in argv]
    args += (
        ["--out", str(out / "x.pem") if args[0] == "sign" else str(out)]
        if args[0] in {"issue", "sign"}
        else []
    )
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-written
    _, stdout, _ = run(capsys, "list", "--json")
    assert json.loads(stdout) == []  # nothing recorded


def test_wrong_passphrase_exits_2(
    capsys: pytest.CaptureFixture[str],
    initialized: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRUSTMESH_CA_PASSPHRASE", "wrong")
    code, _, err = run(capsys, "issue", "spiffe://example.org/api", "--out", str(tmp_path / "o"))
    assert code == 2
    assert err.startswith("error: Wrong passphrase")
    assert len(err.splitlines()) == 1


def test_existing_ca_is_not_overwritten(
    capsys: pytest.CaptureFixture[str], initialized: Path
) -> None:
    before = (initialized / "root.pem").read_bytes()
    code, _, err = run(capsys, "ca", "init", "--trust-domain", "example.org")
    assert code == 2
    assert "refusing to overwrite" in err
    assert (initialized / "root.pem").read_bytes() == before


def test_unreachable_database_exits_2_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    code, _, err = run(
        capsys,
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--db",
        "postgresql://nobody@127.0.0.1:1/none",
    )
    assert code == 2
    assert "Cannot reach the database at postgresql+psycopg://nobody@127.0.0.1:1/none" in err
    assert len(err.strip().splitlines()) == 1
    assert not any(home.glob("*.key"))


def test_malformed_pem_for_export_exits_2(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    code, _, err = run(
        capsys,
        "export",
        "p12",
        "--cert",
        str(bad),
        "--key",
        str(bad),
        "--out",
        str(tmp_path / "x.p12"),
    )
    assert code == 2
    assert "does not hold PEM certificates" in err
    assert not (tmp_path / "x.p12").exists()


def test_no_ca_yet_tells_how_to_create_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "list")
    assert code == 2
    assert "trustmesh ca init" in err


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str], initialized: Path) -> None:
    code, _, _ = run(capsys, "revoke")
    assert code == 2
    code, _, _ = run(capsys, "issue")
    assert code == 2


def test_python_dash_m_runs_the_cli(initialized: Path, tmp_path: Path) -> None:
    env = dict(os.environ)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trustmesh",
            "issue",
            "spiffe://example.org/m",
            "--out",
            str(tmp_path / "m"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spiffe_id"] == "spiffe://example.org/m"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trustmesh",
            "issue",
            "spiffe://example.org/m",
            "--ttl",
            "9d",
            "--out",
            str(tmp_path / "n"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: Refusing a lifetime of 9d")


# -- issue 14: output is data, never markup ---------------------------------------------


def _emoji_fingerprints(info: dict[str, Any]) -> list[str]:
    """The fingerprints a default Rich console would change (":AB:" is 🆎, ":CD:" is 💿)."""
    rich = RichConsole(emoji=True, markup=True)
    return [
        info[role]["sha256"]
        for role in ("root", "intermediate")
        if rich.render_str(info[role]["sha256"]).plain != info[role]["sha256"]
    ]


def test_fingerprints_with_emoji_codes_print_verbatim(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`ca init` and `ca show` print a SHA-256 fingerprint holding ":AB:" or ":CD:" exactly
    as it is, not as an emoji, both in-process and from `python -m trustmesh`."""
    for attempt in range(100):  # about a fifth of fresh CAs have such a fingerprint
        home = tmp_path / f"ca{attempt}"
        code, init_out, err = run(
            capsys, "ca", "init", "--trust-domain", "example.org", "--home", str(home)
        )
        assert code == 0, err
        code, stdout, err = run(capsys, "ca", "show", "--home", str(home), "--json")
        assert code == 0, err
        wanted = _emoji_fingerprints(json.loads(stdout))
        if wanted:
            break
    else:  # pragma: no cover - about 0.8**100
        pytest.fail("no CA with an emoji code in its fingerprint")
    shown = subprocess.run(
        [sys.executable, "-m", "trustmesh", "ca", "show", "--home", str(home)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    code, show_out, err = run(capsys, "ca", "show", "--home", str(home))
    assert code == 0, err
    for text in (init_out, shown.stdout, show_out):
        for value in wanted:
            assert value in text, text
        assert "\N{NEGATIVE SQUARED AB}" not in text
        assert "\N{OPTICAL DISC}" not in text


def test_user_data_with_markup_prints_verbatim(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Console markup and emoji codes in user data (the CA home path, an identity-server
    client name, a user's e-mail, audit details) are printed as typed."""
    home = tmp_path / "h[bold]x[/bold]:cd:"
    code, stdout, err = run(
        capsys, "ca", "init", "--trust-domain", "example.org", "--home", str(home)
    )
    assert code == 0, err
    assert str(home) in stdout
    code, stdout, err = run(capsys, "ca", "show", "--home", str(home))
    assert code == 0, err
    assert str(home) in stdout
    client = "[red]x[/red]:ab:"
    code, _, err = run(
        capsys, "idp", "client", "add", client, "--scope", "read", "--home", str(home)
    )
    assert code == 0, err
    code, stdout, err = run(capsys, "idp", "client", "list", "--home", str(home))
    assert code == 0, err
    assert client in stdout
    email = "[bold]a[/bold]@:cd:.org"
    monkeypatch.setenv("TRUSTMESH_IDP_USER_PASSWORD", "a long enough password 1")
    code, _, err = run(capsys, "idp", "user", "add", "erin", "--email", email, "--home", str(home))
    assert code == 0, err
    code, stdout, err = run(capsys, "idp", "user", "list", "--home", str(home))
    assert code == 0, err
    assert email in stdout
    code, stdout, err = run(capsys, "audit", "tail", "--home", str(home))
    assert code == 0, err
    assert f"name={client}" in stdout
    assert "\N{NEGATIVE SQUARED AB}" not in stdout


# -- issue 14: existing key and certificate files are not overwritten silently ----------


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_issue_refuses_to_overwrite_without_force(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    """A second `issue --out DIR` exits 2 naming the files and --force, leaves them and
    the CA's records untouched; with --force it replaces them atomically, key.pem 0600."""
    out = tmp_path / "api"
    first = issue(capsys, out, "spiffe://example.org/api")
    before = _files(out)
    code, stdout, err = run(capsys, "issue", "spiffe://example.org/api", "--out", str(out))
    assert (code, stdout) == (2, "")
    assert err.startswith(f"error: Refusing to overwrite {out / 'key.pem'}, ")
    assert "pass --force to replace them, or give another --out." in err
    assert err.count("\n") == 1
    assert _files(out) == before
    code, stdout, _ = run(capsys, "list", "--json")
    assert [r["serial"] for r in json.loads(stdout)] == [first["serial"]]

    # one leftover file is enough to refuse
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "cert.pem").write_text("keep me\n")
    code, _, err = run(capsys, "issue", "spiffe://example.org/lone", "--out", str(lone))
    assert code == 2
    assert f"Refusing to overwrite {lone / 'cert.pem'}: pass --force to replace it" in err
    assert (lone / "cert.pem").read_text() == "keep me\n"

    (out / "key.pem").chmod(0o644)
    second = issue(capsys, out, "spiffe://example.org/api", "--force")
    assert second["serial"] != first["serial"]
    after = _files(out)
    assert after["key.pem"] != before["key.pem"]
    assert after["cert.pem"] != before["cert.pem"]
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(after["cert.pem"])
    key = serialization.load_pem_private_key(after["key.pem"], None)
    assert cert.public_key() == key.public_key()
    assert format(cert.serial_number, "x") == second["serial"]
    assert sorted(after) == ["bundle.pem", "cert.pem", "chain.pem", "key.pem"]


def test_sign_and_export_refuse_to_overwrite_without_force(
    capsys: pytest.CaptureFixture[str],
    initialized: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`sign --out`, `export p12|truststore|bundle --out` exit 2 on an existing file and
    leave it alone; with --force they replace it (the keystore with mode 0600)."""
    monkeypatch.setenv("TRUSTMESH_P12_PASSWORD", "store-pass-123")
    ident = tmp_path / "ident"
    issue(capsys, ident, "spiffe://example.org/api")
    csr = tmp_path / "req.pem"
    csr.write_bytes(make_csr(["spiffe://example.org/worker"]))
    chain, cert, key = str(tmp_path / "chain.pem"), str(ident / "cert.pem"), str(ident / "key.pem")
    commands = {
        "chain.pem": ["sign", str(csr), "--out", chain],
        "app.p12": ["export", "p12", "--cert", cert, "--key", key],
        "trust.p12": ["export", "truststore"],
        "bundle.pem": ["export", "bundle"],
    }
    for name, argv in commands.items():
        target = tmp_path / name
        if "--out" not in argv:
            argv = [*argv, "--out", str(target)]
        target.write_text("operator's file\n")
        target.chmod(0o644)
        code, stdout, err = run(capsys, *argv)
        assert (code, stdout) == (2, ""), (argv, err)
        assert err == (
            f"error: Refusing to overwrite {target}: pass --force to replace it, "
            f"or give another --out.\n"
        )
        assert target.read_text() == "operator's file\n"
        code, _, err = run(capsys, *argv, "--force")
        assert code == 0, (argv, err)
        assert target.read_bytes() != b"operator's file\n"
    assert len(x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes())) == 2
    assert stat.S_IMODE((tmp_path / "app.p12").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- issue 14: a list cut by --limit says so ---------------------------------------------


def test_list_says_when_limit_cut_it(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    """With more matches than --limit, `list` says "showing N of M" in its table title,
    on stderr with a bare --json list, and as total/truncated with --json --envelope."""
    with CertificateAuthority.open(initialized, passphrase=PASSPHRASE) as ca:
        for i in range(3):
            ca.issue(f"spiffe://example.org/ns/a/svc{i}", ttl=timedelta(hours=1))
        for i in range(3):
            ca.issue(f"spiffe://example.org/ns/b/svc{i}")
    code, stdout, err = run(capsys, "list", "--limit", "4")
    assert (code, err) == (0, "")
    assert "showing 4 of 6 certificate(s) (--limit 4); raise --limit to see them all" in stdout
    assert stdout.count("spiffe://example.org/ns/") == 4

    code, stdout, err = run(capsys, "list", "--limit", "4", "--json")
    assert code == 0
    assert len(json.loads(stdout)) == 4  # still the bare list scripts parse
    assert err == (
        "trustmesh list: showing 4 of 6 certificate(s) (--limit 4); "
        "raise --limit to see them all.\n"
    )

    code, stdout, err = run(capsys, "list", "--limit", "4", "--json", "--envelope")
    assert (code, err) == (0, "")
    page = json.loads(stdout)
    assert (page["shown"], page["total"], page["truncated"], page["limit"]) == (4, 6, True, 4)
    assert len(page["certificates"]) == 4

    cases = [
        (["--expiring", "2h", "--limit", "2"], 2, 3),  # the issue's case, with a small limit
        (["--id", "spiffe://example.org/ns/*/svc1", "--limit", "1"], 1, 2),  # a glob
        (["--id", "spiffe://example.org/ns/b/svc0", "--limit", "1"], 1, 1),
        (["--limit", "6"], 6, 6),
    ]
    for extra, shown, total in cases:
        code, stdout, err = run(capsys, "list", *extra, "--json", "--envelope")
        assert (code, err) == (0, ""), extra
        page = json.loads(stdout)
        assert (page["shown"], page["total"]) == (shown, total), extra
        assert page["truncated"] is (total > shown)
        code, stdout, err = run(capsys, "list", *extra, "--json")
        assert (code, bool(err)) == (0, total > shown), (extra, err)
        code, stdout, _ = run(capsys, "list", *extra)
        expected = f"showing {shown} of {total}" if total > shown else f"{total} certificate(s)"
        assert expected in stdout, extra

    for bad, message in (
        (["--limit", "0"], "Invalid value for '--limit'"),
        (["--envelope"], "--envelope goes with --json."),
    ):
        code, stdout, err = run(capsys, "list", *bad)
        assert (code, stdout) == (2, ""), bad
        assert message in err

    code, stdout, err = run(capsys, "audit", "tail", "-n", "2")
    assert code == 0, err
    assert "last 2 of 7 audit event(s)" in stdout  # init + 6 issues
    code, stdout, err = run(capsys, "audit", "tail", "-n", "20")
    assert "7 audit event(s)" in stdout
