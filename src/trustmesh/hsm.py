"""The PKCS#11 key backend: CA keys generated and used inside a token (an HSM).

A key is named by an RFC 7512 URI, e.g.
``pkcs11:token=trustmesh;object=intermediate?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/trustmesh/pin``.
The key is generated in the token as sensitive and non-extractable; trustmesh only
keeps its URI (with ``id=`` added) as the issuer's ``key_ref``.

Signing happens in the token: :class:`PKCS11ECKey` and :class:`PKCS11RSAKey` are
``cryptography`` private key classes whose ``sign()`` calls ``C_Sign``
(``CKM_ECDSA`` on the digest, whose raw ``r || s`` becomes a DER ``ECDSA-Sig-Value``;
``CKM_SHA256_RSA_PKCS`` and friends for RSA). ``cryptography``'s certificate, CRL,
OCSP and CSR builders call ``key.sign()`` of any subclass of its key interfaces, so
nothing else in trustmesh changes. Exporting such a key raises ``TypeError``.

The PIN never appears on a command line or in the store: ``pin-source=file:PATH``
(the first line of the file), ``pin-source=env:NAME``, or ``TRUSTMESH_PKCS11_PIN``.
``pin-value`` is refused. The ``python-pkcs11`` package is an optional dependency
(``pip install 'trustmesh[pkcs11]'``).
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Self, TypeVar
from urllib.parse import quote, unquote, unquote_to_bytes

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    NoDigestInfo,
    Prehashed,
    encode_dss_signature,
)

from trustmesh.errors import ConfigError, PKIError
from trustmesh.pki import KeyType, PrivateKey

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "PIN_ENV",
    "PKCS11URI",
    "PKCS11ECKey",
    "PKCS11RSAKey",
    "PKCS11Signer",
    "check_token",
    "generate_pkcs11_key",
    "is_pkcs11_ref",
]

#: Environment variable holding the token PIN when the URI names no ``pin-source``.
PIN_ENV = "TRUSTMESH_PKCS11_PIN"

_PATH_ATTRS = ("token", "serial", "object", "id", "type")
_QUERY_ATTRS = ("module-path", "pin-source")
_CURVES = {KeyType.EC_P256: "secp256r1", KeyType.EC_P384: "secp384r1"}
_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072, KeyType.RSA_4096: 4096}


def is_pkcs11_ref(ref: str) -> bool:
    """True when a ``key_ref`` names a key in a PKCS#11 token."""
    return ref.startswith("pkcs11:")


def _bad(text: str, why: str) -> NoReturn:
    raise ConfigError(
        f"Bad PKCS#11 URI {text!r}: {why}. Expected e.g. 'pkcs11:token=trustmesh;"
        f"object=ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/path/pin' "
        f"(RFC 7512).",
        field="pkcs11",
    )


@dataclass(frozen=True)
class PKCS11URI:
    """An RFC 7512 URI naming a token (and a key in it), its module and PIN source.

    .. versionadded:: 0.3
    """

    token: str
    module_path: str
    object: str | None = None
    id: bytes | None = None
    serial: str | None = None
    pin_source: str | None = None

    @classmethod
    def parse(cls, text: str) -> PKCS11URI:
        """Parse ``pkcs11:path-attrs?query-attrs``.

        Raises:
            ConfigError: Not a PKCS#11 URI, no ``token`` or ``module-path``, an
                attribute trustmesh does not know, or a PIN inside the URI.
        """
        if not text.startswith("pkcs11:"):
            _bad(text, "it does not start with 'pkcs11:'")
        path, _, query = text.removeprefix("pkcs11:").partition("?")
        values: dict[str, str] = {}
        for part, sep, allowed in ((path, ";", _PATH_ATTRS), (query, "&", _QUERY_ATTRS)):
            for item in filter(None, part.split(sep)):
                name, eq, value = item.partition("=")
                if name == "pin-value":
                    raise ConfigError(
                        "Refusing a PIN inside the PKCS#11 URI (pin-value): it would show in "
                        "the process list and be stored with the key reference. Use "
                        "pin-source=file:PATH, pin-source=env:NAME or set "
                        f"{PIN_ENV}.",
                        field="pkcs11",
                    )
                if not eq or name not in allowed:
                    _bad(text, f"unknown or empty attribute {name!r} (known: {', '.join(allowed)})")
                if name in values:
                    _bad(text, f"{name!r} is given twice")
                values[name] = value
        raw_id = values.pop("id", None)
        values = {k: unquote(v) for k, v in values.items()}
        if not values.get("token"):
            _bad(text, "it names no token (token=LABEL)")
        if not values.get("module-path"):
            _bad(text, "it names no PKCS#11 module (module-path=/path/to/module.so)")
        if values.get("type", "private") != "private":
            _bad(text, "type must be 'private' (a private key)")
        return cls(
            token=values["token"],
            module_path=values["module-path"],
            object=values.get("object") or None,
            id=unquote_to_bytes(raw_id) if raw_id else None,
            serial=values.get("serial") or None,
            pin_source=values.get("pin-source") or None,
        )

    def with_key(self, label: str, key_id: bytes) -> PKCS11URI:
        """This URI naming one key (``object`` and ``id``)."""
        return replace(self, object=label, id=key_id)

    def __str__(self) -> str:
        def q(value: str) -> str:
            return quote(value, safe="")

        path = [f"token={q(self.token)}"]
        if self.serial:
            path.append(f"serial={q(self.serial)}")
        if self.object:
            path.append(f"object={q(self.object)}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        query = [f"module-path={quote(self.module_path, safe='/')}"]
        if self.pin_source:
            query.append(f"pin-source={quote(self.pin_source, safe='/:')}")
        return "pkcs11:" + ";".join(path) + "?" + "&".join(query)

    def pin(self) -> str:
        """Read the token PIN from ``pin-source`` or :data:`PIN_ENV`.

        Raises:
            ConfigError: The source is unknown, unreadable or empty.
        """
        source = self.pin_source
        if source is None:
            value = os.environ.get(PIN_ENV, "")
            if not value:
                raise ConfigError(
                    f"No PIN for PKCS#11 token {self.token!r}: add pin-source=file:PATH to "
                    f"the URI or set {PIN_ENV}.",
                    field="pkcs11",
                )
            return value
        if source.startswith("env:"):
            name = source.removeprefix("env:")
            value = os.environ.get(name, "")
            if not value:
                raise ConfigError(
                    f"The PIN of PKCS#11 token {self.token!r} is to come from ${name} "
                    f"(pin-source=env:{name}), which is unset or empty: set it.",
                    field="pkcs11",
                )
            return value
        if source.startswith("file:"):
            path = source.removeprefix("file:")
            path = path.removeprefix("//") if path.startswith("///") else path
            try:
                with open(path, encoding="utf-8") as fh:
                    value = fh.readline().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    f"Cannot read the PIN of PKCS#11 token {self.token!r} from {path}: "
                    f"{exc.strerror}. Fix pin-source or the file's permissions.",
                    path=path,
                ) from None
            if not value:
                raise ConfigError(f"{path} is empty: put the token PIN in it.", path=path)
            return value
        raise ConfigError(
            f"Unknown pin-source {source!r} for PKCS#11 token {self.token!r}: use "
            f"file:PATH or env:NAME.",
            field="pkcs11",
        )


# -- sessions -------------------------------------------------------------------------


def _module() -> Any:
    try:
        import pkcs11
        import pkcs11.exceptions  # not loaded by 'import pkcs11' alone
        import pkcs11.util.ec
    except ImportError:
        raise ConfigError(
            "The PKCS#11 key backend needs the 'python-pkcs11' package, which is not "
            "installed: pip install 'trustmesh[pkcs11]'."
        ) from None
    return pkcs11


_lock = threading.Lock()
_libs: dict[str, Any] = {}
_sessions: dict[tuple[str, str, str | None], _Session] = {}


@dataclass
class _Session:
    """One logged-in R/W session per token and process; C_Sign calls are serialized."""

    session: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


def _session(uri: PKCS11URI) -> _Session:
    pkcs11 = _module()
    exc = pkcs11.exceptions
    key = (uri.module_path, uri.token, uri.serial)
    with _lock:
        if key in _sessions:
            return _sessions[key]
        pin = uri.pin()
        try:
            lib = _libs.get(uri.module_path)
            if lib is None:
                lib = _libs[uri.module_path] = pkcs11.lib(uri.module_path)
        except (OSError, RuntimeError, exc.PKCS11Error) as err:
            raise ConfigError(
                f"Cannot load the PKCS#11 module {uri.module_path} ({err or type(err).__name__}): "
                f"fix module-path in the URI or install the module.",
                path=uri.module_path,
            ) from None
        try:
            criteria: dict[str, object] = {"token_label": uri.token}
            if uri.serial:
                criteria["token_serial"] = uri.serial.encode()
            token = lib.get_token(**criteria)
        except exc.NoSuchToken:
            raise ConfigError(
                f"No PKCS#11 token labelled {uri.token!r} in {uri.module_path}: initialise "
                f"it (softhsm2-util --init-token --free --label {uri.token}) or fix token= "
                f"in the URI (for SoftHSM2, check SOFTHSM2_CONF).",
                field="pkcs11",
            ) from None
        except exc.MultipleTokensReturned:
            raise ConfigError(
                f"Several PKCS#11 tokens are labelled {uri.token!r}: add serial= to the URI.",
                field="pkcs11",
            ) from None
        try:
            session = token.open(rw=True, user_pin=pin)
        except (exc.PinIncorrect, exc.PinLenRange, exc.PinInvalid):
            raise ConfigError(
                f"The PIN for PKCS#11 token {uri.token!r} is wrong: fix the PIN source "
                f"({uri.pin_source or PIN_ENV}). Nothing was changed.",
                field="pkcs11",
                reason="pin",
            ) from None
        except exc.PinLocked:
            raise ConfigError(
                f"The user PIN of PKCS#11 token {uri.token!r} is locked: unlock it with the "
                f"security officer PIN.",
                field="pkcs11",
                reason="pin",
            ) from None
        except exc.PKCS11Error as err:
            raise ConfigError(
                f"Cannot log in to PKCS#11 token {uri.token!r}: {type(err).__name__}.",
                field="pkcs11",
            ) from None
        _sessions[key] = s = _Session(session)
        return s


def check_token(uri: PKCS11URI) -> None:
    """Log in to the token of ``uri`` (before anything is created).

    Raises:
        ConfigError: The module, token or PIN is wrong.

    .. versionadded:: 0.3
    """
    _session(uri)


def _private_template(pkcs11: Any) -> dict[Any, object]:
    a = pkcs11.Attribute
    return {
        a.TOKEN: True,
        a.PRIVATE: True,
        a.SENSITIVE: True,
        a.EXTRACTABLE: False,
        a.SIGN: True,
    }


def _keys_labelled(session: Any, label: str) -> Iterator[Any]:
    pkcs11 = _module()
    yield from session.get_objects(
        {pkcs11.Attribute.LABEL: label, pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}
    )


def generate_pkcs11_key(uri: PKCS11URI, key_type: KeyType, label: str) -> PKCS11Signer:
    """Generate a non-extractable signing key named ``label`` in the token of ``uri``.

    Raises:
        ConfigError: The module, token or PIN is wrong, a key with that label
            exists already, or the key type cannot live in a token (Ed25519).

    .. versionadded:: 0.3
    """
    if key_type not in _CURVES and key_type not in _RSA_BITS:
        raise ConfigError(
            f"Key type {key_type.value} is not supported in a PKCS#11 token: use "
            f"ec-p256, ec-p384 or rsa-2048/3072/4096.",
            field="key_type",
        )
    pkcs11 = _module()
    s = _session(uri)
    a = pkcs11.Attribute
    key_id = secrets.token_bytes(16)
    with s.lock:
        if next(_keys_labelled(s.session, label), None) is not None:
            raise ConfigError(
                f"PKCS#11 token {uri.token!r} already holds a key labelled {label!r}; "
                f"refusing to reuse it. Pick another object= in the URI or delete that key.",
                field="pkcs11",
            )
        public_template: dict[Any, object] = {a.TOKEN: True, a.VERIFY: True}
        try:
            if key_type in _CURVES:
                from pkcs11.util.ec import encode_named_curve_parameters

                params = s.session.create_domain_parameters(
                    pkcs11.KeyType.EC,
                    {a.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type])},
                    local=True,
                )
                params.generate_keypair(
                    id=key_id,
                    label=label,
                    store=True,
                    public_template=public_template,
                    private_template=_private_template(pkcs11),
                )
            else:
                s.session.generate_keypair(
                    pkcs11.KeyType.RSA,
                    _RSA_BITS[key_type],
                    id=key_id,
                    label=label,
                    store=True,
                    public_template={**public_template, a.PUBLIC_EXPONENT: b"\x01\x00\x01"},
                    private_template=_private_template(pkcs11),
                )
        except pkcs11.exceptions.PKCS11Error as err:
            raise ConfigError(
                f"PKCS#11 token {uri.token!r} could not generate a {key_type.value} key: "
                f"{type(err).__name__}.",
                field="pkcs11",
            ) from None
    return PKCS11Signer(uri.with_key(label, key_id), what=label)


# -- keys -----------------------------------------------------------------------------


def _no_export(*_: object) -> NoReturn:
    raise TypeError("This CA key lives in a PKCS#11 token and cannot be exported.")


def _digest(data: bytes, algorithm: hashes.HashAlgorithm | Prehashed) -> bytes:
    if isinstance(algorithm, Prehashed):
        return data
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


_Public = TypeVar("_Public", ec.EllipticCurvePublicKey, rsa.RSAPublicKey)


class _TokenKey(Generic[_Public]):
    """What both token keys share: a handle in a session and the public half; the private
    half never leaves the token, and a copy is the same handle.

    Listed before the cryptography base class, so these satisfy its abstract methods.
    """

    def __init__(self, handle: Any, public: _Public, session: _Session):
        self._handle = handle
        self._public: _Public = public
        self._session = session

    def public_key(self) -> _Public:
        return self._public

    def private_numbers(self) -> NoReturn:
        _no_export()

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _no_export()

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self


class PKCS11ECKey(_TokenKey[ec.EllipticCurvePublicKey], ec.EllipticCurvePrivateKey):
    """An EC private key in a token: ``sign()`` runs ``CKM_ECDSA`` there.

    .. versionadded:: 0.3
    """

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm("A PKCS#11 EC key signs with ECDSA only.")
        digest = _digest(bytes(data), signature_algorithm.algorithm)
        mechanism = _module().Mechanism.ECDSA
        with self._session.lock:
            raw = self._handle.sign(digest, mechanism=mechanism)
        half = len(raw) // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise UnsupportedAlgorithm("A trustmesh CA key in a PKCS#11 token only signs.")


_RSA_MECHANISMS = {
    "sha256": "SHA256_RSA_PKCS",
    "sha384": "SHA384_RSA_PKCS",
    "sha512": "SHA512_RSA_PKCS",
}


class PKCS11RSAKey(_TokenKey[rsa.RSAPublicKey], rsa.RSAPrivateKey):
    """An RSA private key in a token: ``sign()`` runs ``CKM_SHA256_RSA_PKCS`` (etc.) there.

    .. versionadded:: 0.3
    """

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        padding: padding.AsymmetricPadding,
        algorithm: hashes.HashAlgorithm | Prehashed | NoDigestInfo,
    ) -> bytes:
        name = getattr(algorithm, "name", "")
        if not isinstance(padding, _PKCS1v15) or not isinstance(algorithm, hashes.HashAlgorithm):
            raise UnsupportedAlgorithm("A PKCS#11 RSA CA key signs PKCS#1 v1.5, not prehashed.")
        if name not in _RSA_MECHANISMS:
            raise UnsupportedAlgorithm(f"A PKCS#11 RSA CA key does not sign with {name}.")
        mechanism = getattr(_module().Mechanism, _RSA_MECHANISMS[name])
        with self._session.lock:
            return bytes(self._handle.sign(bytes(data), mechanism=mechanism))

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise UnsupportedAlgorithm("A trustmesh CA key in a PKCS#11 token only signs.")


_PKCS1v15 = padding.PKCS1v15


@dataclass
class PKCS11Signer:
    """A CA key in a PKCS#11 token (see the module docstring).

    .. versionadded:: 0.3
    """

    uri: PKCS11URI
    what: str = "the CA key"
    _key: PrivateKey | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ref(self) -> str:
        return str(self.uri)

    def private_key(self) -> PrivateKey:
        """Find the key in the token (logging in on first use).

        Raises:
            ConfigError: The module, token, PIN or key is not there.
        """
        with self._lock:
            if self._key is None:
                self._key = self._find()
            return self._key

    def _find(self) -> PrivateKey:
        pkcs11 = _module()
        a = pkcs11.Attribute
        s = _session(self.uri)
        wanted: dict[Any, object] = {}
        if self.uri.object:
            wanted[a.LABEL] = self.uri.object
        if self.uri.id is not None:
            wanted[a.ID] = self.uri.id
        if not wanted:
            raise ConfigError(
                f"The PKCS#11 URI of {self.what} names no key (object= or id=).",
                field="pkcs11",
            )
        with s.lock:
            found = {}
            for cls in (pkcs11.ObjectClass.PRIVATE_KEY, pkcs11.ObjectClass.PUBLIC_KEY):
                objs = list(s.session.get_objects({**wanted, a.CLASS: cls}))
                if len(objs) != 1:
                    kind = "private" if cls == pkcs11.ObjectClass.PRIVATE_KEY else "public"
                    raise ConfigError(
                        f"PKCS#11 token {self.uri.token!r} holds {len(objs)} {kind} keys "
                        f"matching {self.what} ({self.uri.object!r}), expected 1: restore the "
                        f"token or fix the key reference.",
                        field="pkcs11",
                    )
                found[cls] = objs[0]
            handle = found[pkcs11.ObjectClass.PRIVATE_KEY]
            pub = found[pkcs11.ObjectClass.PUBLIC_KEY]
            key_type = handle[a.KEY_TYPE]
            if key_type == pkcs11.KeyType.EC:
                from pkcs11.util.ec import encode_ec_public_key

                ec_public = serialization.load_der_public_key(encode_ec_public_key(pub))
                if not isinstance(ec_public, ec.EllipticCurvePublicKey):  # pragma: no cover
                    raise PKIError(f"The token key of {self.what} is not an EC key.")
                return PKCS11ECKey(handle, ec_public, s)
            if key_type == pkcs11.KeyType.RSA:
                numbers = rsa.RSAPublicNumbers(
                    int.from_bytes(pub[a.PUBLIC_EXPONENT], "big"),
                    int.from_bytes(pub[a.MODULUS], "big"),
                )
                return PKCS11RSAKey(handle, numbers.public_key(), s)
        raise PKIError(f"The token key of {self.what} is of a type trustmesh cannot sign with.")

    def attributes(self) -> dict[str, bool]:
        """The private key's CKA_SENSITIVE, CKA_EXTRACTABLE and CKA_NEVER_EXTRACTABLE."""
        key = self.private_key()
        if not isinstance(key, PKCS11ECKey | PKCS11RSAKey):  # pragma: no cover
            raise TypeError(key)
        a = _module().Attribute
        handle = key._handle
        s = key._session
        with s.lock:
            return {
                "sensitive": bool(handle[a.SENSITIVE]),
                "extractable": bool(handle[a.EXTRACTABLE]),
                "never_extractable": bool(handle[a.NEVER_EXTRACTABLE]),
                "always_sensitive": bool(handle[a.ALWAYS_SENSITIVE]),
            }
