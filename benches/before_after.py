#!/usr/bin/env python3
"""Two sluice builds side by side, alternating: the same config for both (a plain and a
TLS listener in front of one nginx HTTP worker, `return 200`), wrk -t1 -c64 against
each in turn, the order swapped every round, each sluice's CPU from /proc/PID/stat.

usage: benches/before_after.py BEFORE_BINARY AFTER_BINARY
  ROUNDS (default 9), DUR (seconds per wrk run, default 3),
  ONLY (one workload: "plain keep-alive", "TLS keep-alive" or "plain close").

Prints every round, then per workload the medians (after / before) and, the figure to
read, the median over the rounds of each round's after/before rate ratio. Needs nginx
and wrk (make deps-bench). Listens on 127.0.0.1:19300-19320."""
import os, re, statistics, subprocess, sys, tempfile, time

from sluice_bench import Processes, cpu, plain_listener, tls_listener, upstream, write_backend

R = int(os.environ.get("ROUNDS", "9"))
D = os.environ.get("DUR", "3")
BACKEND = 19300
PORTS = {"before": 19301, "after": 19311}

def config(port):
    return f"""[admin]
bind = "127.0.0.1:{port + 5}"

""" + plain_listener("plain", port) + "\n" + tls_listener("tls", port + 1) + "\n" + upstream(BACKEND)

def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    binaries = {"before": sys.argv[1], "after": sys.argv[2]}
    work = {
        "plain keep-alive": (0, ["-c64"], "http"),
        "TLS keep-alive": (1, ["-c64"], "https"),
        "plain close": (0, ["-c64", "-H", "Connection: close"], "http"),
    }
    if os.environ.get("ONLY"):
        work = {k: v for k, v in work.items() if k == os.environ["ONLY"]}
        if not work:
            sys.exit(f"ONLY: no workload {os.environ['ONLY']!r}")
    with tempfile.TemporaryDirectory() as dir, Processes() as procs:
        backend = write_backend(dir, BACKEND)
        for name, port in PORTS.items():
            with open(f"{dir}/{name}.toml", "w") as f:
                f.write(config(port))
        procs.start(["nginx", "-p", dir, "-c", backend])
        sluices = {name: procs.start([binary, "run", "--config", f"{dir}/{name}.toml"])
                   for name, binary in binaries.items()}
        time.sleep(1.5)
        for name, p in sluices.items():
            procs.started(f"{name} ({binaries[name]})", p)
        res = {(w, k): [] for w in work for k in binaries}
        for r in range(R):
            order = list(binaries) if r % 2 == 0 else list(binaries)[::-1]
            for w, (offset, args, scheme) in work.items():
                for k in order:
                    url = f"{scheme}://127.0.0.1:{PORTS[k] + offset}/"
                    c0 = cpu(sluices[k].pid)
                    out = subprocess.run(["wrk", "-t1", f"-d{D}s", *args, url],
                                         capture_output=True, text=True).stdout
                    c1 = cpu(sluices[k].pid)
                    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
                    n = int(re.search(r"(\d+) requests in", out).group(1))
                    bad = re.search(r"Socket errors.*|Non-2xx.*", out)
                    if bad:
                        sys.exit(f"round {r} {w} {k}: {bad.group(0)}")
                    us = (c1 - c0) / n * 1e6
                    res[(w, k)].append((rate, us))
                    print(f"round {r} {w:17s} {k:6s} {rate:9.0f}/s {us:7.2f} us", flush=True)
        print("medians, after / before:")
        for w in work:
            b, a = res[(w, "before")], res[(w, "after")]
            ratio = statistics.median(a[i][0] / b[i][0] for i in range(R))
            faster = sum(1 for i in range(R) if a[i][0] > b[i][0])
            print(f"{w:17s} req/s {statistics.median(x[0] for x in a):7.0f} / "
                  f"{statistics.median(x[0] for x in b):7.0f}, CPU per request "
                  f"{statistics.median(x[1] for x in a):6.2f} / "
                  f"{statistics.median(x[1] for x in b):6.2f} us, rate ratio "
                  f"{ratio:.3f} (after faster in {faster} of {R} rounds)")

main()
