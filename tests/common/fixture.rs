//! One builder for the config files the tests run sluice on, so that a test says what
//! differs from the usual (a listener `front` bound on 127.0.0.1:0 in front of an
//! upstream `app`) and nothing else.
//!
//! ```ignore
//! Fixture::front(&[a.addr, b.addr]).upstream_keys("retries = 1")
//! Fixture::new()
//!     .set("drain_timeout = \"1s\"")
//!     .listener("one").listener("two")
//!     .upstream("app").weighted(&[(a.addr, 3), (b.addr, 1)])
//! ```
//!
//! Every fixture binds the admin endpoint on 127.0.0.1:0, where the harness asks it
//! for the listeners' addresses. Key lines are TOML as the file would have them; the
//! builder only places them in the right table.

use std::fmt;
use std::net::SocketAddr;

/// A config file, built up table by table; its text is [`Fixture::toml`] (or `Display`).
#[derive(Clone, Debug)]
pub struct Fixture {
    /// Top-level keys, such as `drain_timeout`: they must precede every table.
    top: Vec<String>,
    admin: String,
    /// Whole top-level tables, such as `[relay]` or `[access_log]`, as written.
    tables: Vec<String>,
    listeners: Vec<Listener>,
    upstreams: Vec<Upstream>,
}

#[derive(Clone, Debug)]
struct Listener {
    name: String,
    bind: Vec<String>,
    /// `None`: the first upstream, unless the listener has routes.
    upstream: Option<String>,
    keys: Vec<String>,
    /// Sub-tables such as `[listener.tls]`, as (name, body).
    tables: Vec<(String, String)>,
    /// `[[listener.route]]`: server names and their upstream.
    routes: Vec<(Vec<String>, String)>,
}

#[derive(Clone, Debug)]
struct Upstream {
    name: String,
    keys: Vec<String>,
    tables: Vec<(String, String)>,
    backends: Vec<(SocketAddr, Option<u32>)>,
}

impl Default for Fixture {
    fn default() -> Fixture {
        Fixture::new()
    }
}

impl Fixture {
    /// No listener and no upstream yet: an invalid config until they are added.
    pub fn new() -> Fixture {
        Fixture {
            top: Vec::new(),
            admin: "127.0.0.1:0".to_string(),
            tables: Vec::new(),
            listeners: Vec::new(),
            upstreams: Vec::new(),
        }
    }

    /// The usual: listener `front` in front of upstream `app` with `backends`.
    pub fn front(backends: &[SocketAddr]) -> Fixture {
        Fixture::new()
            .listener("front")
            .upstream("app")
            .backends(backends)
    }

    /// [`Fixture::front`] with weighted backends.
    pub fn front_weighted(backends: &[(SocketAddr, u32)]) -> Fixture {
        Fixture::front(&[]).weighted(backends)
    }

    /// A top-level key line, such as `drain_timeout = "60s"`.
    pub fn set(mut self, line: &str) -> Fixture {
        self.top.push(line.to_string());
        self
    }

    /// The admin endpoint's address (127.0.0.1:0 unless changed here).
    pub fn admin(mut self, bind: &str) -> Fixture {
        self.admin = bind.to_string();
        self
    }

    /// A whole top-level table as written, such as `"[relay]\nsplice = true"`; an empty
    /// text adds nothing.
    pub fn table(mut self, text: &str) -> Fixture {
        if !text.trim().is_empty() {
            self.tables.push(text.trim_end().to_string());
        }
        self
    }

    /// A listener named `name` on 127.0.0.1:0, in front of the first upstream unless
    /// [`Fixture::to`] or routes say otherwise. The `listener_*` methods apply to it.
    pub fn listener(mut self, name: &str) -> Fixture {
        self.listeners.push(Listener {
            name: name.to_string(),
            bind: vec!["127.0.0.1:0".to_string()],
            upstream: None,
            keys: Vec::new(),
            tables: Vec::new(),
            routes: Vec::new(),
        });
        self
    }

    /// The last listener's default upstream.
    pub fn to(mut self, upstream: &str) -> Fixture {
        self.last_listener().upstream = Some(upstream.to_string());
        self
    }

    /// The last listener's addresses, in place of 127.0.0.1:0.
    pub fn bind(mut self, addresses: &[&str]) -> Fixture {
        self.last_listener().bind = addresses.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Key lines of the last listener, such as `max_connections = 2`.
    pub fn listener_keys(mut self, lines: &str) -> Fixture {
        self.last_listener().keys.push(lines.to_string());
        self
    }

    /// A table inside the last listener: `listener_table("tls", "certificates = ...")`
    /// writes `[listener.tls]`.
    pub fn listener_table(mut self, name: &str, body: &str) -> Fixture {
        let table = (name.to_string(), body.to_string());
        self.last_listener().tables.push(table);
        self
    }

    /// A `[[listener.route]]` of the last listener: clients naming one of `sni` go to
    /// `upstream`.
    pub fn route(mut self, sni: &[&str], upstream: &str) -> Fixture {
        let names = sni.iter().map(|n| n.to_string()).collect();
        self.last_listener()
            .routes
            .push((names, upstream.to_string()));
        self
    }

    /// An upstream named `name`; the `upstream_*` and backend methods apply to it.
    pub fn upstream(mut self, name: &str) -> Fixture {
        self.upstreams.push(Upstream {
            name: name.to_string(),
            keys: Vec::new(),
            tables: Vec::new(),
            backends: Vec::new(),
        });
        self
    }

    /// Key lines of the last upstream, such as `retries = 1`.
    pub fn upstream_keys(mut self, lines: &str) -> Fixture {
        self.last_upstream().keys.push(lines.to_string());
        self
    }

    /// A table inside the last upstream: `upstream_table("tls", "ca = ...")` writes
    /// `[upstream.tls]`.
    pub fn upstream_table(mut self, name: &str, body: &str) -> Fixture {
        let table = (name.to_string(), body.to_string());
        self.last_upstream().tables.push(table);
        self
    }

    /// A backend of the last upstream, at the default weight.
    pub fn backend(mut self, address: SocketAddr) -> Fixture {
        self.last_upstream().backends.push((address, None));
        self
    }

    pub fn backends(self, addresses: &[SocketAddr]) -> Fixture {
        addresses.iter().fold(self, |f, a| f.backend(*a))
    }

    /// Backends of the last upstream, each with its weight.
    pub fn weighted(mut self, backends: &[(SocketAddr, u32)]) -> Fixture {
        let u = self.last_upstream();
        u.backends
            .extend(backends.iter().map(|(a, w)| (*a, Some(*w))));
        self
    }

    /// The config file's text.
    pub fn toml(&self) -> String {
        self.to_string()
    }

    fn last_listener(&mut self) -> &mut Listener {
        self.listeners
            .last_mut()
            .expect("a listener, added with Fixture::listener")
    }

    fn last_upstream(&mut self) -> &mut Upstream {
        self.upstreams
            .last_mut()
            .expect("an upstream, added with Fixture::upstream")
    }
}

impl fmt::Display for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.top {
            writeln!(f, "{line}")?;
        }
        writeln!(f, "\n[admin]\nbind = \"{}\"", self.admin)?;
        for table in &self.tables {
            writeln!(f, "\n{table}")?;
        }
        for l in &self.listeners {
            let bind: Vec<String> = l.bind.iter().map(|a| format!("\"{a}\"")).collect();
            writeln!(f, "\n[[listener]]\nname = \"{}\"", l.name)?;
            writeln!(f, "bind = [{}]", bind.join(", "))?;
            let upstream = match (&l.upstream, l.routes.is_empty()) {
                (Some(u), _) => Some(u.as_str()),
                (None, true) => Some(
                    self.upstreams
                        .first()
                        .map(|u| u.name.as_str())
                        .expect("an upstream for the listener"),
                ),
                (None, false) => None,
            };
            if let Some(u) = upstream {
                writeln!(f, "upstream = \"{u}\"")?;
            }
            for k in &l.keys {
                writeln!(f, "{k}")?;
            }
            for (name, body) in &l.tables {
                writeln!(f, "[listener.{name}]\n{body}")?;
            }
            for (sni, upstream) in &l.routes {
                let names: Vec<String> = sni.iter().map(|n| format!("\"{n}\"")).collect();
                writeln!(f, "[[listener.route]]\nsni = [{}]", names.join(", "))?;
                writeln!(f, "upstream = \"{upstream}\"")?;
            }
        }
        for u in &self.upstreams {
            writeln!(f, "\n[[upstream]]\nname = \"{}\"", u.name)?;
            for k in &u.keys {
                writeln!(f, "{k}")?;
            }
            for (name, body) in &u.tables {
                writeln!(f, "[upstream.{name}]\n{body}")?;
            }
            for (address, weight) in &u.backends {
                writeln!(f, "[[upstream.backend]]\naddress = \"{address}\"")?;
                if let Some(w) = weight {
                    writeln!(f, "weight = {w}")?;
                }
            }
        }
        Ok(())
    }
}
