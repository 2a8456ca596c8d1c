//! The shape of `src/`: which module may import which.
//!
//! It reads the files under `src/` (no build, no dependency) and checks two rules over the
//! file-level module graph, one node per file (`src/a/b.rs` or `src/a/b/mod.rs` is `a::b`):
//!
//! 1. No circle: no module reaches itself through imports. The crate root is left out of
//!    this one: it may import anything, and rule 2 already reports every import of it.
//! 2. Layers (the table `LAYERS` below): a top-level module imports only from a lower
//!    layer, or from a sibling of its own layer as long as rule 1 holds. Nothing imports the
//!    crate root (`src/lib.rs`), which is the top and may import anything.
//!
//! What counts as an import, an edge from the module of the file it is written in:
//! - `use crate::…` and `use super::…`, `pub use` too, with `{…}` groups expanded;
//! - a path written inline: `crate::a::b::f(…)`, `super::x::Y`, `$crate::…` in a macro;
//! - inside an inline `mod tests { … }`, `super::` means the file's own module, as for rustc.
//!
//! A path goes to the longest module that has a file: `crate::a::b::Item` is `src/a/b.rs` or
//! `src/a/b/mod.rs` when there is one, else `src/a.rs` / `src/a/mod.rs`, else `src/lib.rs`.
//!
//! What it cannot see, being a reader of text and not the compiler:
//! - paths relative to the current module: `self::x::Y`, or `use x::Y` after `mod x;`. A
//!   parent reaching into its own children is no edge here (otherwise every child's
//!   `super::Item` would close a circle with its parent's `mod` and re-exports);
//! - re-exports are not followed: `crate::Item` that `src/lib.rs` re-exports from `config`
//!   counts as an import of the crate root, and is reported as one; likewise a child that
//!   imports `crate::a::Item` which `src/a/mod.rs` re-exports from `a::item` depends on
//!   `a` here, a circle if `a` imports that child by a `crate::` or `super::` path;
//! - paths in strings (serde's `with = "super::f"`), comments and doc links;
//! - `#[path]`, `include!`, modules a macro makes; `cfg` is ignored, so test code counts.
//!
//! `src/main.rs` and `src/bin/` are the binary crate, which reaches the library by its name:
//! they are not in the graph (nothing can import them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

/// The layers of `src/`, lowest first: each top-level module (`src/NAME.rs` or
/// `src/NAME/`) with its layer. A module may import a lower layer, or its own layer when no
/// circle results; never a higher one. A new top-level module goes here, or the test fails.
const LAYERS: &[(&str, u32)] = &[
    // Parsed, validated configuration; imports nothing of sluice.
    ("config", 0),
    // Foundations every plane uses.
    ("metrics", 1),
    ("shutdown", 1), // tokens, cancel, Stopped
    ("stream", 1),
    ("access_log", 2),
    // What a client connection meets first: proxy_protocol, client_hello, tls.
    ("edge", 3),
    // Backends: backend, health, pool, queue, connect, check, balance/.
    ("upstream", 4),
    // The routing table a reload swaps in: mod, diff.
    ("snapshot", 5),
    // The data plane: listener, conn, relay, gate, runtime.
    ("data", 6),
    // The control plane: Server and run (mod.rs), apply, watch, signals, admin, drain, retire.
    ("control", 7),
];

/// A module path: `[]` is the crate root, `["a", "b"]` is `crate::a::b`.
type Module = Vec<String>;

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

/// One import found in a file.
#[derive(Debug, Clone)]
struct Import {
    line: usize,
    /// As written, groups expanded: `use crate::metrics::Metrics`, `crate::tls::files`.
    text: String,
    /// The module whose file holds the target.
    to: Module,
}

/// Checks the tree under `src` against `layers`; each problem is one message.
fn check(src: &Path, layers: &[(&str, u32)]) -> Vec<String> {
    let files = match module_files(src) {
        Ok(files) => files,
        Err(e) => return vec![format!("cannot read {}: {e}", src.display())],
    };
    let modules: BTreeSet<Module> = files.keys().cloned().collect();
    let mut problems = Vec::new();

    // Every import of every file, as an edge between file modules.
    let mut imports: BTreeMap<Module, Vec<Import>> = BTreeMap::new();
    for (module, file) in &files {
        let text = match fs::read_to_string(src.join(file)) {
            Ok(text) => text,
            Err(e) => {
                problems.push(format!("cannot read {}: {e}", shown(file)));
                continue;
            }
        };
        let found = imports_of(&tokens(&text), module, &modules);
        imports.insert(
            module.clone(),
            found.into_iter().filter(|i| &i.to != module).collect(),
        );
    }

    // Rule 2a: every top-level module has a layer.
    let layer_of = |module: &Module| {
        module
            .first()
            .and_then(|top| layers.iter().find(|(n, _)| n == top).map(|(_, l)| *l))
    };
    let mut unknown: BTreeMap<&str, Vec<&PathBuf>> = BTreeMap::new();
    for (module, file) in &files {
        if let Some(top) = module.first()
            && layer_of(module).is_none()
        {
            unknown.entry(top).or_default().push(file);
        }
    }
    for (top, in_files) in &unknown {
        let in_files: Vec<String> = in_files.iter().map(|f| shown(f)).collect();
        problems.push(format!(
            "{}: top-level module `{top}` has no layer: add it to LAYERS at the top of \
             tests/layout.rs (files: {})",
            in_files[0],
            in_files.join(", ")
        ));
    }

    // Rule 2b: no import goes up a layer, and none goes to the crate root.
    for (from, found) in &imports {
        let Some(from_top) = from.first() else {
            continue; // the crate root may import anything
        };
        // One message per (file, target module): its first import, and the other lines.
        let mut by_target: BTreeMap<&Module, Vec<&Import>> = BTreeMap::new();
        for import in found {
            by_target.entry(&import.to).or_default().push(import);
        }
        for (to, found) in by_target {
            let why = match to.first() {
                None => format!(
                    "imports the crate root (src/lib.rs), the top layer, from `{}`: import the \
                     item from the module that defines it",
                    name(from)
                ),
                Some(to_top) if to_top == from_top => continue,
                Some(to_top) => match (layer_of(from), layer_of(to)) {
                    (Some(f), Some(t)) if t > f => format!(
                        "goes up a layer: `{from_top}` is layer {f}, `{to_top}` is layer {t} \
                         (LAYERS in tests/layout.rs)"
                    ),
                    _ => continue, // a lower or the same layer, or unknown (reported above)
                },
            };
            problems.push(format!(
                "{}:{}: `{}` {why}{}",
                shown(&files[from]),
                found[0].line,
                found[0].text,
                also(&found)
            ));
        }
    }

    // Rule 1: no circle. The crate root is left out: it may import anything, and an
    // import of it is reported above, so a circle through it would say nothing new.
    let edges: BTreeMap<&Module, BTreeMap<&Module, Vec<&Import>>> = imports
        .iter()
        .filter(|(from, _)| !from.is_empty())
        .map(|(from, found)| {
            let mut to: BTreeMap<&Module, Vec<&Import>> = BTreeMap::new();
            for import in found.iter().filter(|i| !i.to.is_empty()) {
                to.entry(&import.to).or_default().push(import);
            }
            (from, to)
        })
        .collect();
    // One message for each set of modules that all reach each other, with the shortest
    // circle through each of them: the imports to cut.
    for component in strongly_connected(&edges) {
        let mut circles: Vec<Vec<&Module>> = Vec::new();
        for &start in &component {
            let mut circle = shortest_circle(start, &edges, &component);
            // The same circle found from another of its modules: start at the least.
            let least = (0..circle.len()).min_by_key(|&i| circle[i]).unwrap_or(0);
            circle.rotate_left(least);
            if !circles.contains(&circle) {
                circles.push(circle);
            }
        }
        let names = |c: &[&Module]| c.iter().map(|m| name(m)).collect::<Vec<_>>();
        let mut text = if circles.len() == 1 {
            String::from("circle: ")
        } else {
            format!(
                "circles among {} (each reaches all the others):\n  ",
                names(&component).join(", ")
            )
        };
        for (k, circle) in circles.iter().enumerate() {
            if k > 0 {
                text.push_str("\n  ");
            }
            text.push_str(&format!(
                "{} -> {}",
                names(circle).join(" -> "),
                name(circle[0])
            ));
            for (i, from) in circle.iter().enumerate() {
                let to = circle[(i + 1) % circle.len()];
                let found = &edges[from][&to];
                text.push_str(&format!(
                    "\n    {}:{}: `{}`{}",
                    shown(&files[*from]),
                    found[0].line,
                    found[0].text,
                    also(found)
                ));
            }
        }
        // The imports inside the set that no circle above shows: a circle may run
        // through them too.
        let mut rest = Vec::new();
        for &from in &component {
            for (&to, found) in &edges[from] {
                let shown_above = circles
                    .iter()
                    .any(|c| (0..c.len()).any(|i| c[i] == from && c[(i + 1) % c.len()] == to));
                if component.contains(&to) && !shown_above {
                    rest.push(format!(
                        "\n    {}:{}: `{}`{} ({} -> {})",
                        shown(&files[from]),
                        found[0].line,
                        found[0].text,
                        also(found),
                        name(from),
                        name(to)
                    ));
                }
            }
        }
        if !rest.is_empty() {
            text.push_str("\n  and the other imports between them:");
            text.push_str(&rest.concat());
        }
        problems.push(text);
    }
    problems
}

/// " (also lines 4, 9)": the other lines of a file that import the same module as found[0].
fn also(found: &[&Import]) -> String {
    let mut lines: Vec<String> = Vec::new();
    for import in &found[1..] {
        let line = import.line.to_string();
        if import.line != found[0].line && !lines.contains(&line) {
            lines.push(line);
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    format!(
        " (also line{} {})",
        if lines.len() > 1 { "s" } else { "" },
        lines.join(", ")
    )
}

fn shown(file: &Path) -> String {
    Path::new("src").join(file).display().to_string()
}

/// Every library file under `src`, by module; paths relative to `src`.
fn module_files(src: &Path) -> std::io::Result<BTreeMap<Module, PathBuf>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(src.join(&dir))? {
            let entry = entry?;
            let rel = dir.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                if rel != Path::new("bin") {
                    dirs.push(rel);
                }
                continue;
            }
            if rel.extension().is_none_or(|e| e != "rs") || rel == Path::new("main.rs") {
                continue;
            }
            let mut module: Module = dir
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let stem = rel
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !(stem == "mod" || rel == Path::new("lib.rs")) {
                module.push(stem);
            }
            files.insert(module, rel);
        }
    }
    Ok(files)
}

/// A token of Rust source; comments, strings, characters, numbers and lifetimes are dropped.
#[derive(Debug)]
struct Token {
    text: String,
    ident: bool,
    line: usize,
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_char(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

fn tokens(text: &str) -> Vec<Token> {
    let c: Vec<char> = text.chars().collect();
    let at = |i: usize| c.get(i).copied();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    // Skips a "…" string whose opening quote is just before `i`.
    let string = |mut i: usize, line: &mut usize| {
        while i < c.len() {
            match c[i] {
                '\\' => {
                    // An escape; a backslash at the end of a line continues the string.
                    if c.get(i + 1) == Some(&'\n') {
                        *line += 1;
                    }
                    i += 1;
                }
                '"' => return i + 1,
                '\n' => *line += 1,
                _ => {}
            }
            i += 1;
        }
        i
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() || ch == '$' {
            // `$crate::x` in a macro reads as `crate::x`.
            i += 1;
        } else if ch == '/' && at(i + 1) == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == Some('*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == Some('/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = string(i + 1, &mut line);
        } else if ch == '\'' {
            if at(i + 1) == Some('\\') {
                // '\n', '\'', '\u{…}'
                i += 3;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == Some('\'') {
                i += 3; // 'x'
            } else {
                i += 1; // a lifetime or label: 'a
                while i < c.len() && is_ident_char(c[i]) {
                    i += 1;
                }
            }
        } else if ch.is_ascii_digit() {
            while i < c.len()
                && (is_ident_char(c[i])
                    || (c[i] == '.' && at(i + 1).is_some_and(|d| d.is_ascii_digit())))
            {
                i += 1;
            }
        } else if is_ident_start(ch) {
            let start = i;
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            match (word.as_str(), at(i)) {
                ("r" | "br" | "cr", Some('"' | '#')) => {
                    let mut j = i;
                    while at(j) == Some('#') {
                        j += 1;
                    }
                    let hashes = j - i;
                    if at(j) == Some('"') {
                        // A raw string: up to '"' and as many '#'.
                        j += 1;
                        while j < c.len() {
                            if c[j] == '\n' {
                                line += 1;
                            }
                            if c[j] == '"' && (1..=hashes).all(|k| at(j + k) == Some('#')) {
                                j += 1 + hashes;
                                break;
                            }
                            j += 1;
                        }
                        i = j;
                    } else if word == "r" && hashes == 1 {
                        // A raw identifier: r#type.
                        let start = j;
                        while j < c.len() && is_ident_char(c[j]) {
                            j += 1;
                        }
                        out.push(Token {
                            text: c[start..j].iter().collect(),
                            ident: true,
                            line,
                        });
                        i = j;
                    } else {
                        out.push(Token {
                            text: word,
                            ident: true,
                            line,
                        });
                    }
                }
                ("b" | "c", Some('"')) => i = string(i + 1, &mut line),
                ("b", Some('\'')) => {} // b'x': the quote is read next, as a character
                _ => out.push(Token {
                    text: word,
                    ident: true,
                    line,
                }),
            }
        } else if ch == ':' && at(i + 1) == Some(':') {
            out.push(Token {
                text: "::".to_owned(),
                ident: false,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                text: ch.to_string(),
                ident: false,
                line,
            });
            i += 1;
        }
    }
    out
}

/// The imports in one file's tokens; `module` is the file's module.
fn imports_of(t: &[Token], module: &[String], modules: &BTreeSet<Module>) -> Vec<Import> {
    let text = |i: usize| t.get(i).map_or("", |t| t.text.as_str());
    let mut found = Vec::new();
    let mut add = |path: &[String], line: usize, shown: String, current: &[String]| {
        if let Some(target) = absolute(path, current) {
            // The longest prefix that is a file module; the root at worst.
            let to = (0..=target.len())
                .rev()
                .map(|k| target[..k].to_vec())
                .find(|m| modules.contains(m))
                .unwrap_or_default();
            found.push(Import {
                line,
                text: shown,
                to,
            });
        }
    };
    // The module a token is in: the file's, plus the inline `mod x { … }` it is inside.
    let mut current: Module = module.to_vec();
    let mut inline: Vec<usize> = Vec::new(); // brace depth of each inline module's body
    let mut depth = 0;
    let mut i = 0;
    while i < t.len() {
        match text(i) {
            "{" => depth += 1,
            "}" => {
                if inline.last() == Some(&depth) {
                    inline.pop();
                    current.pop();
                }
                depth -= 1;
            }
            "mod" if t.get(i + 1).is_some_and(|t| t.ident) && text(i + 2) == "{" => {
                current.push(text(i + 1).to_owned());
                inline.push(depth + 1);
                i += 2;
                continue;
            }
            "use" if t[i].ident && text(i + 1) != "<" => {
                let mut leaves = Vec::new();
                if let Some(end) = use_tree(t, i + 1, &mut Vec::new(), &mut leaves) {
                    for (path, line) in leaves {
                        // `use crate::a::{self, B}` shows `use crate::a` for its `self`.
                        let written = match path.split_last() {
                            Some((last, init)) if last == "self" => init,
                            _ => &path[..],
                        };
                        let shown = format!("use {}", written.join("::"));
                        add(&path, line, shown, &current);
                    }
                    i = end;
                    continue;
                }
            }
            // An inline path, not the tail of a longer one nor `pub(in crate::x)`.
            "crate" | "super"
                if text(i + 1) == "::" && !matches!(text(i.wrapping_sub(1)), "::" | "in") =>
            {
                let mut path = vec![text(i).to_owned()];
                let mut j = i + 1;
                while text(j) == "::" && t.get(j + 1).is_some_and(|t| t.ident) {
                    path.push(text(j + 1).to_owned());
                    j += 2;
                }
                add(&path, t[i].line, path.join("::"), &current);
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// Reads one use tree from `t[i]`, pushing each leaf path (after `prefix`) with the line
/// it starts on. Returns the index after the tree, or None on what it cannot read.
fn use_tree(
    t: &[Token],
    mut i: usize,
    prefix: &mut Vec<String>,
    leaves: &mut Vec<(Vec<String>, usize)>,
) -> Option<usize> {
    let base = prefix.len();
    let line = t.get(i)?.line;
    if t[i].text == "::" {
        prefix.push(String::new()); // `::std::…`: another crate
        i += 1;
    }
    loop {
        let token = t.get(i)?;
        if token.text == "{" {
            i += 1;
            loop {
                if t.get(i)?.text == "}" {
                    i += 1;
                    break;
                }
                i = use_tree(t, i, prefix, leaves)?;
                match t.get(i)?.text.as_str() {
                    "," => i += 1,
                    "}" => {
                        i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
            break;
        }
        if token.text == "*" {
            let mut glob = prefix.clone();
            glob.push("*".to_owned());
            leaves.push((glob, line));
            i += 1;
            break;
        }
        if !token.ident {
            return None;
        }
        prefix.push(token.text.clone());
        i += 1;
        if t.get(i).is_some_and(|t| t.text == "::") {
            i += 1;
            continue;
        }
        if t.get(i).is_some_and(|t| t.text == "as") {
            i += 2;
        }
        leaves.push((prefix.clone(), line));
        break;
    }
    prefix.truncate(base);
    Some(i)
}

/// `crate::…` and `super::…` as a path from the crate root; None for any other path.
fn absolute(path: &[String], current: &[String]) -> Option<Module> {
    let (mut target, rest) = match path.first()?.as_str() {
        "crate" => (Vec::new(), &path[1..]),
        "super" => {
            let up = path.iter().take_while(|s| *s == "super").count();
            (
                current[..current.len().checked_sub(up)?].to_vec(),
                &path[up..],
            )
        }
        _ => return None,
    };
    target.extend(
        rest.iter()
            .filter(|s| !matches!(s.as_str(), "self" | "*"))
            .cloned(),
    );
    Some(target)
}

/// The sets of two or more modules that all reach each other (Tarjan), each sorted.
fn strongly_connected<'a, V>(
    edges: &BTreeMap<&'a Module, BTreeMap<&'a Module, V>>,
) -> Vec<Vec<&'a Module>> {
    struct State<'a> {
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<&'a Module>>,
    }
    fn visit<'a, V>(
        v: &'a Module,
        edges: &BTreeMap<&'a Module, BTreeMap<&'a Module, V>>,
        s: &mut State<'a>,
    ) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in edges.get(v).into_iter().flat_map(|to| to.keys()) {
            if !s.index.contains_key(w) {
                visit(w, edges, s);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w);
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for &v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(v, edges, &mut s);
        }
    }
    s.found.sort();
    s.found
}

/// A shortest circle from `start` back to it, within `component`.
fn shortest_circle<'a, V>(
    start: &'a Module,
    edges: &BTreeMap<&'a Module, BTreeMap<&'a Module, V>>,
    component: &[&'a Module],
) -> Vec<&'a Module> {
    let mut came_from: BTreeMap<&Module, &Module> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &w in edges.get(v).into_iter().flat_map(|to| to.keys()) {
            if !component.contains(&w) {
                continue;
            }
            if w == start {
                let mut circle = vec![v];
                while let Some(&p) = came_from.get(circle[circle.len() - 1]) {
                    circle.push(p);
                }
                circle.reverse();
                return circle;
            }
            if !came_from.contains_key(w) && w != start {
                came_from.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    vec![start] // not reached: every member of a component lies on a circle
}

#[test]
fn src_keeps_its_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = check(&src, LAYERS);
    assert!(
        problems.is_empty(),
        "src/ breaks its layout ({} problems; the layers are LAYERS at the top of \
         tests/layout.rs):\n\n{}\n",
        problems.len(),
        problems.join("\n\n")
    );
}

// The checker itself, on small trees written to a temporary directory.

const TEST_LAYERS: &[(&str, u32)] = &[("base", 0), ("left", 1), ("right", 1), ("top", 2)];

/// Writes `files` (path under src/, text) and checks them against TEST_LAYERS.
fn check_tree(files: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let path = dir.path().join("src").join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    check(&dir.path().join("src"), TEST_LAYERS)
}

const LIB: (&str, &str) = (
    "lib.rs",
    "pub mod base;\npub mod left;\npub mod right;\npub mod top;\nuse crate::top::run;\n",
);

#[test]
fn a_clean_tree_passes() {
    let problems = check_tree(&[
        LIB,
        (
            "main.rs",
            "use crate::whatever::x;\nfn main() { sluice::top::run(); }\n",
        ),
        ("base.rs", "pub struct Config;\n"),
        (
            "left.rs",
            "use crate::base::Config;\n// use crate::top::run; in a comment is no import\n\
             const S: &str = \"crate::top::run\";\npub fn f() -> char { '\"' }\n\
             /* crate::top /* nested */ crate::top */ const R: &str = r#\"\"crate::top\"\"#;\n\
             pub(in crate::left) fn g<'a>(x: &'a str) -> &'a str { let _ = b'\\''; x }\n",
        ),
        // Its own layer's sibling, with no circle.
        ("right.rs", "use crate::{base::Config, left::f};\n"),
        ("top/mod.rs", "mod parts;\npub use parts::run;\n"),
        (
            "top/parts.rs",
            "use super::super::right;\npub fn run() { crate::left::f(); }\n\
             #[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::parts::run;\n}\n",
        ),
    ]);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_circle_is_caught() {
    let problems = check_tree(&[
        LIB,
        ("base.rs", ""),
        // Same layer: allowed one way, not both.
        (
            "left.rs",
            "use crate::{\n    base,\n    right::g,\n};\npub fn f() {}\n",
        ),
        (
            "right.rs",
            "pub fn g() {}\nfn h() {\n    crate::left::f();\n}\n",
        ),
        ("top.rs", "pub fn run() {}\n"),
    ]);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    let p = &problems[0];
    assert!(p.starts_with("circle: left -> right -> left"), "{p}");
    assert!(p.contains("src/left.rs:3: `use crate::right::g`"), "{p}");
    assert!(p.contains("src/right.rs:3: `crate::left::f`"), "{p}");
}

#[test]
fn a_circle_inside_one_module_is_caught() {
    let problems = check_tree(&[
        LIB,
        ("base.rs", ""),
        ("left.rs", ""),
        ("right.rs", ""),
        ("top/mod.rs", "mod a;\nmod b;\npub fn run() {}\n"),
        ("top/a.rs", "use super::b::B;\npub struct A;\n"),
        (
            "top/b.rs",
            "pub struct B;\nfn f() -> crate::top::a::A { todo!() }\n",
        ),
    ]);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with("circle: top::a -> top::b -> top::a"),
        "{problems:#?}"
    );
}

#[test]
fn an_upward_import_is_caught() {
    let problems = check_tree(&[
        LIB,
        (
            "base.rs",
            // Lines counted through a raw string and a block comment of several lines.
            "pub struct Config;\nconst R: &str = r#\"\n\"crate::top\"\n\"#; /* a\n*/\n\
             fn f() {\n    let _ = crate::top::run();\n}\nmacro_rules! m { () => { $crate::top::run() } }\n",
        ),
        ("left/mod.rs", "mod inner;\n"),
        // The longest module with a file: left::inner, not left.
        ("left/inner.rs", "pub fn f() { crate::right::deep::g(); }\n"),
        (
            "right.rs",
            "pub mod deep { pub fn g() {} }\nuse crate::left::inner::f;\n",
        ),
        ("top.rs", "pub fn run() {}\n"),
    ]);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    let text = problems.join("\n");
    assert!(
        text.contains(
            "src/base.rs:7: `crate::top::run` goes up a layer: `base` is layer 0, `top` is layer 2"
        ),
        "{text}"
    );
    assert!(text.contains("(also line 9)"), "{text}");
    assert!(
        text.contains("circle: left::inner -> right -> left::inner"),
        "{text}"
    );
}

#[test]
fn importing_the_crate_root_is_caught() {
    let problems = check_tree(&[
        LIB,
        ("base.rs", "fn f() -> Result<(), crate::Error> { Ok(()) }\n"),
        ("left.rs", ""),
        ("right.rs", ""),
        ("top.rs", "pub fn run() {}\n"),
    ]);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with("src/base.rs:1: `crate::Error` imports the crate root"),
        "{problems:#?}"
    );
}

#[test]
fn an_unknown_top_level_module_is_named() {
    let problems = check_tree(&[LIB, ("base.rs", ""), ("extra/mod.rs", "")]);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with(
            "src/extra/mod.rs: top-level module `extra` has no layer: add it to LAYERS"
        ),
        "{problems:#?}"
    );
}
