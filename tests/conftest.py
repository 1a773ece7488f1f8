"""Shared fixtures: a real CA on disk, real SQLite, optionally real PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType
from trustmesh.store import normalize_url

PASSPHRASE = b"correct horse battery staple"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's ~/.trustmesh or their passphrase."""
    monkeypatch.setenv("TRUSTMESH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TRUSTMESH_CA_PASSPHRASE", PASSPHRASE.decode())
    monkeypatch.delenv("TRUSTMESH_P12_PASSWORD", raising=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def ca(home: Path) -> Iterator[CertificateAuthority]:
    authority = CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    )
    yield authority
    authority.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL schema for one test; skips without the env var."""
    base = os.environ.get("TRUSTMESH_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("TRUSTMESH_TEST_POSTGRES_URL is not set")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(normalize_url(base))
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture
def redis_url() -> str:
    """The local Redis from TRUSTMESH_TEST_REDIS_URL (CI: db 15); skips when unset."""
    url = os.environ.get("TRUSTMESH_TEST_REDIS_URL")
    if not url:
        pytest.skip("TRUSTMESH_TEST_REDIS_URL is not set")
    return url
