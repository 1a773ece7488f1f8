# Every target creates and uses .venv; nothing is installed outside it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS := tests/peers/node_modules/.installed

.PHONY: venv peers check lint types layers test demo bench bench-tokens bench-idp bench-policy bench-service bench-gateway bench-sidecar bench-envoy bench-revocation bench-workload bench-bundle-fanout bench-acme clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Standard OAuth2/OIDC software (openid-client, oidc-provider) the tests run against ours.
$(PEERS): tests/peers/package.json tests/peers/package-lock.json
	npm ci --prefix tests/peers --no-audit --no-fund --loglevel=error
	touch $(PEERS)

peers: $(PEERS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

layers: $(STAMP)
	$(BIN)/lint-imports

check: lint types layers

test: check $(PEERS)
	$(BIN)/pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m trustmesh.demo

bench: $(STAMP)
	$(BIN)/python bench/issuance.py
	$(BIN)/python bench/crl.py

# Token verification per second (ES256, RS256; cold, cached) beside raw cryptography.
bench-tokens: $(STAMP)
	$(BIN)/python bench/tokens.py --markdown

# Identity server: client_credentials tokens and introspections per second over HTTPS.
bench-idp: $(STAMP)
	$(BIN)/python bench/idp.py $(BENCH_ARGS)

# Authorization decisions per second for a 50-rule policy.
bench-policy: $(STAMP)
	$(BIN)/python bench/policy.py --markdown

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# A Python service over mTLS (issue #5): trustmesh stack vs plain uvicorn vs nginx, with wrk.
# Needs: apt-get install -y nginx-light wrk gcc libssl-dev (not installed by CI).
bench-service: $(STAMP)
	$(BIN)/python bench/service.py $(BENCH_ARGS)

# The edge gateway (issue #6): trustmesh gateway vs HAProxy 2.6 vs direct mTLS, wrk + ratelat.
# Needs: apt-get install -y haproxy wrk gcc libssl-dev (not installed by CI).
bench-gateway: $(STAMP)
	$(BIN)/python bench/gateway.py $(BENCH_ARGS)

# Sidecar hop (issue #7): proxy inbound vs HAProxy mTLS termination vs a plain Node.js app.
# Needs: apt-get install -y haproxy wrk gcc libssl-dev nodejs (not installed by CI).
bench-sidecar: $(STAMP)
	$(BIN)/python bench/sidecar.py $(BENCH_ARGS)

# A rotation step's bundle event vs a revocation reaching 100 feed subscribers (issue #17).
bench-bundle-fanout: $(STAMP)
	$(BIN)/python bench/bundle_fanout.py $(BENCH_ARGS)

# ACME orders beside direct renewal; BENCH_ARGS=--pebble adds Debian's pebble for a ratio
bench-acme: $(STAMP)
	$(BIN)/python bench/acme.py $(BENCH_ARGS)

# Envoy on trustmesh SDS vs HAProxy vs trustmesh proxy inbound --http (issue #16).
bench-envoy: $(STAMP)
	$(BIN)/python bench/envoy_sds.py $(BENCH_ARGS)

# Revocation at nginx, HAProxy and Node.js (issue #15): revoke -> refused, p50/p99 over 30,
# beside `trustmesh run` following the feed. Needs: apt-get install -y nginx-light haproxy socat nodejs.
bench-revocation: $(STAMP)
	$(BIN)/python bench/revocation_peers.py $(BENCH_ARGS)

# SPIFFE Workload API (issue #16): FetchX509SVID p50/p99 and SVIDs/s (sequential, new
# connection each, concurrent) beside a reflection round trip and reading the identity files.
bench-workload: $(STAMP)
	$(BIN)/python bench/workload_api.py $(BENCH_ARGS)
