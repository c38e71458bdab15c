//! `sms-agent run` (the daemon in the foreground) and `sms-agent status`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use sms_agent::api::Client;
use sms_agent::config::{self, Config, Purpose};
use sms_agent::daemon::state::{self, Status};
use sms_agent::daemon::Daemon;

/// Options of `sms-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

/// Options of `sms-agent status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Config file (for state_dir).
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn load(path: &std::path::Path, purpose: Purpose) -> anyhow::Result<Config> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    Config::load(path, false, &env, purpose).map_err(anyhow::Error::from)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let cfg = load(&args.config, Purpose::Daemon)?;
    sms_agent::logs::start_files(&cfg, "agent");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let api = Client::new(&cfg).with_context(|| format!("config {}", args.config.display()))?;
        let daemon = Daemon::new(&cfg, api)?;
        tracing::info!(config = %args.config.display(), endpoint = %cfg.api.endpoint, "sms-agent starting");
        daemon.run(shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still dies on SIGTERM, just without saving.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

/// Whether `pid` is a live sms-agent process.
fn daemon_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| argv0.ends_with(b"sms-agent"))
            && c.windows(3).any(|w| w == b"run")
    })
}

/// Prints what the daemon is doing.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let cfg = load(&args.config, Purpose::Local)?;
    let dir = &cfg.agent.state_dir;
    let st: Option<Status> = state::read_json(&dir.join(state::STATUS_FILE))?;
    // Probing the lock would race a daemon that is just starting, so look at the pid instead.
    let running = st.as_ref().is_some_and(|s| daemon_alive(s.pid));
    let Some(st) = st else {
        if args.json {
            println!(
                "{}",
                serde_json::json!({"running": running, "status": null})
            );
        } else {
            println!(
                "sms-agent {}: no status yet in {}",
                if running {
                    "is running"
                } else {
                    "is not running"
                },
                dir.display()
            );
        }
        return Ok(());
    };
    let shipping = sms_agent::logs::transfer::ship::read_state(dir);
    if args.json {
        let mut v = serde_json::to_value(&st)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("running".into(), running.into());
            o.insert("log_transfer".into(), serde_json::to_value(&shipping)?);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "daemon:    {} (pid {})",
        if running { "running" } else { "not running" },
        st.pid
    );
    println!("activity:  {}", st.activity);
    println!("source id: {}", st.source_id.as_deref().unwrap_or("-"));
    println!("task:      {}", st.task_id.as_deref().unwrap_or("-"));
    if let Some(p) = st.phase {
        println!("phase:     {p:?}");
        println!(
            "progress:  {} of {} ({:.1} MB/s, ETA {})",
            probe::human::size(st.bytes_done),
            probe::human::size(st.bytes_total),
            st.rate / 1e6,
            st.eta_secs.map_or("-".to_string(), |s| format!("{s} s"))
        );
        if let Some(l) = st.replication_lag_secs {
            println!("lag:       {l:.1} s (oldest change not yet on the target)");
        }
        if let Some(f) = &st.last_freeze {
            println!(
                "freeze:    pass {} held {} frozen {:.3} s ({}, {})",
                f.pass,
                f.mounts.join(", "),
                f.window_secs,
                if f.within_window {
                    "within the window"
                } else {
                    "past the window: not crash-consistent"
                },
                if f.completed {
                    "pass complete"
                } else {
                    "pass did not complete"
                }
            );
        }
    }
    if let Some(e) = &st.last_error {
        println!("last error: {e}");
    }
    if let Some(l) = &shipping.last {
        println!(
            "log transfer: window {} shipped ({} lines{})",
            l.window,
            l.lines,
            l.object
                .as_ref()
                .map_or(String::new(), |o| format!(" to {}/{o}", l.bucket))
        );
    }
    Ok(())
}
