"""Authorization decisions per second for a 50-rule policy (trustmesh.policy).

The policy has 50 rules like a real service's: 45 allow rules (exact callers and
globs, methods, paths with '*' and '**', some with user scopes/roles/claims) and 5
deny rules, which are checked first on every request. Cases, each over 1,000
distinct requests (different ids in the path), median of several rounds:

  allow first     the first allow rule matches
  allow last      only the last allow rule matches; the caller is named by that rule only
  allow last, shared caller
                  the same, by a caller every allow rule names (a glob), so all 45 allow
                  rules are tried: the worst case of the per-caller rule index
  allow token     a rule with a user block (scopes, role, claim) matches
  deny rule       a deny rule matches
  default deny    no rule matches (a caller every rule names, so all of them are tried):
                  the explanation ranks every allow rule
  ambiguous path  /items/%2F.. is refused before any rule
  PolicyFile      'allow last' through PolicyFile.evaluate (stat check every 1 s)

No target is set (issue 5); the figure is reported in bench/RESULTS.md.

Example:
  .venv/bin/python bench/policy.py
  .venv/bin/python bench/policy.py --rounds 9 --markdown
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from trustmesh.policy import Policy, PolicyFile, PolicyRequest

TD = "spiffe://example.org"


def build_policy() -> dict[str, object]:
    """Return the 50-rule policy as a mapping (5 deny rules, then 45 allow rules)."""
    rules: list[dict[str, object]] = []
    for i in range(5):
        rules.append(
            {
                "name": f"deny-{i}",
                "effect": "deny",
                "callers": ["*"],
                "paths": [f"/internal{i}/**", f"/debug{i}"],
            }
        )
    for i in range(45):
        rule: dict[str, object] = {
            "name": f"allow-{i}",
            "callers": [
                f"{TD}/ns/prod/svc/svc{i}",
                f"{TD}/ns/*/svc/team{i}-*",
                f"{TD}/ns/shared/svc/*",
            ],
            "methods": ["GET", "HEAD"] if i % 3 else ["GET", "POST", "PUT", "DELETE"],
            "paths": [f"/api/v1/res{i}", f"/api/v1/res{i}/*", f"/api/v1/res{i}/*/sub/**"],
        }
        if i % 5 == 3:
            rule["user"] = {
                "scopes": [f"res{i}:read"],
                "roles": ["member"],
                "claims": {"tenant": ["acme", "globex"]},
            }
        rules.append(rule)
    return {"mode": "enforce", "rules": rules}


def cases(n: int) -> dict[str, list[PolicyRequest]]:
    """Return the requests of each case, ``n`` distinct ones per case."""
    user = {"sub": "alice", "tenant": "acme"}
    return {
        "allow first": [
            PolicyRequest(f"{TD}/ns/prod/svc/svc0", "GET", f"/api/v1/res0/{k}") for k in range(n)
        ],
        "allow last": [
            PolicyRequest(f"{TD}/ns/prod/svc/svc44", "GET", f"/api/v1/res44/{k}/sub/x")
            for k in range(n)
        ],
        "allow last, shared caller": [
            PolicyRequest(f"{TD}/ns/shared/svc/gateway", "GET", f"/api/v1/res44/{k}/sub/x")
            for k in range(n)
        ],
        "allow token": [
            PolicyRequest(
                f"{TD}/ns/dev/svc/team23-batch",
                "GET",
                f"/api/v1/res23/{k}",
                user,
                frozenset({"res23:read", "other"}),
                ("member",),
            )
            for k in range(n)
        ],
        "deny rule": [
            PolicyRequest(f"{TD}/ns/prod/svc/svc1", "GET", f"/internal3/{k}") for k in range(n)
        ],
        "default deny": [
            PolicyRequest(f"{TD}/ns/shared/svc/gateway", "POST", f"/api/v1/res7/{k}")
            for k in range(n)
        ],
        "ambiguous path": [
            PolicyRequest(f"{TD}/ns/prod/svc/svc0", "GET", f"/api/v1/res0%2F..%2F{k}")
            for k in range(n)
        ],
    }


def rate(decide: Callable[[PolicyRequest], object], requests: list[PolicyRequest]) -> float:
    """Return decisions per second over ``requests``."""
    gc.disable()
    try:
        start = time.perf_counter()
        for request in requests:
            decide(request)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return len(requests) / elapsed


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--markdown", action="store_true", help="print a RESULTS.md section")
    args = parser.parse_args()

    data = build_policy()
    policy = Policy.from_mapping(data, source="bench")
    assert len(policy.rules) == 50
    requests = cases(args.requests)
    expected = {
        "allow first": "allow-0",
        "allow last": "allow-44",
        "allow last, shared caller": "allow-44",
        "allow token": "allow-23",
        "deny rule": "deny-3",
        "default deny": None,
        "ambiguous path": None,
    }
    for name, reqs in requests.items():  # the benchmark measures what it claims
        decision = policy.evaluate(reqs[0])
        assert decision.rule == expected[name], (name, decision)
        assert decision.allowed is name.startswith("allow"), (name, decision)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(yaml.safe_dump(data))
        policy_file = PolicyFile(path)
        measured: dict[str, list[float]] = {name: [] for name in [*requests, "PolicyFile"]}
        for round_ in range(args.rounds):
            order = list(requests)
            if round_ % 2:
                order.reverse()
            for name in order:
                measured[name].append(rate(policy.evaluate, requests[name]))
            measured["PolicyFile"].append(rate(policy_file.evaluate, requests["allow last"]))

    rows = [(name, statistics.median(values), values) for name, values in measured.items()]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    if args.markdown:
        print(f"## Authorization policy decisions ({stamp})\n")
        print(
            f"`bench/policy.py --requests {args.requests} --rounds {args.rounds}`: 50-rule "
            f"policy (5 deny, 45 allow), {platform.machine()}, Python "
            f"{platform.python_version()}, one thread. Medians of {args.rounds} rounds.\n"
        )
        print("| case | decisions/s | µs/decision | rounds (k/s) |")
        print("|---|---|---|---|")
        for name, value, values in rows:
            per_round = " ".join(f"{v / 1000:.0f}" for v in values)
            print(f"| {name} | {value:,.0f} | {1e6 / value:.1f} | {per_round} |")
    else:
        for name, value, values in rows:
            spread_ = f"{min(values):,.0f}..{max(values):,.0f}"
            print(f"{name:26} {value:12,.0f}/s  {1e6 / value:6.1f} µs  [{spread_}]")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
