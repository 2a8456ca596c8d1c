#!/usr/bin/env python3
"""One bulk stream through sluice builds and nginx stream, alternated: iperf3 -c (one
stream, client to server) through each target in turn every round, the order turned
around each round; Gbit/s and the proxy's CPU seconds per GB moved, medians.

usage: benches/bulk.py NAME=BINARY[,splice] ... (e.g. before=/tmp/old/sluice
after=target/release/sluice after-splice=target/release/sluice,splice)
env: ROUNDS (default 7), DUR seconds per run (default 3), STREAMS (default 1),
REVERSE=1 for server to client (iperf3 -R)."""
import json, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sluice_bench import Processes, cpu, plain_listener, upstream

ROUNDS = int(os.environ.get("ROUNDS", "7"))
DUR = int(os.environ.get("DUR", "3"))
STREAMS = os.environ.get("STREAMS", "1")
REVERSE = os.environ.get("REVERSE") == "1"
IPERF, NGINX, FIRST = 19300, 19301, 19310


def group_cpu(pid):
    """CPU seconds of every process in `pid`'s group (nginx's workers are children)."""
    out = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout
    total = 0.0
    for p in out.split():
        try:
            total += cpu(int(p))
        except FileNotFoundError:
            pass
    return total


def sluice_config(port, splice):
    return f"""[admin]
bind = "127.0.0.1:{port + 50}"

[relay]
splice = {"true" if splice else "false"}

""" + plain_listener("bulk", port) + "\n" + upstream(IPERF)


def nginx_config(dir):
    return f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off; master_process on; worker_processes 2; pid {dir}/n.pid;
error_log {dir}/n.err warn; events {{ worker_connections 4096; }}
stream {{ proxy_timeout 1h; proxy_half_close on;
  server {{ listen 127.0.0.1:{NGINX}; proxy_pass 127.0.0.1:{IPERF}; }} }}
"""


def iperf(port):
    cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(DUR), "-P", STREAMS, "-J"]
    if REVERSE:
        cmd.append("-R")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=DUR + 30).stdout
    end = json.loads(out)["end"]
    return end["sum_received"]["bytes"], end["sum_received"]["bits_per_second"] / 1e9


def main():
    specs = [a.split("=", 1) for a in sys.argv[1:]]
    if not specs:
        sys.exit(__doc__)
    dir = tempfile.mkdtemp(prefix="sluice-bulk-")
    with Processes() as procs:
        procs.started("iperf3", procs.start(["iperf3", "-s", "-p", str(IPERF)]))
        conf = f"{dir}/nginx.conf"
        open(conf, "w").write(nginx_config(dir))
        targets = {"nginx": (procs.start(["nginx", "-c", conf]), NGINX)}
        for i, (name, spec) in enumerate(specs):
            binary, *opts = spec.split(",")
            port = FIRST + i
            path = f"{dir}/{name}.toml"
            open(path, "w").write(sluice_config(port, "splice" in opts))
            targets[name] = (procs.start([binary, "run", "--config", path]), port)
        time.sleep(1.5)
        for name, (p, _) in targets.items():
            procs.started(name, p)
        res = {k: [] for k in targets}
        order = list(targets)
        for r in range(ROUNDS):
            for name in order if r % 2 == 0 else order[::-1]:
                p, port = targets[name]
                c0 = group_cpu(p.pid)
                moved, gbit = iperf(port)
                used = group_cpu(p.pid) - c0
                res[name].append((gbit, used / (moved / 1e9)))
                print(f"round {r} {name:14s} {gbit:6.2f} Gbit/s {used / (moved / 1e9):6.3f} s/GB",
                      flush=True)
        print("medians:")
        for name, v in res.items():
            print(f"{name:14s} {statistics.median(x[0] for x in v):6.2f} Gbit/s "
                  f"{statistics.median(x[1] for x in v):6.3f} CPU s/GB")


if __name__ == "__main__":
    main()
