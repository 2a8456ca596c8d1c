# sluice: the commands a developer and CI run. `make help` lists them.
#
# Every target installs what it needs (Debian packages through apt-get), so a fresh
# machine with a Rust toolchain needs nothing typed by hand.

CARGO     ?= cargo
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT       := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
RELEASE   := target/release/sluice
SCHEMA    := target/grafana-schema
CONFIGS   := config/sluice.toml $(wildcard config/examples/*.toml) deploy/kubernetes/sluice.toml

.PHONY: help build run test check deny bench bench-quick deps-run deps-test deps-check deps-deny deps-bench deps-nginx demo-keys clean screenshot

help:
	@echo "make run          build, start two demo backends and sluice on config/sluice.toml"
	@echo "make test         the whole test suite (installs promtool first)"
	@echo "make check        rustfmt, clippy -D warnings, rust-version, cargo deny, sluice check on every config"
	@echo "make deny         cargo deny check: licences, duplicates and bans, sources, advisories"
	@echo "make bench        the benchmarks; results in target/bench/results.md"
	@echo "make bench-quick  a shorter benchmark run, for iteration"
	@echo "make build        the release binary, $(RELEASE)"
	@echo "make screenshot   docs/status.png, the status page in headless Chromium (tests/status.rs)"

build:
	$(CARGO) build --release --locked

# apt-get runs only for what is missing.
define need
	@command -v $(1) >/dev/null 2>&1 || { \
	  echo "installing $(2) (for $(1))"; \
	  $(APT) update -qq && $(APT) install -y -qq --no-install-recommends $(2) >/dev/null; }
endef

deps-run:
	$(call need,python3,python3)
	$(call need,setsid,util-linux)
	$(call need,curl,curl)

deps-test: deps-nginx
	$(call need,promtool,prometheus)
	$(call need,prometheus,prometheus)
	$(call need,openssl,openssl)
	$(call need,ss,iproute2)
	$(call need,curl,curl)
	$(call need,systemd-analyze,systemd)
	$(call need,python3,python3)
	$(call need,setsid,util-linux)
	$(call need,setpriv,util-linux)
	$(call need,script,bsdutils)
	$(call need,chromium,chromium)
	$(call need,dnsmasq,dnsmasq-base)
	$(call need,wrk,wrk)
	$(call need,systemd-socket-activate,systemd)
	$(call need,nstat,iproute2)
	@command -v kubernetes-validate >/dev/null 2>&1 && command -v yamllint >/dev/null 2>&1 || { \
	  echo "installing kubernetes-validate and yamllint (pip)"; \
	  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate yamllint; }
	$(call need,npm,npm)
	@[ -x $(SCHEMA)/node_modules/.bin/tsc ] || { \
	  echo "installing Grafana's dashboard schema and typescript (npm) into $(SCHEMA)"; \
	  npm install --prefix $(SCHEMA) --silent --no-audit --no-fund @grafana/schema@13.2.3 typescript@5.9.3; }

# Two demo HTTP backends (python3 -m http.server) on 127.0.0.1:8081 and :8082 and sluice
# in front of them, all stopped together however the demo ends: Ctrl-C (sluice drains),
# the terminal closing, or a kill of make (deploy/demo.sh says how). `exec`: make's
# SIGTERM reaches the script itself, not a shell in between.
run: build deps-run demo-keys
	@exec sh deploy/demo.sh $(RELEASE)

# nextest runs each test in its own process; plain cargo test is the fallback.
test: deps-test
	@if command -v cargo-nextest >/dev/null 2>&1; then \
	  $(CARGO) nextest run --locked --no-fail-fast; \
	else \
	  $(CARGO) test --locked --no-fail-fast; \
	fi

# Git keeps no file modes beyond the executable bit: give the demo keys the mode sluice
# expects of a private key, or it warns that others can read them.
demo-keys:
	@chmod 600 config/examples/certs/*.key

# clippy's incompatible_msrv (Cargo.toml, clippy.toml) flags std items newer than
# rust-version; .ci/check-msrv.py the let-chains and the dependencies that need a
# newer Rust. Neither replaces a build with that old toolchain, which this machine lacks.
check: demo-keys deps-check deny
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	python3 .ci/check-msrv.py
	$(CARGO) run --locked --quiet -- check $(CONFIGS)

deps-check:
	$(call need,python3,python3)

# cargo-deny, built from crates.io when missing: about 4 minutes on this 2-core machine.
deps-deny:
	@command -v cargo-deny >/dev/null 2>&1 || { \
	  echo "installing cargo-deny (cargo install --locked: a few minutes)"; \
	  $(CARGO) install --locked cargo-deny; }

# cargo deny check, as .deny.toml says: licences, bans (duplicate versions too), sources,
# and advisories.
#
# Advisories need the RustSec advisory database, a git repository that cargo-deny clones
# from GitHub into $(ADVISORY_DBS). No package registry ships a copy, so where GitHub
# cannot be reached (this workplace reaches only the package registries) the fetch fails:
# then a clone already in $(ADVISORY_DBS) is used offline, with its date shown, and
# with none the advisories are NOT checked, which this target says loudly (make check
# still passes: the other three checks do not need the database).
ADVISORY_DBS := $(or $(CARGO_HOME),$(HOME)/.cargo)/advisory-dbs

deny: deps-deny
	$(CARGO) deny --locked check bans licenses sources
	@if timeout 120 $(CARGO) deny --locked fetch db >/dev/null 2>&1; then \
	  $(CARGO) deny --locked --offline check advisories; \
	elif db=$$(ls -d $(ADVISORY_DBS)/advisory-db-*/.git 2>/dev/null | head -1) && [ -n "$$db" ]; then \
	  echo "deny: cannot fetch the RustSec advisory database; using the copy of" \
	       "$$(git -C "$$db/.." log -1 --format=%cs) in $(ADVISORY_DBS)"; \
	  $(CARGO) deny --locked --offline check advisories; \
	else \
	  echo "deny: ADVISORIES NOT CHECKED: the RustSec advisory database cannot be fetched" \
	       "(here GitHub is out of reach) and there is no copy in $(ADVISORY_DBS)"; \
	fi

# nginx with its stream module: a benchmark peer, and in the tests a backend that reads
# the PROXY headers sluice sends.
deps-nginx:
	@[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || { \
	  echo "installing nginx with its stream module"; \
	  $(APT) update -qq && $(APT) install -y -qq --no-install-recommends nginx libnginx-mod-stream >/dev/null; }

# The peers sluice is compared with, from Debian: HAProxy, and nginx with its stream module;
# wrk (built with OpenSSL: it speaks https too), iperf3, openssl, which makes the
# certificate of the TLS workloads, and strace for benches/syscalls.py.
deps-bench: deps-nginx
	$(call need,haproxy,haproxy)
	$(call need,wrk,wrk)
	$(call need,iperf3,iperf3)
	$(call need,openssl,openssl)
	$(call need,strace,strace)

bench: build deps-bench
	$(CARGO) bench --locked --bench proxy

bench-quick: build deps-bench
	SLUICE_BENCH_QUICK=1 $(CARGO) bench --locked --bench proxy

clean:
	$(CARGO) clean

# docs/status.png, which README.md shows: the status page of a sluice with a killed
# backend and a refused reload, taken by the browser test that checks that page.
screenshot: deps-test
	SLUICE_STATUS_SCREENSHOT=$(CURDIR)/docs/status.png $(CARGO) test --locked --test status -- --exact chromium_shows_a_killed_backend_a_drained_one_and_a_failed_reload_and_fetches_nothing_else
