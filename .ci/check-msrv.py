#!/usr/bin/env python3
"""Checks Cargo.toml's rust-version against what can be seen without an older toolchain.

This machine has one toolchain, so `cargo +1.88 check` cannot run. What stands in for it:

- clippy's `incompatible_msrv` (in `make check`, tests included through clippy.toml)
  flags std/core/alloc items that are newer than rust-version;
- this script flags the language features in FEATURES below, which no lint checks, and
  every dependency in Cargo.lock whose declared rust-version is newer than ours.

What neither can see: a language feature missing from FEATURES (trait upcasting, say), a
trait impl or a behaviour std gained later, a Cargo.toml key newer than rust-version, a
dependency that uses newer Rust than it declares (or declares nothing). Only building with
the old toolchain itself proves it; where one can be installed, `cargo +1.88 check
--all-targets` is the real test.

Usage: .ci/check-msrv.py  (from anywhere; reads the package around it)
"""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["src", "tests", "benches"]  # tests/fuzz is a separate nightly-only crate
SKIP = [ROOT / "tests" / "fuzz"]


def version(text):
    """"1.85" and "1.85.0" alike, as (1, 85, 0)."""
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def rust_version():
    manifest = (ROOT / "Cargo.toml").read_text()
    package = re.search(r"^\[package\]\n(.*?)(?=^\[)", manifest, re.M | re.S)
    found = package and re.search(r'^rust-version\s*=\s*"([0-9.]+)"', package.group(1), re.M)
    if not found:
        sys.exit("check-msrv: no rust-version in Cargo.toml's [package]")
    return found.group(1)


# Rust source as tokens: identifiers and punctuation, with their line. Comments, strings,
# characters, numbers and lifetimes are dropped, so `&&` in a string is no let-chain.
TOKEN = re.compile(
    r"""
      (?P<skip> //[^\n]*                         # line comment
              | (?:b|c)?"(?:\\.|[^"\\])*"        # string
              | (?:b|c)?r(?P<h>\#*)".*?"(?P=h)   # raw string
              | b?'(?:\\.[^']*|[^\\'])'          # character
              | '[A-Za-z_]\w*                    # lifetime, label
              | \d[\w.]*                         # number
              | \s+ )
    | (?P<block> /\* )
    | (?P<ident> r\#\w+ | [A-Za-z_]\w* )
    | (?P<punct> && | \|\| | [^\s] )
    """,
    re.X | re.S,
)


def tokens(text):
    i, line = 0, 1
    while i < len(text):
        m = TOKEN.match(text, i)
        if m.group("block"):  # nested block comments
            depth, j = 1, i + 2
            while depth and j < len(text):
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            line += text.count("\n", i, j)
            i = j
            continue
        if not m.group("skip"):
            yield m.group("ident") or m.group("punct"), line
        line += m.group(0).count("\n")
        i = m.end()


def let_chains(toks):
    """Lines of each `if`/`while` whose condition holds both `let` and `&&` outside any
    brackets: a let-chain (`if let Some(x) = a && x > 1`, `if a && let Some(x) = b`)."""
    for k, (tok, line) in enumerate(toks):
        if tok not in ("if", "while"):
            continue
        depth, has_let, has_and = 0, False, False
        for t, _ in toks[k + 1 :]:
            if depth == 0 and t in ("{", ";"):
                break  # the body (or no condition at all)
            if t in ("(", "[", "{"):
                depth += 1
            elif t in (")", "]", "}"):
                depth -= 1
                if depth < 0:
                    break
            elif depth == 0 and t == "let":
                has_let = True
            elif depth == 0 and t == "&&":
                has_and = True
        if has_let and has_and:
            yield line


# Language features no lint checks, with the release that made them stable. Add a row
# (name, version, function from the token list to the lines using it) for another.
FEATURES = [
    ("let-chains (`if let … && …`)", "1.88", let_chains),
]


def rust_files():
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.rs")):
            if not any(path.is_relative_to(s) for s in SKIP):
                yield path


def main():
    ours = rust_version()
    problems = []

    for name, since, find in FEATURES:
        uses = []
        for path in rust_files():
            toks = list(tokens(path.read_text()))
            uses += [f"{path.relative_to(ROOT)}:{line}" for line in find(toks)]
        if uses and version(since) > version(ours):
            shown = ", ".join(uses[:5]) + (f" and {len(uses) - 5} more" if len(uses) > 5 else "")
            problems.append(f"{name} needs Rust {since}, rust-version is {ours}: {shown}")

    # Every locked package, for every platform; a dependency newer than us would make
    # the build fail at our rust-version however the code is written.
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--locked", "--format-version", "1"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
    )
    resolved = {node["id"] for node in meta["resolve"]["nodes"]}
    for p in meta["packages"]:
        theirs = p.get("rust_version")
        if p["id"] in resolved and theirs and version(theirs) > version(ours):
            problems.append(f"{p['name']} {p['version']} declares rust-version {theirs}, ours is {ours}")

    for p in problems:
        print(f"check-msrv: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check-msrv: rust-version {ours} covers the features checked and every locked dependency")


if __name__ == "__main__":
    main()
