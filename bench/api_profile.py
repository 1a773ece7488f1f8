"""Where a renewal's CPU goes in `trustmesh ca serve`: py-spy samples under load, by stage.

One fresh CA (SQLite file, or a fresh PostgreSQL schema with --db), one real
`ca serve` (--workers 1), --callers mTLS callers renewing in a closed loop on kept-alive
connections (the load generator of bench/api_issuance.py, in its own process). After
the warm-up, `py-spy record --gil --nonblocking` samples the server at --rate Hz for
--seconds: a sample is taken only while a thread holds the GIL, so the samples are the
Python-side CPU, and the server's CPU from /proc over the same window minus that is
the time with the GIL released (OpenSSL's record layer inside `ssl`, SQLite's C code,
cryptography's signing, socket system calls). Each sample is charged to a stage:
the renewal's own stages (store, lookup, CSR, leaf, record, answer, body, metrics)
when one of their functions is anywhere on the stack, else the plumbing stage of the
innermost frame a rule matches (thread hand-off, glue, ASGI, HTTP, TLS, loop); the
figures are microseconds per renewal. py-spy drops samples when it waits for a CPU
itself, so on a busy machine the GIL-held figures are low and the "GIL released"
remainder high: compare runs made back to back. Every renewal is checked to be
recorded and the audit chain to verify, as in api_issuance.py.

Needs py-spy (`.venv/bin/pip install py-spy`) and permission to ptrace the server
(root, or kernel.yama.ptrace_scope=0).

Example:
  .venv/bin/python bench/api_profile.py
  .venv/bin/python bench/api_profile.py --db postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from _api import CPUMeter, ca_serve, csr_pem, loadavg
from _common import check_local_url
from api_issuance import (
    RENEW,
    Target,
    caller_dns,
    caller_id,
    check_refusals,
    check_run,
    fresh_ca,
    measure,
)

#: (stage, regular expression on a frame "function (file)"), first match wins.
STAGES: list[tuple[str, str]] = [
    # context rules: a function of the stage anywhere on the stack
    (
        "store: group commit, INSERTs, audit chain, COMMIT",
        r"record_issued|_group|append_audit|add_certificate|trustmesh/store/|sqlalchemy/|psycopg",
    ),
    ("caller's record lookup (revocation, allowance)", r"lookup_certificate|is_revoked"),
    ("CSR: parse, signature, policy (check_csr)", r"check_csr"),
    ("leaf: build and sign (issue_leaf)", r"issue_leaf"),
    ("record: PEM, fingerprint (_record_for)", r"_record_for"),
    (
        "answer: JSON assembly and encoding",
        r"_issued_json|_ca_pem|json/encoder|\(dumps |starlette/responses\.py|problem",
    ),
    ("request: body read and JSON parse", r"bounded_body|_read_body|_json_body|json/decoder"),
    ("metrics and log lines", r"prometheus_client|logging/__init__|observe|_clock\.py"),
    # plumbing rules: the innermost frame matched
    (
        "renew() glue: verify_caller, profile, SAN allowance, audit details",
        r"trustmesh/authority\.py|trustmesh/pki|trustmesh/signers",
    ),
    (
        "thread hand-off (executor queue, futures, loop wake-up)",
        r"concurrent/futures|queue\.py|threading\.py|call_soon_threadsafe|_write_to_self"
        r"|run_in_executor|_chain_future|_copy_future_state|_set_state",
    ),
    ("the direct path's own code (_direct.py)", r"ca_server/_direct\.py"),
    (
        "ASGI: Starlette, TimedApp, TLS scope copy, guarded",
        r"starlette/|trustmesh/serving\.py|tls/_uvicorn\.py|ca_server/_app\.py",
    ),
    ("HTTP/1.1: uvicorn's httptools protocol", r"uvicorn/|httptools"),
    ("TLS record layer in Python (asyncio sslproto, ssl)", r"asyncio/sslproto\.py|\(ssl\.py"),
    (
        "socket I/O in asyncio's transport",
        r"(_read_ready|write|_write_ready|_write_send)\w* \(asyncio/selector_events",
    ),
    ("asyncio event loop (scheduling, epoll, tasks)", r"asyncio/|selectors\.py"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--callers", type=int, default=50, help="concurrent callers (50)")
    p.add_argument("--seconds", type=float, default=12.0, help="seconds sampled (12)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second (200)")
    p.add_argument("--csrs-per-caller", type=int, default=20, help="CSRs per caller (20)")
    p.add_argument("--db", default=None, help="postgresql://USER@127.0.0.1:PORT/DB")
    p.add_argument("--raw", default=None, help="also keep py-spy's raw stacks in this file")
    p.add_argument("--tmpdir", default=None, help="where the temporary CA home goes")
    args = p.parse_args(argv)
    if not 1 <= args.callers <= 500 or not 2 <= args.seconds <= 60:
        p.error("--callers must be 1..500 and --seconds 2..60")
    if not 10 <= args.rate <= 1000 or not 1 <= args.csrs_per_caller <= 1000:
        p.error("--rate must be 10..1000 and --csrs-per-caller 1..1000")
    if args.db:
        check_local_url(args.db)
    return args


def stage_of(stack: list[str]) -> str:
    """The first of the first ``_CONTEXT`` rules matching any frame (the renewal's own
    stages, named by their functions); else the stage of the innermost frame one of
    the others matches (the plumbing, named by its files)."""
    for stage, rule in _RULES[:_CONTEXT]:
        if any(rule.search(frame) for frame in stack):
            return stage
    for frame in reversed(stack):
        for stage, rule in _RULES[_CONTEXT:]:
            if rule.search(frame):
                return stage
    return "other Python"


_RULES = [(stage, re.compile(rule)) for stage, rule in STAGES]
#: How many of STAGES are context rules (see stage_of).
_CONTEXT = 8


def read_raw(path: Path) -> Counter[str]:
    """py-spy's raw output: ``frame;frame;... count`` per line, outermost first."""
    out: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out[stage_of(stack.split(";"))] += int(count)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    print(f"api_profile: load average at start {loadavg()}")
    with tempfile.TemporaryDirectory(prefix="tm-bench-prof-", dir=args.tmpdir) as tmp_name:
        tmp = Path(tmp_name)
        bodies = [
            tuple(
                json.dumps({"csr": csr_pem(caller_id(i), dns=[caller_dns(i)])}).encode()
                for _ in range(args.csrs_per_caller)
            )
            for i in range(args.callers)
        ]
        load = argparse.Namespace(client_procs=1, warmup=3.0, duration=args.seconds + 2.0)
        raw = tmp / "stacks.txt"
        with (
            fresh_ca(tmp, "prof", args.db, bodies) as run,
            ca_serve(run.home, run.bundle, tmp / "serve.log") as srv,
            ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool,
        ):
            port = int(srv.url.rsplit(":", 1)[1])
            refused_ok = check_refusals(port, run)
            window: dict[str, float] = {}

            def sample() -> None:
                # The load starts ~2.5 s after measure() begins; sample after its warm-up.
                time.sleep(2.5 + 0.02 * args.callers + load.warmup + 0.5)
                meter = CPUMeter({"server": srv.pid}, trees=True)
                subprocess.run(
                    [
                        *(spy, "record", "--pid", str(srv.pid), "--gil", "--nonblocking"),
                        *("--rate", str(args.rate), "--duration", str(int(args.seconds))),
                        *("--format", "raw", "--output", str(raw)),
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                window["cpu"] = meter.stop()["server"]
                window["seconds"] = int(args.seconds)

            sampler = threading.Thread(target=sample)
            sampler.start()
            target = Target("trustmesh", port, srv.pid, RENEW, True, 201)
            m = measure(pool, target, run.bundle, run.callers, load)
            sampler.join()
        check_run(run, m.ok_total + refused_ok, m.sample)
        stages = read_raw(raw)
        if args.raw:
            shutil.copy(raw, args.raw)
    renewals = m.rate * window["seconds"]
    cpu_us = window["cpu"] / renewals * 1e6
    held = sum(stages.values())
    held_us = held / args.rate / renewals * 1e6
    print(
        f"{m.rate:.0f} renewals/s, server CPU {cpu_us:.0f} us per renewal (/proc); "
        f"{held} samples with the GIL held of {args.rate * window['seconds']:.0f} possible "
        f"= {held_us:.0f} us per renewal in Python; load average {loadavg()}"
    )
    rows = [(stage, n / args.rate / renewals * 1e6) for stage, n in stages.items()]
    released = "GIL released: OpenSSL, SQLite/libpq C code, signing, syscalls"
    rows.append((released, cpu_us - held_us))
    print("\n| stage | us per renewal | share |\n|---|---|---|")
    for stage, us in sorted(rows, key=lambda r: -r[1]):
        print(f"| {stage} | {us:.0f} | {us / cpu_us:.1%} |")
    print(f"| **total** | **{cpu_us:.0f}** | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
