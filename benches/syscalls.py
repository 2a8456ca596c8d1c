#!/usr/bin/env python3
"""System calls per proxied connection, by call: each sluice build given, then nginx's
stream module (2 workers), each in front of one nginx HTTP worker (`return 200`), under
`wrk -t1 -c16 -H 'Connection: close'` for DUR seconds (default 2) with `strace -f -c`
attached to the proxy's process (nginx: its workers). strace slows the proxy down, so
the counts are the figure here, not the rate. The counts include the second before the
load and the moment after it, in which an idle proxy makes a few calls.

usage: benches/syscalls.py SLUICE_BINARY [SLUICE_BINARY ...]

Needs nginx, wrk and strace (make deps-bench). Listens on 127.0.0.1:19400-19409."""
import os, re, subprocess, sys, tempfile, time

from sluice_bench import Processes, plain_listener, upstream, write_backend

D = os.environ.get("DUR", "2")
BACKEND, PROXY, ADMIN = 19400, 19401, 19409

def wrk(seconds):
    out = subprocess.run(["wrk", "-t1", f"-d{seconds}s", "-c16", "-H", "Connection: close",
                          f"http://127.0.0.1:{PROXY}/"], capture_output=True, text=True).stdout
    return int(re.search(r"(\d+) requests in", out).group(1))

def count(dir, pids):
    """Connections served under strace, and the strace -c table of `pids`."""
    wrk(1)  # warm up: the first connections fill the proxy's pools
    table = f"{dir}/strace.txt"
    args = ["strace", "-f", "-c", "-o", table]
    for pid in pids:
        args += ["-p", str(pid)]
    st = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    time.sleep(1)  # strace attaches to every thread
    n = wrk(D)
    st.send_signal(2)
    st.wait()
    rows = []
    for line in open(table):
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*(\w+)$", line)
        if m and m.group(3) != "total":
            rows.append((m.group(3), int(m.group(1)), int(m.group(2) or 0)))
    return n, rows

def report(name, n, rows):
    total = sum(calls for _, calls, _ in rows)
    print(f"{name}: {n} connections, {total / n:.2f} system calls per connection")
    for call, calls, errors in sorted(rows, key=lambda r: -r[1]):
        if calls / n >= 0.01:
            failed = f"  ({errors / n:.2f} failed)" if errors / n >= 0.01 else ""
            print(f"  {call:14} {calls / n:5.2f}{failed}")

def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as dir, Processes() as procs:
        procs.start(["nginx", "-p", dir, "-c", write_backend(dir, BACKEND)])
        with open(f"{dir}/sluice.toml", "w") as f:
            f.write(f'[admin]\nbind = "127.0.0.1:{ADMIN}"\n\n'
                    + plain_listener("plain", PROXY) + "\n" + upstream(BACKEND))
        for binary in sys.argv[1:]:
            p = procs.start([binary, "run", "--config", f"{dir}/sluice.toml"])
            time.sleep(1.5)
            procs.started(binary, p)
            report(binary, *count(dir, [p.pid]))
            procs.stop(p)
        with open(f"{dir}/stream.conf", "w") as f:
            f.write(f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off; worker_processes 2; pid {dir}/stream.pid; error_log {dir}/stream.err;
events {{ worker_connections 4096; }}
stream {{ server {{ listen 127.0.0.1:{PROXY} backlog=1024; proxy_pass 127.0.0.1:{BACKEND}; }} }}
""")
        master = procs.start(["nginx", "-p", dir, "-c", f"{dir}/stream.conf", "-e",
                              f"{dir}/stream.err"])
        time.sleep(1.5)
        procs.started("nginx stream", master)
        workers = subprocess.run(["pgrep", "-P", str(master.pid)],
                                 capture_output=True, text=True).stdout.split()
        report("nginx stream", *count(dir, workers))

if __name__ == "__main__":
    main()
