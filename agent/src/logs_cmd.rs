//! `sms-agent logs ship`: ships the complete `[log_transfer]` windows not shipped yet, now,
//! with the same durable offset (and lock) as the daemon.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use sms_agent::api::models::AgentConfig;
use sms_agent::api::Client;
use sms_agent::config::{self, Config, Purpose};
use sms_agent::daemon::state::{self, State};
use sms_agent::logs::transfer::ship::now_secs;

/// `sms-agent logs …`.
#[derive(Debug, Subcommand)]
pub enum LogsCommand {
    /// Ship every complete [log_transfer] window not shipped yet to OBS, now.
    ///
    /// Uses the daemon's durable offset: a window is shipped once, whether by the daemon or
    /// by this command, and never twice (a run of both at once ships nothing twice either).
    Ship(ShipArgs),
}

/// Options of `sms-agent logs ship`.
#[derive(Debug, Args)]
pub struct ShipArgs {
    /// Config file.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

/// Runs a `logs` subcommand.
pub fn run(cmd: &LogsCommand) -> anyhow::Result<()> {
    let LogsCommand::Ship(args) = cmd;
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let cfg = Config::load(&args.config, false, &env, Purpose::Daemon)?;
    sms_agent::logs::redact::register_config(&cfg);
    let Some(lt) = cfg.log_transfer.clone() else {
        anyhow::bail!(
            "{}: no [log_transfer] section, or switch_on = false: nothing to ship",
            args.config.display()
        );
    };
    let st: Option<State> = state::read_json(&cfg.agent.state_dir.join("state.json"))?;
    let source = st
        .as_ref()
        .and_then(|s| s.source_id.clone())
        .unwrap_or_default();
    let task = st
        .as_ref()
        .and_then(|s| s.task.as_ref().map(|t| t.id.clone()))
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let (mut obs_domain, mut main_region) = (None, None);
        if cfg.logs.obs_endpoint.trim().is_empty() {
            // The daemon's source of the OBS endpoint: GET /v3/config (ref. §5.2.1).
            let api = Client::new(&cfg)?;
            let c: AgentConfig = api.get("/v3/config", &[]).await?;
            let kept = c.kept();
            obs_domain = kept.obs_domain;
            main_region = kept.main_region;
        }
        let settings = sms_agent::logs::upload_settings(&cfg);
        let shipper = sms_agent::logs::shipper(
            &settings,
            &lt,
            obs_domain.as_deref(),
            main_region.as_deref(),
            &source,
            &task,
        )?;
        let shipped = shipper.ship_due(now_secs()).await?;
        if shipped.is_empty() {
            println!("nothing to ship: no complete window since the last one shipped");
        }
        for s in shipped {
            match &s.object {
                Some(o) => println!("{} {} lines -> {}/{o}", s.window, s.lines, s.bucket),
                None => println!("{} no lines", s.window),
            }
        }
        Ok(())
    })
}
