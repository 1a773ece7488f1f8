"""The OpenAPI document (src/trustmesh/ca_server/openapi.json) against the real app.

It must be valid OpenAPI 3.1, document every route the Starlette app serves, and
document no route the app does not serve.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import OAS31Validator
from openapi_schema_validator import validate as validate_instance
from openapi_spec_validator import OpenAPIV31SpecValidator
from openapi_spec_validator import validate as validate_spec
from starlette.routing import Route

import trustmesh
from trustmesh.authority import CertificateAuthority
from trustmesh.ca_server import create_app
from trustmesh.ca_server._openapi import load_openapi, openapi_response

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}

# Routes that act for an identity: they must declare the mutualTLS requirement, and
# no other route may.
MTLS = {
    ("/v1/renew", "post"),
    ("/v1/revoke", "post"),
    ("/v1/revocations", "get"),
    ("/v1/revocations/stream", "get"),
    ("/v1/certificates", "get"),
    ("/v1/entries", "get"),
    ("/v1/entries", "post"),
    ("/v1/entries/{entry_id}", "get"),
    ("/v1/entries/{entry_id}", "delete"),
    ("/v1/entries/svid", "post"),
    ("/v1/entries/jwt-svid", "post"),
}

DOCS_API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return load_openapi()


def openapi_path(starlette_path: str) -> str:
    """``/v1/ocsp/{request:path}`` -> ``/v1/ocsp/{request}`` (drop Starlette convertors)."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", starlette_path)


def served(ca: CertificateAuthority) -> set[tuple[str, str]]:
    app: Any = create_app(ca)  # an ASGI wrapper (request metrics) around the Starlette app
    operations = set()
    for route in app.routes:
        assert isinstance(route, Route), f"{route!r}: teach this test about {type(route)}"
        assert route.methods, f"{route.path} has no methods"
        for method in route.methods - {"HEAD"}:  # Starlette adds HEAD to every GET
            operations.add((openapi_path(route.path), method.lower()))
    return operations


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def test_document_is_openapi_31(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"]
    assert doc["info"]["version"] == trustmesh.__version__
    assert doc["paths"]
    for name in (
        "EnrollRequest",
        "RenewRequest",
        "RevokeRequest",
        "IssuedCertificate",
        "RevocationEvent",
        "Problem",
    ):
        assert name in doc["components"]["schemas"], name
    assert doc["components"]["securitySchemes"]["mutualTLS"]["type"] == "mutualTLS"
    validate_spec(doc, cls=OpenAPIV31SpecValidator)


def test_every_served_route_is_documented(ca: CertificateAuthority, doc: dict[str, Any]) -> None:
    missing = served(ca) - documented(doc)
    assert not missing, f"routes served but not in openapi.json: {sorted(missing)}"


def test_every_documented_route_is_served(ca: CertificateAuthority, doc: dict[str, Any]) -> None:
    extra = documented(doc) - served(ca)
    assert not extra, f"routes in openapi.json that the app does not serve: {sorted(extra)}"


def test_mtls_requirement_is_declared_exactly_where_needed(doc: dict[str, Any]) -> None:
    assert "security" not in doc  # no global requirement: most routes are open
    for path, method, operation in operations(doc):
        needs = (path, method) in MTLS
        assert (operation.get("security") == [{"mutualTLS": []}]) == needs, (path, method)
        if needs:
            assert "401" in operation["responses"], (path, method)
            assert "403" in operation["responses"], (path, method)


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_operations_are_complete(doc: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in operations(doc)]
    assert len(ids) == len(set(ids)), "operationId values must be unique"
    for path, method, operation in operations(doc):
        assert operation.get("summary"), (path, method)
        responses = operation["responses"]
        assert any(code.startswith("2") for code in responses), (path, method)
        for code, response in responses.items():
            content = resolve(doc, response).get("content", {})
            if code.startswith(("4", "5")):  # every error is RFC 9457 problem+json
                assert list(content) == ["application/problem+json"], (path, method, code)
        if "requestBody" in operation:  # every body is subject to the 64 KiB limit
            assert "413" in responses, (path, method)


def examples(doc: dict[str, Any]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """Yield (where, example, schema) for every JSON example in the document."""
    for name, schema in doc["components"]["schemas"].items():
        for value in schema.get("examples", []):
            yield f"schemas/{name}", value, schema
    bodies: list[tuple[str, dict[str, Any]]] = []
    for path, method, operation in operations(doc):
        if "requestBody" in operation:
            bodies.append((f"{method} {path} request", operation["requestBody"]))
        for code, response in operation["responses"].items():
            bodies.append((f"{method} {path} {code}", resolve(doc, response)))
    for where, body in bodies:
        for media_type, media in body.get("content", {}).items():
            if not media_type.endswith("json") or "schema" not in media:
                continue
            if "example" in media:
                yield where, media["example"], media["schema"]
            for key, example in media.get("examples", {}).items():
                yield f"{where} {key}", example["value"], media["schema"]


def test_examples_match_their_schemas(doc: dict[str, Any]) -> None:
    seen = 0
    for where, value, schema in examples(doc):
        # Resolve $refs against the document's components.
        root = {**schema, "components": doc["components"]}
        try:
            validate_instance(value, root, cls=OAS31Validator)
        except Exception as exc:
            pytest.fail(f"{where}: example does not match its schema: {exc}")
        seen += 1
    assert seen >= 20


def test_served_as_json(doc: dict[str, Any]) -> None:
    response = openapi_response(None)  # type: ignore[arg-type]  # the request is not used
    assert response.media_type == "application/json"
    assert response.status_code == 200
    assert bytes(response.body).decode().startswith("{")
    assert load_openapi() == doc
    load_openapi()["paths"].clear()  # callers get their own copy
    assert load_openapi()["paths"]


def test_human_docs_cover_every_route(doc: dict[str, Any]) -> None:
    text = DOCS_API.read_text()
    for path, method in documented(doc):
        assert f"{method.upper()} {path}" in text, f"docs/api.md does not describe {method} {path}"
    for reason in doc["components"]["schemas"]["Problem"]["properties"]["reason"]["examples"]:
        assert f"`{reason}`" in text, f"docs/api.md does not explain reason {reason}"
