#!/usr/bin/env python3
# The engine experiment (BENCHMARKS.md): idle memory per proxied connection in three of
# the minimal proxies. N client connections are held open through each in turn (no
# byte sent), and its RSS is read before and after. Build first: cargo build --release (here).
import subprocess, socket, time, os, sys, signal
HERE = os.path.dirname(os.path.abspath(__file__))
eng = HERE + "/target/release/sluice-engine-experiment"
N = int(os.environ.get("N", "3000"))
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
def fds(pid): return len(os.listdir(f"/proc/{pid}/fd"))
b = subprocess.Popen(["nginx", "-p", HERE, "-c", HERE + "/backend.conf"], start_new_session=True)
try:
    for mode, port in [("tokio", 19203), ("ring", 19207), ("provided", 19211)]:
        p = subprocess.Popen([eng, mode, f"127.0.0.1:{port}", "127.0.0.1:19100", "2"])
        time.sleep(0.5)
        r0, f0 = rss(p.pid), fds(p.pid)
        socks = []
        for i in range(N):
            s = socket.create_connection(("127.0.0.1", port)); socks.append(s)
        deadline = time.time() + 20
        while fds(p.pid) < f0 + 2 * N and time.time() < deadline: time.sleep(0.05)
        time.sleep(0.5)
        r1, f1 = rss(p.pid), fds(p.pid)
        print(f"{mode:9s} held {(f1-f0)//2} proxied connections: RSS {r0} -> {r1} KiB, {(r1-r0)/N:.2f} KiB per connection", flush=True)
        for s in socks: s.close()
        p.send_signal(signal.SIGKILL); p.wait()
finally:
    os.killpg(b.pid, signal.SIGTERM)
