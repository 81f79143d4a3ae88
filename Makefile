# The two commands a newcomer needs: `make demo` (the main job) and `make test`.
# Everything else here is what those two are made of.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_CERTS := conf/dev/certs
TEST_CERTS := conf/test/certs
RUN := run

.PHONY: all venv certs os-deps bench-deps test test-trial demo stop sd-setup bench chaos chaos-redis chaos-sentinel fuzz soak attack clean

all: venv certs

# A compat-mode editable install keeps the repository root on sys.path, so twistd finds
# twisted/plugins/epsproxy_plugins.py from any folder (the default editable mode hides it).
$(STAMP): setup.cfg pyproject.toml setup.py epsproxy/proxy/_splice_engine.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

certs: $(DEV_CERTS)/root.crt $(TEST_CERTS)/root.crt

$(DEV_CERTS)/root.crt: | $(STAMP)
	$(BIN)/eps certs $(DEV_CERTS) --directory conf/dev/directory

$(TEST_CERTS)/root.crt: | $(STAMP)
	$(BIN)/eps certs $(TEST_CERTS) --directory conf/test/directory

# The tests use real tools as peers and checkers (Redis and its sentinels, tinyproxy,
# openssl, curl, HAProxy, socat, nginx, Chromium, systemd-analyze, promtool).  Install them
# when missing and we can (root with apt-get); otherwise say what is needed.
# A tool whose Debian package has another name is written binary:package.
OS_TOOLS := redis-server redis-sentinel openssl curl tinyproxy haproxy socat systemd-analyze:systemd promtool:prometheus chromium nginx
# What make bench measures beside ours (never needed by make test).
BENCH_TOOLS := haproxy socat nginx
os-deps:
	@missing=""; for tool in $(OS_TOOLS); do command -v $${tool%%:*} >/dev/null || [ -x /usr/sbin/$${tool%%:*} ] || missing="$$missing $${tool#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			echo "installing$$missing"; apt-get update -qq && apt-get install -y -qq$$missing >/dev/null; \
		else \
			echo "make test needs$$missing: install them (e.g. sudo apt-get install$$missing)"; exit 1; \
		fi; \
	fi

# The layer contracts (setup.cfg [importlinter]) and the type check (setup.cfg [mypy]) run
# first: a forbidden import or a type error fails the build before the slower tests run.
test: venv certs os-deps
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q

test-trial: venv certs
	$(BIN)/trial tests

demo: venv certs
	$(BIN)/python -m epsproxy.dev.demo start --run-dir $(RUN)

stop: venv
	$(BIN)/python -m epsproxy.dev.demo stop --run-dir $(RUN)

sd-setup: venv certs
	$(BIN)/python -m epsproxy.dev.demo sd-setup

bench: venv certs bench-deps
	$(BIN)/pip install -q -e '.[test,bench]' --config-settings editable_mode=compat
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(RUN) $(DEV_CERTS) $(TEST_CERTS) build *.egg-info twisted/plugins/dropin.cache

bench-deps:
	@missing=""; for tool in $(BENCH_TOOLS); do command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			echo "installing$$missing"; apt-get update -qq && apt-get install -y -qq$$missing >/dev/null; \
		else \
			echo "make bench compares against$$missing: install them (e.g. sudo apt-get install$$missing); measuring without them"; \
		fi; \
	fi

# Kill -9 and restart each part of the dev network under checked traffic, one at a
# time, and an SD serving hd-2 a forked history (~3 min; fixed ports: not while
# `make demo` runs).
chaos: venv certs
	$(BIN)/python -m chaos --run-dir $(RUN)/chaos

# The same with a real redis-server as the store of the SD and both proxies, and Redis
# itself killed -9 and restarted as one more fault (~4 min; needs redis-server).
chaos-redis: venv certs os-deps
	$(BIN)/python -m chaos --store redis --run-dir $(RUN)/chaos-redis

# The same with two redis-server (master, replica) under three redis-sentinel: the master
# killed -9 is a fault the SD and proxies must follow through a failover (~4 min).
chaos-sentinel: venv certs os-deps
	$(BIN)/python -m chaos --store redis-sentinel --run-dir $(RUN)/chaos-sentinel

# Coverage-guided fuzzing (atheris) of the ClientHello reader, the line decoder, JSON-RPC
# request handling and record verification; FUZZ_RUNS executions per target.
FUZZ_RUNS ?= 1000000
fuzz: venv
	$(BIN)/pip install -q -e '.[test,fuzz]' --config-settings editable_mode=compat
	$(BIN)/python -m fuzz all -runs=$(FUZZ_RUNS)

# 1,000 TLS clients through the SNI path and 200 EPS calls through the P2P path on the
# dev network, every payload checked by SHA-256; RSS and fds per process (~13 min).
soak: venv certs
	$(BIN)/python -m soak --run-dir $(RUN)/soak

# Hostile input against every listener of the dev network while checked legitimate
# traffic runs: slowloris, handshake and connection floods, tokens, certificates,
# records, oversized input (~5 min; fixed ports: not while `make demo` runs).
attack: venv certs os-deps
	$(BIN)/python -m attack --run-dir $(RUN)/attack
