"""Policy rules: strict loading from YAML or a mapping, precompiled matching, explanations."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ._model import ANONYMOUS, AUDIT, ENFORCE, Decision, PolicyConfigError, PolicyRequest
from ._patterns import (
    ANY_CALLER,
    HTTP_METHODS,
    PathRefused,
    caller_regex,
    check_caller_pattern,
    check_path_pattern,
    normalize_path,
    path_regex,
)

__all__ = ["MAX_POLICY_BYTES", "Policy", "Rule", "UserRequirement"]

log = logging.getLogger("trustmesh.policy")

#: Larger policy files are refused.
MAX_POLICY_BYTES = 1024 * 1024
#: How many of the closest rules a default-deny explanation names.
EXPLAIN_RULES = 3
# Distinct callers remembered per policy (cleared when full).
_CALLER_CACHE_SIZE = 4096
#: Decisions remembered per policy, by (caller, method, raw path), for requests without
#: a token (cleared when full; a reload builds a new Policy, so a new, empty cache).
DECISION_CACHE_SIZE = 4096
# Longer paths are decided every time, so the cache stays small (4096 x 512 bytes of keys).
_CACHED_PATH_LENGTH = 512

_TOP_KEYS = frozenset({"mode", "rules"})
_RULE_KEYS = frozenset({"name", "description", "effect", "callers", "methods", "paths", "user"})
_USER_KEYS = frozenset({"required", "scopes", "roles", "claims"})
_ClaimValue = str | int | bool
_Fail = Callable[[str, str], PolicyConfigError]


@dataclass(frozen=True, slots=True)
class UserRequirement:
    """A rule's ``user`` block: what the end-user token must carry.

    Attributes:
        required: A token must be present (default True). When False the rule
            also matches requests without a token, and the other conditions
            apply only when a token is present.
        scopes: Every one of these scopes is needed.
        roles: Every one of these roles is needed.
        claims: For each claim name, the accepted values; a list-valued claim
            matches when one of its items is accepted.

    .. versionadded:: 0.1
    """

    required: bool = True
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    claims: tuple[tuple[str, tuple[_ClaimValue, ...]], ...] = ()

    def problems(self, request: PolicyRequest) -> list[str]:
        """Return why ``request`` does not satisfy this block (empty when it does)."""
        claims = request.claims
        if claims is None:
            return ["no user token"] if self.required else []
        found: list[str] = []
        for scope in sorted(self.scopes - request.scopes):
            found.append(f"missing scope {scope!r}")
        if self.roles:
            for role in sorted(self.roles.difference(request.roles)):
                found.append(f"missing role {role!r}")
        for name, accepted in self.claims:
            if name not in claims:
                found.append(f"claim {name!r} missing")
            elif not _claim_accepted(claims[name], accepted):
                found.append(f"claim {name!r} not one of {_short(accepted)}")
        return found


def _claim_accepted(value: object, accepted: tuple[_ClaimValue, ...]) -> bool:
    values = value if isinstance(value, list | tuple) else (value,)
    # Type-strict: the claim True does not satisfy 1, nor "1" the number 1.
    return any(type(v) is type(a) and v == a for v in values for a in accepted)


def _short(items: tuple[_ClaimValue, ...] | tuple[str, ...], limit: int = 3) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated, compiled rule.

    Attributes:
        index: Position in the file's ``rules`` list (0-based).
        name: Unique name, reported in decisions.
        effect: ``"allow"`` or ``"deny"``.
        callers: Caller patterns as written.
        methods: Upper-case methods, or None for any.
        paths: Path patterns as written, or None for any.
        user: The ``user`` block, or None when the token is not considered.

    .. versionadded:: 0.1
    """

    index: int
    name: str
    effect: str
    callers: tuple[str, ...]
    methods: frozenset[str] | None
    paths: tuple[str, ...] | None
    user: UserRequirement | None
    _exact_callers: frozenset[str] = field(repr=False, compare=False, default=frozenset())
    _caller_glob: re.Pattern[str] | None = field(repr=False, compare=False, default=None)
    _any_caller: bool = field(repr=False, compare=False, default=False)
    _anonymous: bool = field(repr=False, compare=False, default=False)
    _path_re: re.Pattern[str] | None = field(repr=False, compare=False, default=None)

    @property
    def label(self) -> str:
        """``'name' (rules[index])`` for messages."""
        return f"{self.name!r} (rules[{self.index}])"

    def caller_matches(self, caller: str | None) -> bool:
        """Whether ``caller`` is one of this rule's callers."""
        if caller is None:
            return self._anonymous
        if self._any_caller or caller in self._exact_callers:
            return True
        return self._caller_glob is not None and self._caller_glob.fullmatch(caller) is not None

    # The helpers below take the method upper-cased and the normalised path with the
    # root as "" (see _patterns.path_regex).

    def _matches_rest(self, request: PolicyRequest, method: str, key: str) -> bool:
        # Everything but the caller, which Policy checks once per caller and remembers.
        return (
            (self.methods is None or method in self.methods)
            and (self._path_re is None or self._path_re.fullmatch(key) is not None)
            and (self.user is None or not self.user.problems(request))
        )

    def _mismatch_count(
        self, caller_ok: bool, request: PolicyRequest, method: str, key: str
    ) -> int:
        count = 0 if caller_ok else 1
        if self.methods is not None and method not in self.methods:
            count += 1
        if self._path_re is not None and self._path_re.fullmatch(key) is None:
            count += 1
        if self.user is not None:
            count += len(self.user.problems(request))
        return count

    def _mismatches(self, request: PolicyRequest, method: str, key: str) -> list[str]:
        # Every reason the rule does not apply, worded for explanations.
        found: list[str] = []
        if not self.caller_matches(request.caller):
            if request.caller is None:
                found.append("needs a client certificate")
            elif self.callers == (ANONYMOUS,):
                found.append("only for callers without a certificate")
            else:
                found.append(f"caller not in {_short(self.callers, 2)}")
        if self.methods is not None and method not in self.methods:
            found.append(f"method {method} not in {_short(tuple(sorted(self.methods)))}")
        if self._path_re is not None and self._path_re.fullmatch(key) is None:
            found.append(f"path not in {_short(self.paths or (), 2)}")
        if self.user is not None:
            found.extend(self.user.problems(request))
        return found


class Policy:
    """A loaded authorization policy: default deny, deny rules first, then allow rules.

    Build one with :meth:`load` or :meth:`from_mapping`.

    Attributes:
        mode: ``"enforce"`` or ``"audit"``.
        rules: The rules in file order.
        source: The file it came from (or ``<mapping>``).

    .. versionadded:: 0.1
    """

    __slots__ = ("_allow", "_by_caller", "_decisions", "_deny", "mode", "rules", "source")

    def __init__(self, mode: str, rules: tuple[Rule, ...], source: str) -> None:
        self.mode = mode
        self.rules = rules
        self.source = source
        self._deny = tuple(r for r in rules if r.effect == "deny")
        self._allow = tuple(r for r in rules if r.effect == "allow")
        # caller -> (deny rules, allow rules) whose callers match it. A service sees a
        # handful of callers, so each request only tries the rules that can apply.
        self._by_caller: dict[str | None, tuple[tuple[Rule, ...], tuple[Rule, ...]]] = {}
        # (caller, method, raw path) -> the decision, for requests without a token: the
        # rules are immutable, so the same request always gets the same decision.
        self._decisions: dict[tuple[str | None, str, str], Decision] = {}

    def _rules_for(self, caller: str | None) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
        entry = self._by_caller.get(caller)
        if entry is None:
            entry = (
                tuple(r for r in self._deny if r.caller_matches(caller)),
                tuple(r for r in self._allow if r.caller_matches(caller)),
            )
            if len(self._by_caller) >= _CALLER_CACHE_SIZE:
                self._by_caller.clear()
            self._by_caller[caller] = entry
        return entry

    def __repr__(self) -> str:
        return f"<Policy {self.source} mode={self.mode} rules={len(self.rules)}>"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and validate a YAML policy file.

        Args:
            path: The file.

        Returns:
            The policy.

        Raises:
            PolicyConfigError: The file cannot be read, is not YAML, or breaks
                a rule of the format; the message names the field and a fix.
        """
        source = str(path)
        try:
            with Path(path).open("rb") as f:
                raw = f.read(MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise PolicyConfigError(
                f"Cannot read policy file {source}: {exc.strerror or exc}. "
                f"Check the path and its permissions.",
                path=source,
            ) from None
        if len(raw) > MAX_POLICY_BYTES:
            raise PolicyConfigError(
                f"{source}: larger than {MAX_POLICY_BYTES} bytes; split it or remove unused rules.",
                path=source,
            )
        try:
            text = raw.decode()
            data: object = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
        except UnicodeDecodeError:
            raise PolicyConfigError(
                f"{source}: not UTF-8 text. Save it as UTF-8.", path=source
            ) from None
        except yaml.YAMLError as exc:
            raise PolicyConfigError(
                f"{source}: not valid YAML: {_yaml_problem(exc)}. Fix the syntax there.",
                path=source,
            ) from None
        return cls.from_mapping(data, source=source)

    @classmethod
    def from_mapping(cls, data: object, *, source: str = "<mapping>") -> Policy:
        """Validate and compile a policy given as a mapping (parsed YAML or JSON).

        Args:
            data: ``{"mode": ..., "rules": [...]}``.
            source: Named in error messages and decisions.

        Returns:
            The policy.

        Raises:
            PolicyConfigError: The mapping breaks a rule of the format.
        """
        policy = _Parser(source).policy(data)
        for warning in policy.warnings:
            log.warning(warning)
        return policy

    @property
    def warnings(self) -> tuple[str, ...]:
        """Settings that weaken the default (audit mode, rules admitting anonymous callers)."""
        found: list[str] = []
        if self.mode == AUDIT:
            found.append(
                f"policy {self.source} is in audit mode: denies are logged as would-deny "
                f"and the requests go through; set 'mode: enforce' to refuse them"
            )
        for rule in self.rules:
            if rule.effect == "allow" and ANONYMOUS in rule.callers:
                found.append(
                    f"policy {self.source}: rule {rule.label} allows callers without a "
                    f"client certificate ('anonymous')"
                )
        return tuple(found)

    def evaluate(self, request: PolicyRequest) -> Decision:
        """Decide on a request.

        Deny rules are checked first: any match refuses. Then the first allow
        rule that matches allows. Otherwise the request is refused (default
        deny) and the reason says what the closest rules were missing. In audit
        mode a refusal is returned as ``allowed=True, would_deny=True``.

        Args:
            request: The request.

        Returns:
            The decision; it never raises for any request.

        Requests without a token (``claims`` None, no scopes or roles) are
        remembered by (caller, method, path), up to :data:`DECISION_CACHE_SIZE`
        per policy: a service sees the same few calls over and over, and the
        answer (allow or deny, rule, reason) is the same every time. A reloaded
        :class:`PolicyFile` is a new :class:`Policy` with an empty cache.
        """
        if request.claims is not None or request.scopes or request.roles:
            return self._evaluate(request)
        key = (request.caller, request.method, request.path)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._evaluate(request)
            if len(request.path) <= _CACHED_PATH_LENGTH:
                # Plain dict operations only: WSGI servers decide from many threads.
                if len(self._decisions) >= DECISION_CACHE_SIZE:
                    self._decisions.clear()
                self._decisions[key] = decision
        return decision

    def _evaluate(self, request: PolicyRequest) -> Decision:
        method = request.method.upper()
        try:
            key = normalize_path(request.path)
        except PathRefused as exc:
            return self._deny_decision(
                request, None, f"refused {request.describe()}: the path is ambiguous, {exc}"
            )
        shown = key
        if key == "/":
            key = ""
        deny, allow = self._rules_for(request.caller)
        for rule in deny:
            if rule._matches_rest(request, method, key):
                return self._deny_decision(
                    request,
                    rule.name,
                    f"deny rule {rule.label} matched {_describe(request, shown)}",
                )
        for rule in allow:
            if rule._matches_rest(request, method, key):
                reason = f"rule {rule.label} allows {_describe(request, shown)}"
                return Decision(True, self.mode, rule.name, reason, request=request)
        return self._deny_decision(request, None, self._explain(request, method, key, shown))

    def _deny_decision(self, request: PolicyRequest, rule: str | None, reason: str) -> Decision:
        if self.mode == AUDIT:
            return Decision(True, self.mode, rule, reason, would_deny=True, request=request)
        return Decision(False, self.mode, rule, reason, request=request)

    def _explain(self, request: PolicyRequest, method: str, key: str, shown: str) -> str:
        head = f"no rule allows {_describe(request, shown)}"
        if not self._allow:
            return f"{head}: the policy has no allow rules"
        # Count cheaply for every rule, then word only the closest few: a stream of
        # denied requests must not cost much more than allowed ones.
        callers_ok = set(self._rules_for(request.caller)[1])
        scored = sorted(
            (rule._mismatch_count(rule in callers_ok, request, method, key), rule.index, rule)
            for rule in self._allow
        )
        parts = [
            f"{rule.label}: {', '.join(rule._mismatches(request, method, key)[:4])}"
            for _, _, rule in scored[:EXPLAIN_RULES]
        ]
        more = len(scored) - EXPLAIN_RULES
        text = "; ".join(parts)
        if more > 0:
            text += f"; {more} more rule{'s' if more > 1 else ''} further off"
        return f"{head}: closest {text}"


def _describe(request: PolicyRequest, normalized: str) -> str:
    text = request.describe()
    return text if normalized == request.path else f"{text} (normalised to {normalized})"


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[object, object]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node))


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_no_duplicates,
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return f"{where}{exc.problem}"
    return str(exc).splitlines()[0]


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "a mapping"}
    return names.get(type(value), type(value).__name__)


class _Parser:
    """Turns untrusted parsed data into rules; every problem is a PolicyConfigError."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(
        self,
        where: str,
        problem: str,
        *,
        rule: int | None = None,
        name: str | None = None,
        field: str | None = None,
    ) -> PolicyConfigError:
        return PolicyConfigError(
            f"{self.source}: {where}: {problem}.",
            path=self.source,
            rule=rule,
            rule_name=name,
            field=field,
        )

    def policy(self, data: object) -> Policy:
        if data is None:
            raise self.fail("the policy", "is empty; it needs 'rules:' with at least one rule")
        if not isinstance(data, Mapping):
            raise self.fail(
                "the policy", f"must be a mapping with 'mode' and 'rules', got {_kind(data)}"
            )
        unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
        if unknown:
            raise self.fail(
                f"top-level key {unknown[0]!r}",
                "is not known; the keys are 'mode' and 'rules'",
                field=unknown[0],
            )
        mode = data.get("mode", ENFORCE)
        if mode not in (ENFORCE, AUDIT):
            raise self.fail(
                "mode", f"must be 'enforce' or 'audit', got {mode!r}", field="mode"
            )  # fmt: skip
        rules_data = data.get("rules")
        if not isinstance(rules_data, list) or not rules_data:
            got = "an empty list" if rules_data == [] else _kind(rules_data)
            raise self.fail(
                "rules",
                f"must be a non-empty list of rules, got {got} (a policy with no rules "
                f"denies everything; add at least one rule)",
                field="rules",
            )
        rules: list[Rule] = []
        names: dict[str, int] = {}
        for index, item in enumerate(rules_data):
            rule = self.rule(index, item)
            if rule.name in names:
                raise self.fail(
                    f"rules[{index}] ({rule.name!r})",
                    f"name: the name is already used by rules[{names[rule.name]}]; "
                    f"give each rule a unique name",
                    rule=index,
                    name=rule.name,
                    field="name",
                )
            names[rule.name] = index
            rules.append(rule)
        return Policy(str(mode), tuple(rules), self.source)

    def rule(self, index: int, item: object) -> Rule:
        where = f"rules[{index}]"
        if not isinstance(item, Mapping):
            raise self.fail(where, f"must be a mapping, got {_kind(item)}", rule=index)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip() or not name.isprintable():
            raise self.fail(
                where,
                f"name: must be a non-empty one-line string, got {_kind(name)}; "
                f"every rule needs a 'name'",
                rule=index,
                field="name",
            )
        if len(name) > 100:
            raise self.fail(where, "name: longer than 100 characters", rule=index, field="name")
        where = f"rules[{index}] ({name!r})"

        def fail(fld: str, problem: str) -> PolicyConfigError:
            return self.fail(where, f"{fld}: {problem}", rule=index, name=name, field=fld)

        unknown = sorted(str(k) for k in item if k not in _RULE_KEYS)
        if unknown:
            raise fail(unknown[0], f"unknown key; a rule has {', '.join(sorted(_RULE_KEYS))}")
        description = item.get("description")
        if description is not None and not isinstance(description, str):
            raise fail("description", f"must be a string, got {_kind(description)}")
        effect = item.get("effect", "allow")
        if effect not in ("allow", "deny"):
            raise fail("effect", f"must be 'allow' or 'deny', got {effect!r}")

        callers = self.strings(item.get("callers"), fail, "callers", required=True) or []
        exact: set[str] = set()
        globs: list[str] = []
        for i, caller in enumerate(callers):
            if caller in (ANY_CALLER, ANONYMOUS):
                continue
            problem = check_caller_pattern(caller)
            if problem is not None:
                raise fail(f"callers[{i}]", f"{caller!r} {problem}")
            if "*" in caller:
                globs.append(caller)
            else:
                exact.add(caller)
        methods_list = self.strings(item.get("methods"), fail, "methods")
        methods: frozenset[str] | None = None
        if methods_list is not None and "*" not in methods_list:
            for i, method in enumerate(methods_list):
                if method.upper() not in HTTP_METHODS:
                    raise fail(
                        f"methods[{i}]",
                        f"unknown method {method!r}; use {', '.join(sorted(HTTP_METHODS))} "
                        f"or '*' for any",
                    )
            methods = frozenset(m.upper() for m in methods_list)
        paths = self.strings(item.get("paths"), fail, "paths")
        path_re: re.Pattern[str] | None = None
        if paths is not None:
            for i, pattern in enumerate(paths):
                problem = check_path_pattern(pattern)
                if problem is not None:
                    raise fail(f"paths[{i}]", f"{pattern!r} {problem}")
            if "/**" not in paths:
                path_re = re.compile("|".join(f"(?:{path_regex(p)})" for p in paths))
        user = self.user(item.get("user"), fail) if "user" in item else None
        return Rule(
            index=index,
            name=name,
            effect=str(effect),
            callers=tuple(callers),
            methods=methods,
            paths=tuple(paths) if paths is not None else None,
            user=user,
            _exact_callers=frozenset(exact),
            _caller_glob=re.compile("|".join(f"(?:{caller_regex(g)})" for g in globs))
            if globs
            else None,
            _any_caller=ANY_CALLER in callers,
            # In a deny rule '*' covers requests without a certificate too: a deny
            # must never be weaker for an unauthenticated caller.
            _anonymous=ANONYMOUS in callers or (effect == "deny" and ANY_CALLER in callers),
            _path_re=path_re,
        )

    @staticmethod
    def strings(
        value: object,
        fail: _Fail,
        fld: str,
        *,
        required: bool = False,
    ) -> list[str] | None:
        if value is None:
            if required:
                raise fail(
                    fld,
                    "is required: list who may call, e.g. ['spiffe://example.org/svc/orders']",
                )
            return None
        if isinstance(value, str):
            raise fail(fld, f"must be a list; write [{value!r}]")
        if not isinstance(value, list) or not value:
            got = "an empty list" if value == [] else _kind(value)
            raise fail(fld, f"must be a non-empty list of strings, got {got} (omit it for any)")
        for i, entry in enumerate(value):
            if not isinstance(entry, str) or not entry:
                raise fail(
                    f"{fld}[{i}]",
                    f"must be a non-empty string, got {_kind(entry)} (quote it in YAML)",
                )
        return list(value)

    def user(self, value: object, fail: _Fail) -> UserRequirement:
        if not isinstance(value, Mapping):
            raise fail(
                "user", f"must be a mapping such as {{scopes: [orders:read]}}, got {_kind(value)}"
            )
        unknown = sorted(str(k) for k in value if k not in _USER_KEYS)
        if unknown:
            raise fail(
                f"user.{unknown[0]}",
                f"unknown key; a user block has {', '.join(sorted(_USER_KEYS))}",
            )
        required = value.get("required", True)
        if not isinstance(required, bool):
            raise fail("user.required", f"must be true or false, got {_kind(required)}")
        scopes = self.strings(value.get("scopes"), fail, "user.scopes") or []
        roles = self.strings(value.get("roles"), fail, "user.roles") or []
        for i, scope in enumerate(scopes):
            if " " in scope:
                raise fail(
                    f"user.scopes[{i}]",
                    f"{scope!r} contains a space; list each scope separately",
                )
        claims: list[tuple[str, tuple[_ClaimValue, ...]]] = []
        raw_claims = value.get("claims")
        if raw_claims is not None:
            if not isinstance(raw_claims, Mapping) or not raw_claims:
                raise fail(
                    "user.claims",
                    f"must be a non-empty mapping of claim name to value(s), "
                    f"got {_kind(raw_claims)}",
                )
            for claim, accepted in raw_claims.items():
                fld = f"user.claims.{claim}"
                values = accepted if isinstance(accepted, list) else [accepted]
                if not values:
                    raise fail(fld, "must list at least one accepted value")
                for v in values:
                    if not isinstance(v, str | int | bool) or isinstance(v, float):
                        raise fail(
                            fld,
                            f"accepted values must be strings, integers or booleans, "
                            f"got {_kind(v)}",
                        )
                claims.append((str(claim), tuple(values)))
        return UserRequirement(required, frozenset(scopes), frozenset(roles), tuple(claims))
