//! The `sluice` command: `run` the proxy, `check` config files, or `ctl` a running one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::config::{Config, RuntimeMode};
use sluice::control::upgrade::Handover;
use sluice::data::runtime::{PerCore, Workers};
use tokio::runtime::Builder;

/// jemalloc: tokio's task cells and `ScheduledIo`s are 128-byte aligned, and glibc's
/// `memalign` leaves fragments around each (BENCHMARKS.md, "Idle memory: what an open
/// connection holds").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status for an invalid config (EX_USAGE in sysexits.h).
const EXIT_BAD_CONFIG: u8 = 64;
/// Exit status when a config file cannot be read: missing, or not readable (EX_NOINPUT).
const EXIT_NO_INPUT: u8 = 66;
/// Exit status of `check --resolve` when a valid config names a host that does not
/// resolve now (EX_UNAVAILABLE).
const EXIT_UNRESOLVED: u8 = 69;
/// Exit status when sluice could not start (a port already taken, say).
const EXIT_START_FAILED: u8 = 1;

/// The exit statuses, for `--help`; the README lists the same.
const EXIT_CODES: &str = "Exit status:
  0    run: drained and stopped after SIGTERM or SIGINT, or after an upgrade (SIGUSR2)
       handed over to a new process; check: every file is valid
  1    run: could not start (an address already in use, no permission to bind)
  64   the config is invalid (the error names file:line:col)
  66   a config file cannot be read (missing, or no permission)
  69   check --resolve: a backend name does not resolve now
  130  run: a second SIGTERM or SIGINT cut the drain short";

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A TCP reverse proxy and load balancer",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGTERM or SIGINT.
    Run {
        /// The config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate config files: exit 0 if all are valid; with the errors on stderr, 66 if
    /// one cannot be read, else 64 if one is invalid.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Also resolve every backend name once with the config's `[resolver]`, print
        /// what each gives, and exit 69 if one gives no address.
        #[arg(long)]
        resolve: bool,
    },
    /// Change a running sluice through its control socket ([control] in the config):
    /// drain, maint or re-weight a backend, fail readiness, reload.
    #[command(after_help = sluice::control::ctl::client::EXIT_CODES)]
    Ctl(sluice::control::ctl::client::CtlArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { files, resolve } => check(&files, resolve),
        Command::Run { config } => run(config),
        Command::Ctl(args) => ExitCode::from(sluice::control::ctl::client::run(args)),
    }
}

fn check(files: &[PathBuf], resolve: bool) -> ExitCode {
    // Warnings found while loading (a private key readable by others) go to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .without_time()
        .init();
    let mut status = ExitCode::SUCCESS;
    let mut unreadable = false;
    let mut unresolved = false;
    for file in files {
        // Certificates and keys are part of a config: one that cannot load fails it.
        let loaded = Config::load(file)
            .map_err(|e| {
                unreadable |= matches!(e, sluice::config::ConfigError::Read { .. });
                e.to_string()
            })
            .and_then(|c| {
                sluice::edge::tls::load(&c)
                    .map(|_| c)
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener(s), {} upstream(s))",
                    file.display(),
                    c.listeners.len(),
                    c.upstreams.len()
                );
                if resolve {
                    unresolved |= !resolve_names(&c);
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                status = ExitCode::from(EXIT_BAD_CONFIG);
            }
        }
    }
    if unreadable {
        ExitCode::from(EXIT_NO_INPUT)
    } else if status == ExitCode::SUCCESS && unresolved {
        ExitCode::from(EXIT_UNRESOLVED)
    } else {
        status
    }
}

/// `check --resolve`: every backend name of `config` resolved once; whether all gave
/// addresses.
fn resolve_names(config: &Config) -> bool {
    let runtime = match Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start a runtime to resolve names: {e}");
            return false;
        }
    };
    let (lines, all) = runtime.block_on(sluice::control::discovery::try_names(config));
    for line in lines {
        println!("  {line}");
    }
    all
}

fn run(path: PathBuf) -> ExitCode {
    // Before any thread starts: it reads (and removes) systemd's LISTEN_ variables.
    let handover = match sluice::control::upgrade::Handover::from_env() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    // Read before the runtime exists: nothing else is running yet to be blocked.
    let loaded = std::fs::read_to_string(&path)
        .map_err(|source| sluice::config::ConfigError::Read {
            path: path.clone(),
            source,
        })
        .and_then(|text| Config::parse(&text, &path).map(|c| (c, text)));
    let (config, text) = match loaded {
        Ok(c) => c,
        Err(e @ sluice::config::ConfigError::Read { .. }) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_NO_INPUT);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    // Log lines go through a bounded queue to a writer thread, so a slow stdout never
    // blocks the event loop; when the queue is full, lines are dropped.
    let (writer, _flush_on_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(writer)
        .with_ansi(false)
        .init();

    let result = match config.runtime.mode {
        RuntimeMode::MultiThread => run_multi_thread(config, text, handover),
        RuntimeMode::PerCore => run_per_core(config, text, handover),
    };
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    // Once, on stderr: the log (stdout) has said what sluice did up to here.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ sluice::Error::Tls(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

/// One multi-thread runtime runs everything; its threads share the listening sockets.
/// The outer error is a runtime that could not start.
fn run_multi_thread(
    config: Config,
    text: String,
    handover: Handover,
) -> std::io::Result<Result<(), sluice::Error>> {
    let mut builder = Builder::new_multi_thread();
    builder.enable_all();
    // 0 leaves tokio's default: one per CPU core, or TOKIO_WORKER_THREADS.
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let runtime = builder.build()?;
    let workers = Workers::single(runtime.handle().clone());
    let result = runtime.block_on(sluice::run(config, text, workers, handover));
    // Connections still open after the drain are dropped with the runtime.
    drop(runtime);
    Ok(result)
}

/// A current-thread runtime per worker thread for the connections, and one on this
/// thread for the control plane.
fn run_per_core(
    config: Config,
    text: String,
    handover: Handover,
) -> std::io::Result<Result<(), sluice::Error>> {
    let pool = PerCore::start(config.runtime.threads())?;
    let control = Builder::new_current_thread().enable_all().build()?;
    let result = control.block_on(sluice::run(config, text, pool.workers(), handover));
    // As above: what the drain left open goes with the workers' runtimes.
    pool.stop();
    drop(control);
    Ok(result)
}
