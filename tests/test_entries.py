"""Registration entries: validation, storage (SQLite, PostgreSQL), audit, CLI and CA API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.errors import ConfigError, NotFoundError, PolicyError, SpiffeIDError
from trustmesh.pki import KeyType, parse_selector, selectors_match, spiffe_id_of

from ._server import ADMIN, Server, running_server
from .conftest import PASSPHRASE
from .test_ca_server import assert_problem, client, enroll, make_csr

NODE = "spiffe://example.org/node/host1"
OTHER_NODE = "spiffe://example.org/node/host2"
APP = "spiffe://example.org/svc/app"


def test_selectors_parse_and_normalize() -> None:
    """Selectors are validated per key and normalized (numbers, lower-case hashes)."""
    assert str(parse_selector("unix:uid:01001")) == "unix:uid:1001"
    assert str(parse_selector("unix:path:/usr/bin/my app")) == "unix:path:/usr/bin/my app"
    digest = "AB" * 32
    assert parse_selector(f"unix:sha256:{digest}").value == digest.lower()
    for bad, match in [
        ("unix:uid", "is not TYPE:KEY:VALUE"),
        ("k8s:ns:default", "unknown type 'k8s:ns'"),
        ("unix:uid:-1", "numeric uid"),
        ("unix:gid:4294967295", "numeric gid"),
        ("unix:uid:١٢", "numeric uid"),  # non-ASCII digits
        ("unix:path:bin/app", "absolute path"),
        ("unix:sha256:abc", "64 hex digits"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_selector(bad)


def test_selectors_match_needs_all_and_at_least_one() -> None:
    """An entry applies only when every one of its selectors is among the caller's."""
    have = ["unix:uid:1001", "unix:gid:100"]
    assert selectors_match(["unix:uid:1001"], have)
    assert selectors_match([parse_selector("unix:gid:100"), "unix:uid:1001"], have)
    assert not selectors_match(["unix:uid:1001", "unix:path:/bin/x"], have)
    assert not selectors_match([], have)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_create_list_show_delete_are_stored_and_audited(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Entries round-trip through the store and each change is a hash-chained audit event."""
    db_url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    ca = CertificateAuthority.init(
        tmp_path / "h", trust_domain="example.org", passphrase=PASSPHRASE, db_url=db_url
    )
    with ca:
        entry = ca.create_entry(
            APP,
            node_id=NODE,
            selectors=["unix:uid:1001", "unix:gid:100", "unix:uid:1001"],
            dns=["App.internal."],
            actor="test",
        )
        assert entry.selectors == ("unix:gid:100", "unix:uid:1001")
        assert entry.dns == ("app.internal",)
        other = ca.create_entry(APP, node_id=OTHER_NODE, selectors=["unix:uid:0"], actor="t")
        assert {e.entry_id for e in ca.list_entries()} == {entry.entry_id, other.entry_id}
        assert [e.entry_id for e in ca.list_entries(node_id=NODE)] == [entry.entry_id]
        assert ca.get_entry(entry.entry_id) == entry
        ca.delete_entry(entry.entry_id, actor="test")
        with pytest.raises(NotFoundError, match="trustmesh entry list"):
            ca.get_entry(entry.entry_id)
        with pytest.raises(NotFoundError):
            ca.delete_entry(entry.entry_id)
        actions = [(e.action, e.subject) for e in ca.audit_tail(3)]
        assert actions == [
            ("entry-create", entry.entry_id),
            ("entry-create", other.entry_id),
            ("entry-delete", entry.entry_id),
        ]
        assert ca.verify_audit().ok


def test_create_refuses_bad_input(ca: CertificateAuthority) -> None:
    """Bad IDs, foreign nodes, missing or bad selectors and disallowed names are refused."""
    good = {"node_id": NODE, "selectors": ["unix:uid:1"]}
    with pytest.raises(SpiffeIDError):
        ca.create_entry("http://example.org/x", **good)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"not a workload in trust domain example\.org"):
        ca.create_entry(APP, node_id="spiffe://other.org/node/h", selectors=["unix:uid:1"])
    with pytest.raises(ConfigError, match=r"SPIFFE ID spiffe://other\.org/app is not"):
        ca.create_entry("spiffe://other.org/app", **good)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must differ"):
        ca.create_entry(NODE, **good)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least one --selector"):
        ca.create_entry(APP, node_id=NODE, selectors=[])
    with pytest.raises(PolicyError, match="DNS name"):
        ca.create_entry(APP, node_id=NODE, selectors=["unix:uid:1"], dns=["example.com"])
    assert ca.list_entries() == []
    assert [e.action for e in ca.audit_tail(1)] == ["init"]


def test_cli_entry_commands(ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]) -> None:
    """`entry create|list|show|delete` work, with --json for scripts."""
    assert main(["entry", "create", APP, "--node", NODE, "--selector", "unix:uid:1001"]) == 0
    entry_id = capsys.readouterr().out.strip()
    assert main(["entry", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["entry_id"] for e in listed] == [entry_id]
    assert listed[0]["selectors"] == ["unix:uid:1001"]
    assert main(["entry", "show", entry_id]) == 0
    assert "unix:uid:1001" in capsys.readouterr().out
    assert main(["entry", "delete", entry_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"]["entry_id"] == entry_id
    assert main(["entry", "show", entry_id]) == 2
    assert "No registration entry" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--selector", "unix:uid:abc"], "Selector 'unix:uid:abc' needs a numeric uid"),
        (["--selector", "docker:label:x"], "unknown type 'docker:label'"),
        ([], "at least one --selector"),
        (["--selector", "unix:uid:1", "--ttl", "soon"], "--ttl"),
    ],
)
def test_cli_create_bad_input_is_one_line_exit_2(
    ca: CertificateAuthority, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Bad input to `entry create` exits 2 with one line naming the problem; nothing stored."""
    assert main(["entry", "create", APP, "--node", NODE, *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert ca.list_entries() == []


def test_cli_bad_ids_exit_2(ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed SPIFFE ID or a node outside the trust domain exits 2."""
    code = main(
        ["entry", "create", "spiffe://Example.org/x", "--node", NODE, "--selector", "unix:uid:1"]
    )
    assert code == 2
    assert "Invalid SPIFFE ID" in capsys.readouterr().err
    code = main(
        ["entry", "create", APP, "--node", "spiffe://evil.org/n", "--selector", "unix:uid:1"]
    )
    assert code == 2
    assert "not a workload in trust domain example.org" in capsys.readouterr().err


# -- the CA API, over real mTLS -----------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    workdir = tmp_path_factory.mktemp("entries-api")
    CertificateAuthority.init(
        workdir / "home",
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
    ).close()
    with running_server(workdir / "home", workdir) as server:
        yield server, workdir


@pytest.mark.slow
def test_api_admin_creates_node_reads_own_and_gets_svid(api: tuple[Server, Path]) -> None:
    """Admins create and delete entries; a node lists only its own and gets SVIDs only for them."""
    server, workdir = api
    admin, _ = enroll(server, ADMIN, workdir / "admin")
    node, _ = enroll(server, NODE, workdir / "node1")
    other, _ = enroll(server, OTHER_NODE, workdir / "node2")
    body = {
        "spiffe_id": APP,
        "node_id": NODE,
        "selectors": ["unix:uid:1001"],
        "dns": ["app.internal"],
    }
    with client(server, node) as http:
        assert_problem(http.post("/v1/entries", json=body), 403, "not_admin")
    with client(server, admin) as http:
        bad = http.post("/v1/entries", json={**body, "selectors": ["unix:uid:x"]})
        assert "numeric uid" in assert_problem(bad, 400)["detail"]
        assert_problem(http.post("/v1/entries", json={**body, "selectors": "unix:uid:1"}), 400)
        created = http.post("/v1/entries", json=body)
        assert created.status_code == 201, created.text
        entry = created.json()
        mine = http.post("/v1/entries", json={**body, "node_id": OTHER_NODE}).json()
    with client(server, node) as http:
        listed = http.get("/v1/entries").json()["entries"]
        assert [e["entry_id"] for e in listed] == [entry["entry_id"]]
        assert http.get(f"/v1/entries/{entry['entry_id']}").json()["spiffe_id"] == APP
        assert_problem(http.get(f"/v1/entries/{mine['entry_id']}"), 403, "wrong_node")
        assert_problem(http.get("/v1/entries", params={"node": OTHER_NODE}), 403)
        _key, csr = make_csr(APP)
        issued = http.post("/v1/entries/svid", json={"entry_id": entry["entry_id"], "csr": csr})
        assert issued.status_code == 201, issued.text
        cert = x509.load_pem_x509_certificate(issued.json()["certificate"].encode())
        assert spiffe_id_of(cert).uri == APP
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["app.internal"]
        # another node's entry, or another ID in the CSR: refused
        refused = http.post("/v1/entries/svid", json={"entry_id": mine["entry_id"], "csr": csr})
        assert_problem(refused, 403, "wrong_node")
        _, wrong = make_csr("spiffe://example.org/svc/admin-ish")
        refused = http.post("/v1/entries/svid", json={"entry_id": entry["entry_id"], "csr": wrong})
        assert_problem(refused, 403, "identity_change")
        assert_problem(http.delete(f"/v1/entries/{entry['entry_id']}"), 403, "not_admin")
    with client(server, other) as http:
        assert http.get("/v1/entries").json()["entries"] == [mine]
    with client(server) as http:  # no client certificate at all
        assert_problem(http.get("/v1/entries"), 401)
    with client(server, admin) as http:
        assert http.delete(f"/v1/entries/{entry['entry_id']}").status_code == 200
        assert_problem(http.get(f"/v1/entries/{entry['entry_id']}"), 404)
    with server.ca() as ca:
        actions = [e.action for e in ca.audit_tail(40)]
        assert "entry-svid" in actions
        assert "entry-delete" in actions
        assert "deny" in actions
