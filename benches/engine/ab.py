#!/usr/bin/env python3
# The engine experiment of issue 18 (BENCHMARKS.md, "io_uring: the engine experiment"):
# wrk -t1 -c64 Connection: close through nginx stream, sluice, and the two minimal proxies
# of src/main.rs, each to one nginx HTTP backend, alternating, medians of ROUNDS rounds.
# Build first: cargo build --release (here) and make build (in the repository root).
import subprocess, time, os, re, sys, statistics, signal
HERE = os.path.dirname(os.path.abspath(__file__))
D = int(os.environ.get("DUR", "8")); R = int(os.environ.get("ROUNDS", "3"))
procs = []
def start(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kw)
    procs.append(p); return p
def tree(pid):
    out = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]
def cpu(pid):
    t = 0
    for p in tree(pid):
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            t += int(f[11]) + int(f[12])
        except FileNotFoundError: pass
    return t / os.sysconf("SC_CLK_TCK")
start(["nginx", "-p", HERE, "-c", HERE + "/backend.conf"])
only = os.environ.get("ONLY")
eng = HERE + "/target/release/sluice-engine-experiment"
# name: (command, port); only the ones named in ONLY (all when unset) are started
plan = {
    "nginx": (["nginx", "-p", HERE, "-c", HERE + "/stream.conf"], 19102),
    "sluice": ([os.environ.get("SLUICE", HERE + "/../../target/release/sluice"), "run", "--config", HERE + "/sluice.toml"], 19101),
    "tokio-min": ([eng, "tokio", "127.0.0.1:19103", "127.0.0.1:19100", "2"], 19103),
    "hybrid-min": ([eng, "hybrid", "127.0.0.1:19105", "127.0.0.1:19100", "2"], 19105),
    "monoio-min": ([eng, "monoio", "127.0.0.1:19106", "127.0.0.1:19100", "2"], 19106),
    "ring-min": ([eng, "ring", "127.0.0.1:19107", "127.0.0.1:19100", "2"], 19107),
    "poll-min": ([eng, "poll", "127.0.0.1:19108", "127.0.0.1:19100", "2"], 19108),
    "ringio-min": ([eng, "ringio", "127.0.0.1:19109", "127.0.0.1:19100", "2"], 19109),
    "pollrecv-min": ([eng, "pollrecv", "127.0.0.1:19110", "127.0.0.1:19100", "2"], 19110),
    "provided-min": ([eng, "provided", "127.0.0.1:19111", "127.0.0.1:19100", "2"], 19111),
    "compio-min": ([eng, "compio", "127.0.0.1:19112", "127.0.0.1:19100", "2"], 19112),
    "uring-min": ([eng, "uring", "127.0.0.1:19104", "127.0.0.1:19100", "2"], 19104),
}
targets = {k: (start(cmd), port) for k, (cmd, port) in plan.items() if not only or k in only.split(",")}
time.sleep(1.5)
res = {k: [] for k in targets}
try:
    for r in range(R):
        for name, (p, port) in targets.items():
            c0 = cpu(p.pid)
            out = subprocess.run(["wrk", "-t1", "-c64", f"-d{D}s", "-H", "Connection: close", f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
            c1 = cpu(p.pid)
            m = re.search(r"Requests/sec:\s+([\d.]+)", out); rate = float(m.group(1))
            n = re.search(r"(\d+) requests in", out); reqs = int(n.group(1))
            errs = re.search(r"Socket errors: (.*)", out); non2 = re.search(r"Non-2xx.*", out)
            res[name].append((rate, (c1 - c0) / reqs * 1e6))
            print(f"round {r} {name:10s} {rate:9.0f} conn/s  {(c1-c0)/reqs*1e6:6.1f} us/conn {errs.group(1) if errs else ''} {non2.group(0) if non2 else ''}", flush=True)
    print("medians:")
    for k, v in res.items():
        print(f"{k:10s} {statistics.median(x[0] for x in v):9.0f} conn/s {statistics.median(x[1] for x in v):6.1f} us/conn")
finally:
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
