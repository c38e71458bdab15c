//! `sms-agent probe`: the inventory of this host, as JSON for SMS or as a tree for people.

use std::io::Write;
use std::path::PathBuf;

use std::collections::BTreeMap;

use anyhow::Context;
use clap::Args;
use sms_agent::config::{self, Config, Purpose};

/// Options of `sms-agent probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Indent the JSON.
    #[arg(long)]
    pretty: bool,
    /// Print a readable tree (like lsblk) instead of JSON.
    #[arg(long, conflicts_with = "pretty")]
    human: bool,
    /// Also report this loop or nbd device (repeatable); they are skipped otherwise.
    #[arg(long = "device", value_name = "PATH")]
    devices: Vec<PathBuf>,
    /// Name to register the source under [default: the hostname].
    #[arg(long)]
    name: Option<String>,
    /// Also report this interface although it would be skipped (tun/tap, bridges; repeatable).
    #[arg(long = "interface", value_name = "NAME")]
    interfaces: Vec<String>,
    /// Config file; its [probe] devices/interfaces and [agent] name are used. A missing file is
    /// fine at the default path only.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

/// Probes the host and prints the result on stdout; warnings go to stderr.
pub fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let cfg = Config::load(&path, args.config.is_none(), &env, Purpose::Local)?;
    let mut devices = cfg.probe.devices;
    devices.extend(args.devices.iter().cloned());
    let mut interfaces = cfg.probe.interfaces;
    interfaces.extend(args.interfaces.iter().cloned());
    let name = args
        .name
        .clone()
        .or_else(|| Some(cfg.agent.name).filter(|n| !n.is_empty()));
    let opts = probe::Options {
        devices,
        name,
        interfaces,
        agent_version: sms_agent::api::REPORTED_AGENT_VERSION.to_string(),
        ..probe::Options::default()
    };
    let report = probe::probe(&opts);
    {
        let mut err = std::io::stderr().lock();
        for w in &report.warnings {
            let _ = writeln!(err, "warning: {w}");
        }
    }
    let text = if args.human {
        probe::human::render(&report.body)
    } else if args.pretty {
        serde_json::to_string_pretty(&report.body).context("encoding the report")? + "\n"
    } else {
        serde_json::to_string(&report.body).context("encoding the report")? + "\n"
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing the report to stdout")?;
    Ok(())
}
