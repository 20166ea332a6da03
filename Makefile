# raftfast — the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST := $(PY) -m pytest
STAMP  := $(VENV)/.installed
SOURCES := pyproject.toml setup.py raftfast/_version.py raftfast/_log.pyx raftfast/_log.pxd raftfast/_batch.pyx raftfast/_batch.pxd raftfast/_store.pyx

.PHONY: venv build test test-compiled test-compiled-clusters test-compiled-rest test-pure etcd-client etcd3-suite lint run soak chaos bench compare failover proto wheels clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Install the package with its test extras, then build the extensions in place so the tests
# (run from this tree) import the compiled modules.
$(STAMP): $(PY) $(SOURCES)
	$(PIP) install -q -e '.[test]'
	RAFTFAST_REQUIRE_COMPILED=1 $(PY) setup.py -q build_ext --inplace
	touch $(STAMP)

venv build: $(STAMP)

# The compiled run (in two parts) and the pure run go two at a time: their tests wait on
# clusters more than they use the cores. Each part's output is printed whole once it ends.
test: $(STAMP)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory -j2 --output-sync=target test-compiled test-pure

lint: $(STAMP)
	$(PY) -m ruff check raftfast tests bench examples setup.py

# The compiled run in two parts: the real clusters' suites (as long as the other two runs
# together, which follow each other beside it), and the rest.
CLUSTER_SUITES := tests/integration tests/fault tests/etcd tests/hostile tests/test_packaging.py bench
COMPILED_PYTEST := RAFTFAST_BENCH_SECONDS=$${RAFTFAST_BENCH_SECONDS:-2} \
	$(PYTEST) -q -p no:cacheprovider --benchmark-disable
test-compiled: test-compiled-clusters test-compiled-rest

test-compiled-clusters test-compiled-rest: $(STAMP) etcd-client
	@echo "== compiled run: $(if $(filter %clusters,$@),the clusters' suites,the rest) =="
	$(PY) -c "import raftfast, sys; sys.exit(0 if raftfast.COMPILED else 'compiled modules not in use')"
	$(COMPILED_PYTEST) $(if $(filter %clusters,$@),$(CLUSTER_SUITES),\
		tests $(addprefix --ignore=,$(CLUSTER_SUITES)))

# etcdctl (Debian's etcd-client), a client tests/etcd/test_etcdctl.py runs against the etcd API.
etcd-client:
	command -v etcdctl >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q etcd-client; }

# python-etcd3's own test suite against a 3-node raftfast cluster (needs 127.0.0.1:2379 free;
# downloads etcd3 0.12.0 into .etcd3-suite/; the tests it cannot pass here are listed with why).
etcd3-suite: $(STAMP) etcd-client
	$(PY) tests/etcd/clients/python_etcd3_suite.py

# The heavy real-cluster tests run compiled only: the pure twins' CRC32C (~15 MB/s) makes a
# node with a 9 MiB write block its loop for seconds (elections follow), and the long loads slow
# (the etcd API's hostile suite writes dozens of 1.5 MiB values; a 12 MiB put_many took a
# minute). The etcd clients' tests (etcdctl, etcd3aio), the connection floods, TLS, the bench
# command and the examples run compiled only too: that code is the same Python in both runs,
# as it is in the CLI's (against a stand-in server), the Session server's, health's, read
# rounds', a user's state machine's and the big etcd loads' (kept out to hold `make test` near
# 15 minutes; the twins' own suites, hostile input, the simulation and the clusters still run).
test-pure: $(STAMP) etcd-client
	@echo "== pure-Python run (RAFTFAST_PUREPYTHON=1) =="
	RAFTFAST_PUREPYTHON=1 $(PYTEST) -q -p no:cacheprovider --benchmark-disable tests \
		--ignore=tests/fault/test_chaos.py --ignore=tests/fault/test_durability.py \
		--ignore=tests/integration/test_bounds.py --ignore=tests/integration/test_catch_up.py \
		--ignore=tests/hostile/test_etcd_hostile.py --ignore=tests/etcd/test_etcdctl.py \
		--ignore=tests/etcd/test_python_client.py \
		--ignore=tests/hostile/test_connection_floods.py --ignore=tests/security/test_tls.py \
		--ignore=tests/client/test_bench_cli.py --ignore=tests/test_examples.py \
		--ignore=tests/client/test_cli.py --ignore=tests/server/test_session_stream.py \
		--ignore=tests/server/test_health.py --ignore=tests/server/test_read_rounds.py \
		--ignore=tests/server/test_snapshot_save_flood.py \
		--ignore=tests/integration/test_user_state_machine.py \
		--ignore=tests/etcd/test_watch_memory.py --ignore=tests/etcd/test_compaction_cost.py \
		--ignore=tests/etcd/test_big_requests.py \
		--deselect="tests/hostile/test_reproductions.py::test_a_session_frame_bigger_than_one_apply_is_applied_whole" \
		--deselect="tests/hostile/test_reproductions.py::test_an_oversized_put_many_is_refused_at_once_and_a_huge_scan_comes_in_pages"

run: $(STAMP)
	$(PY) -m raftfast.tools.demo

# Thousands of simulation seeds, 100,000 fuzz inputs per decoder, thousands of hostile requests
# per RPC family against a real cluster.
soak: $(STAMP)
	RAFTFAST_SIM_SEEDS=$${RAFTFAST_SIM_SEEDS:-3000} $(PYTEST) -q -p no:cacheprovider -m slow tests/sim
	RAFTFAST_FUZZ_EXAMPLES=$${RAFTFAST_FUZZ_EXAMPLES:-100000} $(PYTEST) -q -p no:cacheprovider \
		tests/fault/test_fuzz.py
	RAFTFAST_HOSTILE_EXAMPLES=$${RAFTFAST_HOSTILE_EXAMPLES:-2000} $(PYTEST) -q -p no:cacheprovider \
		tests/hostile/test_hostile_suite.py
	RAFTFAST_BOUND_SECONDS=$${RAFTFAST_BOUND_SECONDS:-600} $(PYTEST) -q -s -p no:cacheprovider \
		tests/integration/test_bounds.py

# Micro (compiled vs pure) and macro (3/5-node clusters, no-op gRPC baseline) benchmarks, and
# the failover time, with their tight gates (tests/gates.py; `make test` holds generous ones);
# the numbers are printed. Run nothing else meanwhile: the machine has 2 cores.
bench: $(STAMP)
	RAFTFAST_TIGHT_GATES=1 RAFTFAST_BENCH_SECONDS=$${RAFTFAST_BENCH_SECONDS:-5} $(PYTEST) -q -s \
		-p no:cacheprovider --benchmark-columns=min,median,ops bench \
		tests/integration/test_cluster.py::test_kill9_leader_new_leader_fast_and_no_acknowledged_write_lost

# raftfast, etcd (Debian's etcd-server) and PySyncObj (PyPI) side by side on 127.0.0.1: every
# workload 3 times (the systems in turn), each row the median (bench/compare.py --rounds).
compare: $(STAMP)
	command -v etcd >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q etcd-server etcd-client; }
	$(PIP) install -q pysyncobj==0.3.17
	$(PY) bench/compare.py --duration $${RAFTFAST_COMPARE_SECONDS:-3} \
		--rounds $${RAFTFAST_COMPARE_ROUNDS:-3}

# How long writes stop when a leader dies (kill -9, 10 rounds) or the nodes restart one by one,
# raftfast beside etcd with the same writer; leader changes under 60 s of batched load.
failover: $(STAMP)
	command -v etcd >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q etcd-server etcd-client; }
	$(PY) bench/failover.py --rounds $${RAFTFAST_FAILOVER_ROUNDS:-10}

# The long fault-injection run: >= 20 schedules over 3 and 5 nodes, half of them through the
# etcd API (about 10 minutes).
chaos: $(STAMP)
	$(PY) -m tests.fault.chaos --schedules $${RAFTFAST_CHAOS_SCHEDULES:-20} \
		--duration $${RAFTFAST_CHAOS_DURATION:-20}

# Regenerate the protobuf/gRPC code from proto/ (never edit raftfast/proto/ by hand).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iraftfast/proto=proto/raftfast/v1 --python_out=. \
		--grpc_python_out=. --pyi_out=. proto/raftfast/v1/raftfast.proto
	$(PY) -m grpc_tools.protoc -Iraftfast/proto/etcd=proto/etcd --python_out=. \
		--grpc_python_out=. --pyi_out=. proto/etcd/kv.proto proto/etcd/rpc.proto

# The sdist and a manylinux wheel of this machine's Python in dist/: built from the sdist
# (compiled, or it fails), the .so stripped, then tagged by auditwheel (`auditwheel show` tells
# which policy). Wheels for other Pythons and platforms: cibuildwheel ([tool.cibuildwheel]).
wheels: $(STAMP)
	rm -rf build/wheels dist
	RAFTFAST_REQUIRE_COMPILED=1 $(PY) -m build --outdir build/wheels .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m auditwheel repair --wheel-dir dist \
		build/wheels/raftfast-*.whl
	cp build/wheels/raftfast-*.tar.gz dist/
	$(PY) -m auditwheel show dist/raftfast-*.whl
	@ls -l dist

clean:
	rm -rf build dist *.egg-info raftfast/*.so raftfast/_log.c raftfast/_batch.c raftfast/_store.c
