//! A real DNS server for the tests: dnsmasq (Debian's `dnsmasq-base`, installed by the
//! Makefile's `deps-test`) on a loopback port, authoritative for `.test`, answering from
//! a hosts file the test rewrites ([`Dns::hosts`], then re-read on SIGHUP) and from
//! SRV records given at start. Names under `.test` that it does not know get NXDOMAIN.
//! Stopped (by its pid) when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{RData, RecordType};

use super::eventually::eventually;
use super::kernel::free_port;

pub struct Dns {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    /// `--srv-host` values and other options, kept for a restart on the same port.
    extra: Vec<String>,
    ttl: u32,
    child: Option<Child>,
}

impl Dns {
    /// dnsmasq with `hosts` (lines of a hosts file: `"127.0.0.2 web.test"`), answering with
    /// TTL `ttl` seconds, with SRV records `srv` (dnsmasq's `--srv-host` values:
    /// `"_app._tcp.svc.test,a.test,8080,10,5"` is target a.test port 8080 priority 10
    /// weight 5).
    pub async fn start(hosts: &[&str], srv: &[&str], ttl: u32) -> Dns {
        let dir = tempfile::tempdir().unwrap();
        let mut dns = Dns {
            addr: free_port(),
            dir,
            extra: srv.iter().map(|s| format!("--srv-host={s}")).collect(),
            ttl,
            child: None,
        };
        dns.write_hosts(hosts);
        dns.run().await;
        dns
    }

    fn hosts_path(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    /// Replaces the hosts file without telling dnsmasq (for a server that is stopped).
    pub fn write_hosts(&self, lines: &[&str]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(self.hosts_path(), text).unwrap();
    }

    fn spawn(&self) -> Child {
        let log = std::fs::File::create(self.dir.path().join("log")).unwrap();
        Command::new("dnsmasq")
            .arg("--keep-in-foreground")
            .arg("--no-daemon")
            .arg(format!("--port={}", self.addr.port()))
            .arg(format!("--listen-address={}", self.addr.ip()))
            .arg("--bind-interfaces")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg("--no-poll")
            .arg("--local=/test/")
            .arg("--user=root")
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("pid").display()
            ))
            .arg(format!("--addn-hosts={}", self.hosts_path().display()))
            .arg(format!("--local-ttl={}", self.ttl))
            .arg(format!("--auth-ttl={}", self.ttl))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dnsmasq (make deps-test installs it)")
    }

    async fn run(&mut self) {
        let mut child = self.spawn();
        let addr = self.addr;
        let this = &*self;
        eventually("dnsmasq to answer", async || {
            if let Ok(Some(status)) = child.try_wait() {
                // The port is outside the ephemeral range (see `free_port`), so only a
                // moment's overlap with the stopped server can hold it: start again.
                let log = std::fs::read_to_string(this.dir.path().join("log")).unwrap_or_default();
                child = this.spawn();
                return Err(format!("dnsmasq exited ({status}), started again: {log}"));
            }
            if answers(addr).await {
                Ok(())
            } else {
                Err("no answer yet".to_string())
            }
        })
        .await;
        self.child = Some(child);
    }

    /// Replaces the hosts file and has dnsmasq re-read it (SIGHUP), waiting until it
    /// answers from the new one: `probe` must resolve to `expect` (or be absent, `None`).
    pub async fn hosts(&self, lines: &[&str], probe: &str, expect: Option<&str>) {
        self.write_hosts(lines);
        self.signal("HUP");
        let addr = self.addr;
        eventually(
            &format!("dnsmasq to answer {probe} with {expect:?}"),
            async || {
                let got = query_a(addr, probe).await;
                match expect {
                    Some(ip) if got.iter().any(|g| g == ip) => Ok(()),
                    None if got.is_empty() => Ok(()),
                    _ => Err(format!("{got:?}")),
                }
            },
        )
        .await;
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("dnsmasq runs").id();
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    /// Stops the server: queries to its port then fail.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the hosts file as it is now.
    pub async fn restart(&mut self) {
        self.stop();
        self.run().await;
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A resolver that asks only the server at `addr`, with no cache.
fn resolver(addr: SocketAddr) -> TokioResolver {
    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
    for c in &mut ns.connections {
        c.port = addr.port();
    }
    let mut b = TokioResolver::builder_with_config(
        ResolverConfig::from_parts(None, Vec::new(), vec![ns]),
        TokioRuntimeProvider::default(),
    );
    b.options_mut().cache_size = 0;
    b.options_mut().timeout = std::time::Duration::from_secs(1);
    b.options_mut().attempts = 1;
    b.build().unwrap()
}

/// Whether the server at `addr` answers a query (NXDOMAIN counts).
async fn answers(addr: SocketAddr) -> bool {
    match resolver(addr).lookup("probe.test", RecordType::A).await {
        Ok(_) => true,
        Err(e) => matches!(e, NetError::Dns(DnsError::NoRecordsFound(_))),
    }
}

/// The A records of `name` from the server at `addr` (empty on NXDOMAIN or no answer).
pub async fn query_a(addr: SocketAddr, name: &str) -> Vec<String> {
    match resolver(addr).lookup(name, RecordType::A).await {
        Ok(l) => l
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}
