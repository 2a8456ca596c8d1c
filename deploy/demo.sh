#!/bin/sh
# The demo that `make run` starts (run from the repository root): two HTTP backends
# (python3 -m http.server) and sluice in front of them, stopped together however the
# demo ends:
#   Ctrl-C                        sluice drains (open connections finish), then the
#                                 backends stop; a second Ctrl-C cuts the drain short
#   the terminal goes away (HUP)  sluice is sent SIGTERM (a drain), then the backends stop
#   kill (TERM) of make or of this shell: the same
# sluice runs in a session of its own (setsid), so the terminal's signals reach it only
# through this shell: a hang-up is not taken for a config reload, and Ctrl-C is one
# SIGINT, not two (a second signal would stop sluice at once).
#
# Usage: deploy/demo.sh [SLUICE_BINARY]   (default target/release/sluice)
# Overridable by environment variables, defaults in brackets; the tests use them:
#   DEMO_CONFIG   sluice's config [config/sluice.toml]; its backends must be the two below
#   DEMO_PORT_A   backend a's port on 127.0.0.1 [8081]
#   DEMO_PORT_B   backend b's port on 127.0.0.1 [8082]
#   DEMO_DIR      where the backends' pages and logs go [target/demo]
set -u

sluice=${1:-target/release/sluice}
config=${DEMO_CONFIG:-config/sluice.toml}
port_a=${DEMO_PORT_A:-8081}
port_b=${DEMO_PORT_B:-8082}
dir=${DEMO_DIR:-target/demo}

backends=
sluice_pid=
stopping=
# Passes a stop on to sluice; before sluice has started, only remembers it.
stop() {
  stopping=$1
  [ -z "$sluice_pid" ] || kill -s "$1" "$sluice_pid" 2>/dev/null
}
# Each Ctrl-C and each TERM is passed on. A hang-up is passed on once: the shell of the
# closed terminal sends SIGHUP to its jobs and the kernel sends another when that shell
# exits, and a second signal would cut sluice's drain short.
trap 'stop INT' INT
trap 'stop TERM' TERM QUIT
trap '[ -n "$stopping" ] || stop TERM' HUP

mkdir -p "$dir/a" "$dir/b"
echo "hello from backend a (127.0.0.1:$port_a)" >"$dir/a/index.html"
echo "hello from backend b (127.0.0.1:$port_b)" >"$dir/b/index.html"
python3 -m http.server --bind 127.0.0.1 --directory "$dir/a" "$port_a" >"$dir/a.log" 2>&1 &
backends="$!"
python3 -m http.server --bind 127.0.0.1 --directory "$dir/b" "$port_b" >"$dir/b.log" 2>&1 &
backends="$backends $!"

if [ "$config" = config/sluice.toml ]; then
  echo
  echo "  sluice on 127.0.0.1:8080 (and TLS on :8443) -> demo backends 127.0.0.1:$port_a, 127.0.0.1:$port_b"
  echo "  status page:  http://127.0.0.1:9555/   (open it in a browser; live)"
  echo "  try:  curl http://127.0.0.1:8080/    and    curl http://127.0.0.1:9555/metrics"
  echo "        curl --cacert config/examples/certs/ca.pem https://localhost:8443/   (TLS)"
  echo "  Ctrl-C to stop"
  echo
else
  echo "sluice on $config -> demo backends 127.0.0.1:$port_a, 127.0.0.1:$port_b (Ctrl-C to stop)"
fi

status=0
if [ -z "$stopping" ]; then
  # Not a process group leader here (no job control), so setsid does not fork: $! is
  # sluice itself.
  setsid "$sluice" run --config "$config" &
  sluice_pid=$!
  # `wait` returns early when a trapped signal arrives (the trap passes it on): wait
  # again until sluice has exited, so that its ports are free when this script ends.
  while kill -0 "$sluice_pid" 2>/dev/null; do
    wait "$sluice_pid"
    status=$?
  done
fi

# shellcheck disable=SC2086 # two pids
kill $backends 2>/dev/null
for pid in $backends; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
done
exit "$status"
