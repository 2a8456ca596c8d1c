#!/usr/bin/env bash
# The resolver's cost at many names: sluice with one upstream of N backend names (each a
# host name with its own loopback address), answered by dnsmasq on a loopback port with
# TTL 1 s, so every name is re-resolved about once a second. Reports sluice's CPU (user +
# system, as a share of one core) and resident memory over the window, against the same
# config with the addresses written as IP literals (no resolver at work).
#
#   cargo build --release && bash benches/discovery.sh            # 1,000 names, 30 s
#   NAMES=200 SECONDS_RUN=10 bash benches/discovery.sh             # smaller
#
# Needs dnsmasq (make deps-test installs it). Everything stays on loopback; both
# processes are started here and stopped by their pids on exit.
set -euo pipefail

NAMES=${NAMES:-1000}
SECONDS_RUN=${SECONDS_RUN:-30}
SLUICE=${SLUICE:-target/release/sluice}
[ -x "$SLUICE" ] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v dnsmasq >/dev/null || { echo "dnsmasq is missing: make deps-test" >&2; exit 1; }

dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Name i is n$i.bench.test at 127.0.X.Y.
for i in $(seq 1 "$NAMES"); do
  echo "127.0.$((i / 250 + 1)).$((i % 250 + 1)) n$i.bench.test"
done > "$dir/hosts"
dnsmasq --keep-in-foreground --no-daemon --port="$port" --listen-address=127.0.0.1 \
  --bind-interfaces --no-resolv --no-hosts --no-poll --local=/test/ --user=root \
  --pid-file="$dir/dnsmasq.pid" --addn-hosts="$dir/hosts" --local-ttl=1 \
  2>"$dir/dnsmasq.log" &
pids+=($!)
for _ in $(seq 1 50); do grep -q "read $dir/hosts" "$dir/dnsmasq.log" 2>/dev/null && break; sleep 0.1; done
grep -q "read $dir/hosts" "$dir/dnsmasq.log" || { echo "dnsmasq did not start:" >&2; cat "$dir/dnsmasq.log" >&2; exit 1; }

config() { # $1: "names" or "literals"
  cat <<EOF
[admin]
bind = "127.0.0.1:0"

[resolver]
nameservers = ["127.0.0.1:$port"]

[[listener]]
name = "front"
bind = ["127.0.0.1:0"]
upstream = "many"

[[upstream]]
name = "many"
EOF
  for i in $(seq 1 "$NAMES"); do
    if [ "$1" = names ]; then
      echo "[[upstream.backend]]"; echo "address = \"n$i.bench.test:9\""
    else
      echo "[[upstream.backend]]"; echo "address = \"127.0.$((i / 250 + 1)).$((i % 250 + 1)):9\""
    fi
  done
}

# CPU seconds (utime + stime) of pid $1.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }

measure() { # $1: names | literals
  config "$1" > "$dir/$1.toml"
  "$SLUICE" run --config "$dir/$1.toml" >"$dir/$1.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  # Ready once it logs so (start waits for the names' first answers).
  for _ in $(seq 1 300); do grep -q "sluice ready" "$dir/$1.log" && break; sleep 0.1; done
  grep -q "sluice ready" "$dir/$1.log" || { echo "sluice did not start:"; cat "$dir/$1.log"; exit 1; }
  sleep 2 # let the first re-resolutions settle
  local c0 r0 c1
  c0=$(cpu "$pid")
  sleep "$SECONDS_RUN"
  c1=$(cpu "$pid")
  r0=$(rss_kib "$pid")
  [ -n "${DEBUG:-}" ] && tail -5 "$dir/$1.log" "$dir/dnsmasq.log"
  local admin
  admin=$(grep -o 'admin listening address=[0-9.:]*' "$dir/$1.log" | head -1 | sed 's/.*address=//')
  local resolved=""
  if [ "$1" = names ]; then
    resolved=$(curl -s "http://$admin/metrics" | awk '/^sluice_discovery_resolutions_total/ && /result="ok"/ { s += $2 } END { print s }')
  fi
  printf '%-9s %5d names  cpu %6.2f%% of a core  rss %7d KiB  %s\n' "$1" "$NAMES" \
    "$(awk -v a="$c0" -v b="$c1" -v t="$SECONDS_RUN" 'BEGIN { print (b - a) * 100 / t }')" "$r0" \
    "${resolved:+resolutions ok: $resolved}"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

measure literals
measure names
