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
import os, re, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = int(os.environ.get("ROUNDS", "9"))
D = os.environ.get("DUR", "3")
BACKEND = 19300
PORTS = {"before": 19301, "after": 19311}

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def config(port):
    return f"""[admin]
bind = "127.0.0.1:{port + 5}"

[[listener]]
name = "plain"
bind = ["127.0.0.1:{port}"]
upstream = "web"

[[listener]]
name = "tls"
bind = ["127.0.0.1:{port + 1}"]
upstream = "web"
[listener.tls]
certificates = [
  {{ cert = "{ROOT}/config/examples/certs/server.pem", key = "{ROOT}/config/examples/certs/server.key" }},
]

[[upstream]]
name = "web"
[[upstream.backend]]
address = "127.0.0.1:{BACKEND}"
"""

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
    procs = []

    def start(cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        procs.append(p)
        return p

    with tempfile.TemporaryDirectory() as dir:
        with open(f"{dir}/backend.conf", "w") as f:
            f.write(f"""daemon off; master_process on; worker_processes 1; pid {dir}/b.pid;
error_log {dir}/b.err warn; events {{ worker_connections 4096; }}
http {{ access_log off; server {{ listen 127.0.0.1:{BACKEND}; keepalive_requests 1000000;
  location / {{ return 200 "hello\\n"; }} }} }}
""")
        sluices = {}
        for name, port in PORTS.items():
            with open(f"{dir}/{name}.toml", "w") as f:
                f.write(config(port))
        try:
            start(["nginx", "-p", dir, "-c", f"{dir}/backend.conf"])
            for name, binary in binaries.items():
                sluices[name] = start([binary, "run", "--config", f"{dir}/{name}.toml"])
            time.sleep(1.5)
            for name, p in sluices.items():
                if p.poll() is not None:
                    sys.exit(f"{name} ({binaries[name]}) exited with {p.returncode}")
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
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                p.wait()

main()
