#!/usr/bin/env python3
"""sluice's CPU per TLS connection by the suite the client asks for: openssl s_time
against one sluice (a TLS listener in front of one nginx HTTP worker), the suites in
turn each round (the order reversed every other round), sluice's CPU from /proc.

usage: benches/tls_suites.py SLUICE_BINARY    ROUNDS (default 7), DUR (default 3)

Prints every round, then per case the median CPU per connection and, per pair of
suites, the median of the rounds' AES-128/AES-256 ratios. Needs nginx and openssl.
Listens on 127.0.0.1:19330-19336."""
import os, re, statistics, subprocess, sys, tempfile, time

from sluice_bench import Processes, cpu, tls_listener, upstream, write_backend

R = int(os.environ.get("ROUNDS", "7"))
D = os.environ.get("DUR", "3")
BACKEND, PORT = 19330, 19331
CASES = {
    ("TLS 1.2 resumed", "AES256"): ["-tls1_2", "-reuse", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"],
    ("TLS 1.2 resumed", "AES128"): ["-tls1_2", "-reuse", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
    ("TLS 1.2 full", "AES256"): ["-tls1_2", "-new", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"],
    ("TLS 1.2 full", "AES128"): ["-tls1_2", "-new", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
    ("TLS 1.3 full", "AES256"): ["-tls1_3", "-new", "-ciphersuites", "TLS_AES_256_GCM_SHA384"],
    ("TLS 1.3 full", "AES128"): ["-tls1_3", "-new", "-ciphersuites", "TLS_AES_128_GCM_SHA256"],
}

def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as dir, Processes() as procs:
        backend = write_backend(dir, BACKEND)
        with open(f"{dir}/sluice.toml", "w") as f:
            f.write(f'[admin]\nbind = "127.0.0.1:{PORT + 5}"\n\n'
                    + tls_listener("tls", PORT) + "\n" + upstream(BACKEND))
        procs.start(["nginx", "-p", dir, "-c", backend])
        sluice = procs.start([sys.argv[1], "run", "--config", f"{dir}/sluice.toml"])
        time.sleep(1.5)
        procs.started("sluice", sluice)
        res = {k: [] for k in CASES}
        for r in range(R):
            cases = list(CASES.items())
            for k, args in (cases if r % 2 == 0 else cases[::-1]):
                c0 = cpu(sluice.pid)
                out = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{PORT}",
                                      "-www", "/", "-time", D, *args],
                                     capture_output=True, text=True).stdout
                c1 = cpu(sluice.pid)
                # With -reuse the last summary counts the resumed connections.
                n = int(re.findall(r"(\d+) connections in [\d.]+ real", out)[-1])
                us = (c1 - c0) / n * 1e6
                res[k].append(us)
                print(f"round {r} {k[0]:15s} {k[1]} {n:6d} connections {us:7.1f} us", flush=True)
        for k in CASES:
            print(f"{k[0]:15s} {k[1]} median {statistics.median(res[k]):7.1f} us per connection")
        for case in dict.fromkeys(k[0] for k in CASES):
            a, b = res[(case, "AES128")], res[(case, "AES256")]
            ratio = statistics.median(x / y for x, y in zip(a, b))
            lower = sum(1 for x, y in zip(a, b) if x < y)
            print(f"{case:15s} AES-128/AES-256: median ratio {ratio:.3f}, AES-128 cheaper in {lower} of {R} rounds")

main()
