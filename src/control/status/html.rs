//! The status page as HTML: one self-contained document (inline style and script, no
//! other request but its own refresh), readable without JavaScript.
//!
//! Rendering goes through an askama template, which HTML-escapes every value it prints;
//! only the two constants below (the style and the script) are printed unescaped. Names
//! come from a config and error texts from a file or a backend's reply, so any of them
//! may be hostile.
//!
//! The refresh: with JavaScript on, the inline script fetches this same page every
//! [`super::REFRESH`] and swaps in its `#report` element (parsed with `DOMParser`, so
//! it is inert markup that the server escaped, never JSON turned into HTML by hand).
//! One renderer, in Rust, serves both the first load and every refresh.
//!
//! Tables are built from column lists: a column is one entry in `LISTENER_COLUMNS` or
//! `BACKEND_COLUMNS` (a header and how to show a row's field).

use std::sync::LazyLock;
use std::time::{Duration, UNIX_EPOCH};

use askama::Template;

use super::{BackendRow, ListenerRow, Report, UpstreamRow};
use crate::control::outcome::LoadResult;

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1a1a1a;background:#fff}
h1{font-size:1.4em;margin:0 0 .4em}h2{font-size:1.15em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.3em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
.bad{background:#fde2e1;color:#8a1010;font-weight:bold}
.ok{background:#e3f5e1;color:#14521c}
.summary{padding:.6em .9em;border:2px solid;margin:.6em 0 1em}
.summary.bad{border-color:#c62828}.summary.ok{border-color:#2e7d32}
.summary ul{margin:.3em 0 0;padding-left:1.2em}
pre{white-space:pre-wrap;margin:.2em 0;font-size:.95em}
dl{display:grid;grid-template-columns:max-content auto;gap:.15em 1em;margin:.3em 0}
dt{font-weight:bold}dd{margin:0}
.muted{color:#666}
"#;

const SCRIPT: &str = r#"
(function(){
  var every = Number(document.body.dataset.refreshMs) || 2000;
  var state = document.getElementById('live');
  var refreshes = 0;
  function refresh(){
    fetch(location.pathname, {cache: 'no-store', credentials: 'same-origin'})
      .then(function(r){ if (!r.ok) throw new Error('HTTP ' + r.status); return r.text(); })
      .then(function(text){
        var fresh = new DOMParser().parseFromString(text, 'text/html').getElementById('report');
        if (!fresh) throw new Error('no report in the page');
        document.getElementById('report').replaceWith(document.adoptNode(fresh));
        refreshes += 1;
        document.body.dataset.refreshes = String(refreshes);
        state.className = 'muted';
        state.textContent = 'live: refreshed every ' + every / 1000 + ' s, last at ' + new Date().toLocaleTimeString();
      })
      .catch(function(e){
        state.className = 'bad';
        state.textContent = 'STALE: refresh failed (' + e.message + '); retrying';
      })
      .finally(function(){ setTimeout(refresh, every); });
  }
  state.textContent = 'live: refreshed every ' + every / 1000 + ' s';
  setTimeout(refresh, every);
})();
"#;

/// The page's Content-Security-Policy: nothing may be fetched but this origin's own
/// refresh, and only this page's own style and script run (by their hashes).
pub static CONTENT_SECURITY_POLICY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
         img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(SCRIPT),
        hash(STYLE)
    )
});

/// A CSP source for an inline block: `sha256-` and the base64 of its digest.
fn hash(block: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, block.as_bytes());
    format!("sha256-{}", data_encoding::BASE64.encode(digest.as_ref()))
}

/// One table cell: its text (escaped when rendered) and whether it shows a problem.
/// A problem's text carries its own marker word (DOWN, FULL, ...), so the colour is
/// never the only sign.
struct Cell {
    text: String,
    class: &'static str,
}

impl Cell {
    fn text(text: impl ToString) -> Cell {
        Cell {
            text: text.to_string(),
            class: "",
        }
    }

    fn number(n: impl ToString) -> Cell {
        Cell {
            text: n.to_string(),
            class: "n",
        }
    }

    fn flagged(text: impl ToString, bad: bool) -> Cell {
        Cell {
            text: text.to_string(),
            class: if bad { "bad" } else { "" },
        }
    }
}

/// A column: its header and how a row shows in it.
type Column<R> = (&'static str, fn(&R, f64) -> Cell);

const LISTENER_COLUMNS: &[Column<ListenerRow>] = &[
    ("listener", |l, _| Cell::text(&l.name)),
    ("addresses", |l, _| {
        Cell::text(
            l.addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" "),
        )
    }),
    ("mode", |l, _| {
        Cell::text(match l.proxy_protocol {
            true => format!("{} + PROXY protocol", l.mode),
            false => l.mode.to_string(),
        })
    }),
    ("upstream", |l, _| {
        Cell::text(l.upstream.as_deref().unwrap_or("(by SNI)"))
    }),
    ("active / max", |l, _| {
        let text = format!("{} / {}", l.active, l.max_connections);
        Cell::flagged(if l.full { format!("FULL {text}") } else { text }, l.full)
    }),
    ("accepted", |l, _| Cell::number(l.accepted)),
    ("rejected", |l, _| Cell::flagged(counts(&l.rejected), false)),
    ("bytes in / out", |l, _| {
        Cell::number(format!("{} / {}", bytes(l.bytes_in), bytes(l.bytes_out)))
    }),
    ("accept queue", |l, _| {
        let text = format!("{} / {}", l.accept_queue, l.accept_queue_limit);
        let waiting = l.accept_queue > 0;
        Cell::flagged(
            if waiting {
                format!("WAITING {text}")
            } else {
                text
            },
            waiting,
        )
    }),
];

const BACKEND_COLUMNS: &[Column<BackendRow>] = &[
    ("backend", |b, _| Cell::text(b.address)),
    ("state", |b, now| {
        let since = ago(now, b.since);
        match b.state {
            "up" => Cell {
                text: format!("UP for {since}"),
                class: "ok",
            },
            "down" => Cell::flagged(format!("DOWN for {since}"), true),
            "ejected" => Cell::flagged(
                format!(
                    "EJECTED for {} more",
                    duration(b.ejected_for_seconds.unwrap_or(0.0))
                ),
                true,
            ),
            other => Cell::text(other.replace('_', " ")),
        }
    }),
    ("admin", |b, _| match b.admin_state {
        "ready" => Cell::text("ready"),
        other => Cell::flagged(other.to_uppercase(), true),
    }),
    ("weight", |b, _| {
        let weight = match b.weight_override {
            Some(w) => format!("{w} (set by ctl; config {})", b.configured_weight),
            None => b.weight.to_string(),
        };
        Cell::number(if b.effective_weight < f64::from(b.weight) {
            format!("{weight}, slow start: {:.2} now", b.effective_weight)
        } else {
            weight
        })
    }),
    ("active / limit", |b, _| {
        Cell::number(match b.limit {
            Some(l) => format!("{} / {l}", b.active),
            None => format!("{} / -", b.active),
        })
    }),
    ("bytes in / out (ended)", |b, _| {
        Cell::number(format!("{} / {}", bytes(b.bytes_in), bytes(b.bytes_out)))
    }),
    ("connect errors", |b, _| {
        Cell::flagged(counts(&b.connect_errors), b.consecutive_failures > 0)
    }),
    ("last check", |b, now| match &b.last_check {
        None => Cell::text("-"),
        Some(c) => {
            let when = ago(now, c.at);
            match &c.error {
                None => Cell::text(format!("{} {when} ago", c.result)),
                Some(e) => {
                    Cell::flagged(format!("{} {when} ago: {e}", c.result.to_uppercase()), true)
                }
            }
        }
    }),
];

struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

fn table<R>(columns: &[Column<R>], rows: &[R], now: f64) -> Table {
    Table {
        headers: columns.iter().map(|(h, _)| *h).collect(),
        rows: rows
            .iter()
            .map(|r| columns.iter().map(|(_, cell)| cell(r, now)).collect())
            .collect(),
    }
}

/// One upstream as the page shows it.
struct UpstreamView<'a> {
    u: &'a UpstreamRow,
    queue: Option<Cell>,
    /// Rendered (and escaped) by [`TableHtml`].
    backends: String,
}

#[derive(Template)]
#[template(
    ext = "html",
    source = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{% if r.problems.is_empty() %}OK{% else %}{{ r.problems.len() }} PROBLEM(S){% endif %} - sluice status</title>
<style>{{ style|safe }}</style>
</head>
<body data-refresh-ms="{{ refresh_ms }}" data-refreshes="0">
<h1>sluice status</h1>
<p id="live" class="muted">JavaScript is off: reload the page to refresh it. The same data as JSON: <a href="/status.json">/status.json</a>.</p>
<div id="report">
{% if r.problems.is_empty() %}
<div class="summary ok" id="summary"><strong>OK</strong>: every listener and backend is in service, the last config load applied.</div>
{% else %}
<div class="summary bad" id="summary"><strong>{{ r.problems.len() }} PROBLEM(S)</strong>
<ul>{% for p in r.problems %}<li>{{ p }}</li>{% endfor %}</ul></div>
{% endif %}
<dl>
<dt>version</dt><dd>{{ r.version }} ({{ r.build.target }}, {{ r.build.profile }} build)</dd>
<dt>uptime</dt><dd>{{ uptime }} (since {{ started }})</dd>
<dt>state</dt><dd>{% if r.draining %}<span class="bad">DRAINING</span>{% else if r.ready %}ready{% else %}<span class="bad">NOT READY</span>{% endif %}</dd>
<dt>config</dt><dd>{{ r.config_file }}, generation {{ r.generation }}</dd>
<dt>last reload</dt><dd id="last-reload">{{ reload_when }}, {{ reload_cause }}: {% if let Some(error) = reload_error %}<span class="bad">FAILED</span>, generation {{ r.generation }} still runs<pre class="bad">{{ error }}</pre>{% else %}{{ reload_result }}{% endif %}</dd>
<dt>connections</dt><dd>{{ r.process.connections }} open of the process cap {{ r.process.max_connections }}</dd>
<dt>open files</dt><dd>{{ open_files }}</dd>
</dl>
<h2>Listeners</h2>
{{ listeners|safe }}
{% for v in upstreams %}
<h2>Upstream {{ v.u.name }}</h2>
<p>{{ v.u.balance }}; {{ v.u.available }} of {{ v.u.backends.len() }} backend(s) taking connections;
{% if v.u.health_checks %}active health checks{% else %}no active health checks{% endif %}{% if let Some(q) = v.queue %};
<span class="{{ q.class }}">{{ q.text }}</span>{% endif %}</p>
{{ v.backends|safe }}
{% endfor %}
<p class="muted">Generated at {{ now }}. Read-only: runtime changes go through the config file.</p>
</div>
<script>{{ script|safe }}</script>
</body>
</html>
"#
)]
struct Page<'a> {
    r: &'a Report,
    style: &'static str,
    script: &'static str,
    refresh_ms: u128,
    uptime: String,
    started: String,
    now: String,
    reload_when: String,
    reload_cause: String,
    reload_result: String,
    reload_error: Option<&'a str>,
    open_files: String,
    /// Tables, rendered (and escaped) by [`TableHtml`].
    listeners: String,
    upstreams: Vec<UpstreamView<'a>>,
}

/// A table through its own template, so its cells are escaped as the page's are.
#[derive(Template)]
#[template(
    ext = "html",
    source = r#"<table>
<thead><tr>{% for h in t.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in t.rows %}
<tr>{% for c in row %}<td class="{{ c.class }}">{{ c.text }}</td>{% endfor %}</tr>{% endfor %}
</tbody>
</table>"#
)]
struct TableHtml<'a> {
    t: &'a Table,
}

/// The page for `r`.
pub fn render(r: &Report) -> String {
    let now = r.now;
    let upstreams = r
        .upstreams
        .iter()
        .map(|u| UpstreamView {
            u,
            queue: u.queue.as_ref().map(|q| {
                let oldest = q.oldest_wait_seconds.map_or(String::new(), |s| {
                    format!(", the oldest for {}", duration(s))
                });
                let text = format!(
                    "queue {} of {} (timeout {}){oldest}",
                    q.length,
                    q.max,
                    duration(q.timeout_seconds)
                );
                match (q.length, q.growing) {
                    (0, _) => Cell::text(text),
                    (_, true) => Cell::flagged(format!("QUEUE GROWING: {text}"), true),
                    (_, false) => Cell::flagged(format!("QUEUED: {text}"), true),
                }
            }),
            backends: html(&TableHtml {
                t: &table(BACKEND_COLUMNS, &u.backends, now),
            }),
        })
        .collect();
    let load = &r.last_reload;
    let (reload_result, reload_error) = match &load.result {
        LoadResult::Applied {
            generation,
            changes,
        } => (
            format!("applied as generation {generation} ({changes})"),
            None,
        ),
        LoadResult::Unchanged { generation } => (
            format!("nothing to apply, generation {generation} stays"),
            None,
        ),
        LoadResult::Failed { error, .. } => (String::new(), Some(error.as_str())),
    };
    let page = Page {
        r,
        style: STYLE,
        script: SCRIPT,
        refresh_ms: super::REFRESH.as_millis(),
        uptime: duration(r.uptime_seconds as f64),
        started: time(r.started_at),
        now: time(now),
        reload_when: format!("{} ({} ago)", time(load.at), ago(now, load.at)),
        reload_cause: match load.cause {
            crate::control::outcome::Cause::Start => "at start".to_string(),
            crate::control::outcome::Cause::File => "the file changed".to_string(),
            crate::control::outcome::Cause::Signal => "SIGHUP".to_string(),
            crate::control::outcome::Cause::Ctl => "sluice ctl".to_string(),
        },
        reload_result,
        reload_error,
        open_files: match r.process.open_files_limit {
            Some(l) => format!("limit {l} (each proxied connection takes 2)"),
            None => "limit unknown".to_string(),
        },
        listeners: html(&TableHtml {
            t: &table(LISTENER_COLUMNS, &r.listeners, now),
        }),
        upstreams,
    };
    html(&page)
}

fn html(t: &impl Template) -> String {
    // Rendering into a String fails only if a Display impl fails, which ours do not.
    t.render()
        .unwrap_or_else(|e| format!("<!DOCTYPE html><p>cannot render the status page: {e}"))
}

/// Non-zero counts as `reason n, reason n`; `0` when all are zero.
fn counts(by: &std::collections::BTreeMap<&'static str, u64>) -> String {
    let nonzero: Vec<String> = by
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    match nonzero.is_empty() {
        true => "0".to_string(),
        false => nonzero.join(", "),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", UNITS[unit]),
    }
}

/// Whole seconds, as humantime writes them ("1h 2m 3s"); "0s" under a second.
fn duration(seconds: f64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0.0) as u64)).to_string()
}

fn ago(now: f64, then: f64) -> String {
    duration(now - then)
}

/// Unix seconds as UTC RFC 3339, to the second.
fn time(unix: f64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs_f64(unix.max(0.0));
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_escaped_and_hashes_match_the_blocks() {
        let t = Table {
            headers: vec!["<h>"],
            rows: vec![vec![Cell::text("<script>alert(1)</script>&\"'")]],
        };
        let out = html(&TableHtml { t: &t });
        assert!(!out.contains("<script>"), "{out}");
        assert!(!out.contains("<h>"), "{out}");
        assert!(
            out.contains("&#60;script&#62;alert(1)&#60;/script&#62;&#38;&#34;&#39;"),
            "{out}"
        );
        let csp = &*CONTENT_SECURITY_POLICY;
        assert!(
            csp.contains(&hash(SCRIPT)) && csp.contains(&hash(STYLE)),
            "{csp}"
        );
        assert!(csp.starts_with("default-src 'none'"));
    }

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(duration(3723.4), "1h 2m 3s");
        assert_eq!(time(0.0), "1970-01-01T00:00:00Z");
    }
}
