"""What the Python benchmarks in benches/ share: a sluice's CPU time,
the nginx HTTP backend they proxy to, the TLS listener's config, and the processes
they start and stop."""
import os, signal, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def cpu(pid):
    """Seconds of CPU (user + system) the process has used."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def write_backend(dir, port):
    """An nginx config in `dir`: one worker answering `return 200` on `port`."""
    path = f"{dir}/backend.conf"
    with open(path, "w") as f:
        f.write(f"""daemon off; master_process on; worker_processes 1; pid {dir}/b.pid;
error_log {dir}/b.err warn; events {{ worker_connections 4096; }}
http {{ access_log off; server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
  location / {{ return 200 "hello\\n"; }} }} }}
""")
    return path

def plain_listener(name, port):
    """A sluice plain TCP listener on `port`, to upstream "web"."""
    return f"""[[listener]]
name = "{name}"
bind = ["127.0.0.1:{port}"]
upstream = "web"
"""

def tls_listener(name, port):
    """A sluice TLS listener on `port` with the demo certificate, to upstream "web"."""
    return f"""[[listener]]
name = "{name}"
bind = ["127.0.0.1:{port}"]
upstream = "web"
[listener.tls]
certificates = [
  {{ cert = "{ROOT}/config/examples/certs/server.pem", key = "{ROOT}/config/examples/certs/server.key" }},
]
"""

def upstream(backend):
    """The upstream "web" with one backend on port `backend`."""
    return f"""[[upstream]]
name = "web"
[[upstream.backend]]
address = "127.0.0.1:{backend}"
"""

class Processes:
    """Processes started in their own session, each stopped (SIGTERM to its group) and
    waited for on exit."""

    def __init__(self):
        self.procs = []

    def start(self, cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def started(self, name, p):
        """Exits the script if `p` has already ended."""
        if p.poll() is not None:
            sys.exit(f"{name} exited with {p.returncode}")

    def stop(self, p):
        """Stops `p` (SIGTERM to its group) now and waits for it."""
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            p.wait()
