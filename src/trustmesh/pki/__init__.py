"""The PKI core: pure functions over cryptography objects.

No I/O, no database, no web: everything here takes certificates, keys and
settings and returns new ones, so it is easy to test and to reuse.
"""

from ._bundles import (
    fingerprint,
    load_pem_certificates,
    pem_certificates,
    pkcs12_keystore,
    pkcs12_truststore,
)
from ._crl import (
    DEFAULT_CRL_LIFETIME,
    REASONS,
    RevokedEntry,
    build_crl,
    parse_reason,
    pem_crls,
)
from ._csr import MAX_CSR_BYTES, check_csr, load_csr, request_from_csr
from ._durations import format_duration, parse_duration
from ._inspect import (
    MAX_INSPECT_BYTES,
    BasicConstraintsSummary,
    CertificateSummary,
    ChainCheck,
    CRLSummary,
    CSRSummary,
    Inspectable,
    RevokedSummary,
    check_chain,
    crl_revocation_check,
    load_inspectable,
    relative_time,
    summarize_certificate,
    summarize_crl,
    summarize_csr,
)
from ._issue import (
    BACKDATE,
    MAX_BACKDATE,
    LeafRequest,
    check_backdate,
    create_intermediate,
    create_root,
    issue_leaf,
    new_serial,
    parse_backdate,
)
from ._keys import (
    KeyType,
    PrivateKey,
    PublicKey,
    describe_key,
    dump_private_key,
    generate_private_key,
    key_type_of,
    load_private_key,
    signature_hash_for,
)
from ._ocsp import OCSPStatus, build_ocsp_response, request_matches_issuer
from ._profiles import Profile, default_profile
from ._sans import SANAllowance, parse_dns_name, parse_ip_address
from ._spiffe import SpiffeID, glob_match, match_spiffe_pattern
from ._verify import spiffe_id_of, verify_ca_certificate, verify_chain

__all__ = [
    "BACKDATE",
    "DEFAULT_CRL_LIFETIME",
    "MAX_BACKDATE",
    "MAX_CSR_BYTES",
    "MAX_INSPECT_BYTES",
    "REASONS",
    "BasicConstraintsSummary",
    "CRLSummary",
    "CSRSummary",
    "CertificateSummary",
    "ChainCheck",
    "Inspectable",
    "KeyType",
    "LeafRequest",
    "OCSPStatus",
    "PrivateKey",
    "Profile",
    "PublicKey",
    "RevokedEntry",
    "RevokedSummary",
    "SANAllowance",
    "SpiffeID",
    "build_crl",
    "build_ocsp_response",
    "check_backdate",
    "check_chain",
    "check_csr",
    "create_intermediate",
    "create_root",
    "crl_revocation_check",
    "default_profile",
    "describe_key",
    "dump_private_key",
    "fingerprint",
    "format_duration",
    "generate_private_key",
    "glob_match",
    "issue_leaf",
    "key_type_of",
    "load_csr",
    "load_inspectable",
    "load_pem_certificates",
    "load_private_key",
    "match_spiffe_pattern",
    "new_serial",
    "parse_backdate",
    "parse_dns_name",
    "parse_duration",
    "parse_ip_address",
    "parse_reason",
    "pem_certificates",
    "pem_crls",
    "pkcs12_keystore",
    "pkcs12_truststore",
    "relative_time",
    "request_from_csr",
    "request_matches_issuer",
    "signature_hash_for",
    "spiffe_id_of",
    "summarize_certificate",
    "summarize_crl",
    "summarize_csr",
    "verify_ca_certificate",
    "verify_chain",
]
