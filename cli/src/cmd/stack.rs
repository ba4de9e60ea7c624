//! `vmr stack up|down|status|env`: the local stack for when no shared
//! services are configured: the project's Tansu broker (sqlite storage) on
//! 127.0.0.1, every vmr topic, the Schema Registry with the event schemas
//! registered, and a filesystem object store, all under
//! `<data-dir>/stack`. It wraps `scripts/stack.sh` from the checkout.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use crate::config::{Config, Source};
use crate::error::{CliError, CliResult};
use crate::output::{println_safe, Out, Table};
use crate::util;

/// `vmr stack` subcommands.
#[derive(Debug, Subcommand)]
pub enum StackCommand {
    /// Start the local stack (or reuse the running one) and print its addresses.
    Up,
    /// Stop the local stack; its data stays in the data directory.
    Down,
    /// Show what runs.
    Status,
    /// Print the stack's addresses as shell exports.
    Env,
}

/// Where the local stack listens and keeps its files.
#[derive(Debug, Clone)]
struct Layout {
    dir: PathBuf,
    kafka_port: u16,
    registry_port: u16,
    bootstrap: String,
    registry_url: String,
    object_store_url: String,
}

fn port_of(hostport: &str) -> Option<u16> {
    hostport.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

fn is_loopback(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1")
}

fn layout(cfg: &Config) -> CliResult<Layout> {
    let bs = cfg.endpoints.bootstrap_servers.trim();
    let first = bs.split(',').next().unwrap_or("");
    let host = first.rsplit_once(':').map_or(first, |(h, _)| h);
    if cfg.broker_source != Source::Default && (bs.contains(',') || !is_loopback(host)) {
        return Err(CliError::precondition(format!(
            "a broker is configured at {bs} ({} setting); the local stack runs only on 127.0.0.1",
            cfg.broker_source.as_str()
        ))
        .hint("the local stack is for when no broker is configured: unset it, or set it to 127.0.0.1:<port>"));
    }
    let kafka_port = port_of(first)
        .ok_or_else(|| CliError::usage(format!("bootstrap server {first:?} has no port")))?;
    let (reg_hostport, _) = util::split_http_url(&cfg.endpoints.registry_url).map_err(|e| {
        CliError::precondition(format!(
            "the local stack's registry must be plain http: {e}"
        ))
    })?;
    let registry_port = port_of(&reg_hostport).unwrap_or(80);
    let dir = cfg.stack_dir();
    Ok(Layout {
        kafka_port,
        registry_port,
        bootstrap: format!("127.0.0.1:{kafka_port}"),
        registry_url: format!("http://127.0.0.1:{registry_port}"),
        object_store_url: format!("file://{}", dir.join("objects").display()),
        dir,
    })
}

fn script(cfg: &Config, l: &Layout, verb: &str) -> CliResult<Command> {
    let root = util::checkout_root();
    let path = root.join("scripts/stack.sh");
    if !path.is_file() {
        return Err(CliError::precondition(format!(
            "the stack script {} does not exist",
            path.display()
        ))
        .hint("run vmr from a vmreplay checkout, or set VMR_ROOT to one"));
    }
    let mut c = Command::new("bash");
    c.arg(&path)
        .arg(verb)
        .env("VMR_STACK_DIR", &l.dir)
        .env("VMR_KAFKA_PORT", l.kafka_port.to_string())
        .env("VMR_REGISTRY_PORT", l.registry_port.to_string())
        .env(
            "VMR_EVENT_PARTITIONS",
            cfg.endpoints.event_partitions.to_string(),
        )
        .env("VMR_CACHE", &cfg.cache_dir)
        .stdin(Stdio::null());
    if std::env::var_os("VMR_BIN_DIR").is_none() {
        // The workspace binaries next to this one (target/<profile>).
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
        {
            if dir.join("schema-registry").is_file() {
                c.env("VMR_BIN_DIR", dir);
            }
        }
    }
    Ok(c)
}

fn pid_alive(pid_file: &std::path::Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    (rc == 0).then_some(pid)
}

fn status(l: &Layout, out: &Out) -> CliResult {
    let mut rows = Vec::new();
    for (svc, addr) in [
        ("broker", l.bootstrap.clone()),
        ("registry", l.registry_url.clone()),
    ] {
        let pid = pid_alive(&l.dir.join(format!("{svc}.pid")));
        rows.push((svc, pid, addr));
    }
    if out.json {
        let services: Vec<_> = rows
            .iter()
            .map(|(s, pid, addr)| json!({ "name": s, "running": pid.is_some(), "pid": pid, "address": addr }))
            .collect();
        out.json_doc(&json!({
            "dir": l.dir,
            "services": services,
            "object_store_url": l.object_store_url,
        }));
    } else {
        let mut t = Table::new(&["SERVICE", "STATE", "PID", "ADDRESS"]);
        for (s, pid, addr) in &rows {
            t.row(vec![
                s.to_string(),
                if pid.is_some() { "running" } else { "stopped" }.into(),
                pid.map_or("-".into(), |p| p.to_string()),
                addr.clone(),
            ]);
        }
        t.row(vec![
            "object-store".into(),
            "-".into(),
            "-".into(),
            l.object_store_url.clone(),
        ]);
        t.print();
    }
    Ok(())
}

fn env_exports(l: &Layout, out: &Out) {
    if out.json {
        out.json_doc(&json!({
            "VMR_BOOTSTRAP_SERVERS": l.bootstrap,
            "VMR_REGISTRY_URL": l.registry_url,
            "VMR_OBJECT_STORE_URL": l.object_store_url,
        }));
    } else {
        println_safe(&format!("export VMR_BOOTSTRAP_SERVERS={}", l.bootstrap));
        println_safe(&format!("export VMR_REGISTRY_URL={}", l.registry_url));
        println_safe(&format!(
            "export VMR_OBJECT_STORE_URL={}",
            l.object_store_url
        ));
    }
}

/// How long `stack up` may take (broker start, topics, registry).
const UP_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs a `stack` subcommand.
pub fn run(cfg: &Config, c: &StackCommand, out: &Out) -> CliResult {
    let l = layout(cfg)?;
    match c {
        StackCommand::Status => status(&l, out),
        StackCommand::Env => {
            env_exports(&l, out);
            Ok(())
        }
        StackCommand::Up | StackCommand::Down => {
            let verb = if matches!(c, StackCommand::Up) {
                "up"
            } else {
                "down"
            };
            if verb == "up" {
                start(cfg, &l, out)?;
            } else {
                let mut cmd = script(cfg, &l, verb)?;
                let r = util::run_bounded(&mut cmd, UP_TIMEOUT).map_err(|e| {
                    CliError::unavailable(format!("stack {verb}: {e}"))
                        .hint(format!("see the logs in {}", l.dir.display()))
                })?;
                if !out.quiet {
                    for line in r.stderr.lines() {
                        eprintln!("{line}");
                    }
                }
                if !r.success {
                    let last = r.stderr.lines().last().unwrap_or("").to_string();
                    return Err(CliError::unavailable(format!(
                        "stack {verb} failed ({}): {last}",
                        r.status
                    ))
                    .hint(format!("see the logs in {}", l.dir.display())));
                }
            }
            if verb == "up" {
                env_exports(&l, out);
            } else if !out.json {
                out.progress(&format!("stack stopped; data kept in {}", l.dir.display()));
            } else {
                out.json_doc(&json!({ "stopped": true, "dir": l.dir }));
            }
            Ok(())
        }
    }
}

/// Which shared services a command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub broker: bool,
    pub store: bool,
}

/// The embedded default: when the command needs the broker and none is
/// configured (file, env or flag) and nothing answers at the default
/// address, starts the local stack (as `vmr stack up`) and says so; when it
/// needs the object store and none is configured, uses the local stack's
/// filesystem store. Returns the configuration to run the command with.
pub fn embedded_default(cfg: &Config, needs: Needs, out: &Out) -> CliResult<Config> {
    let mut cfg = cfg.clone();
    let local = cfg.broker_source == Source::Default;
    if needs.store && !cfg.store_configured {
        if let Ok(l) = layout(&cfg) {
            cfg.endpoints.object_store_url = l.object_store_url.clone();
        }
    }
    if !(needs.broker && local) {
        return Ok(cfg);
    }
    let l = layout(&cfg)?;
    if util::connect(&l.bootstrap, Duration::from_millis(500)).is_ok() {
        return Ok(cfg);
    }
    out.progress(&format!(
        "no broker configured and none at {}: starting the local stack in {} (stop it with `vmr stack down`)",
        l.bootstrap,
        l.dir.display()
    ));
    start(&cfg, &l, out)?;
    Ok(cfg)
}

fn start(cfg: &Config, l: &Layout, out: &Out) -> CliResult {
    std::fs::create_dir_all(l.dir.join("objects")).map_err(|e| {
        CliError::precondition(format!("cannot create {}: {e}", l.dir.display()))
            .hint("choose a writable --data-dir")
    })?;
    let mut cmd = script(cfg, l, "up")?;
    let r = util::run_bounded(&mut cmd, UP_TIMEOUT).map_err(|e| {
        CliError::unavailable(format!("stack up: {e}"))
            .hint(format!("see the logs in {}", l.dir.display()))
    })?;
    if !out.quiet {
        for line in r.stderr.lines() {
            eprintln!("{line}");
        }
    }
    if !r.success {
        let last = r.stderr.lines().last().unwrap_or("").to_string();
        return Err(
            CliError::unavailable(format!("stack up failed ({}): {last}", r.status)).hint(format!(
                "see the logs in {}; `vmr doctor` checks the prerequisites",
                l.dir.display()
            )),
        );
    }
    Ok(())
}
