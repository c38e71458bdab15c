//! `sms-agent netcheck`: delay, jitter, loss and bandwidth to a running receiver, over its own
//! port and mutual TLS, with this host's CPU and memory meanwhile.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use sms_agent::netcheck::{measure, NetReport};
use transfer::netcheck::CheckOptions;
use transfer::session::Connector;
use transfer::Code;

use crate::transfer_cmd::TlsArgs;

/// Arguments of `netcheck`.
#[derive(Debug, Args)]
pub struct NetcheckArgs {
    /// The receiver, HOST:PORT (a running `sms-agent receive`, with the certificates `migrate`
    /// would use).
    #[arg(long, value_name = "HOST:PORT")]
    target: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Whole duration of the check: a quarter (1–5 s) of echoes, the rest streaming data.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(4..=600))]
    seconds: u64,
    /// Parallel data streams of the bandwidth phase (as many as the migration will use).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    streams: u16,
    /// Task id announced to the receiver (only for its log).
    #[arg(long, default_value = "netcheck")]
    task_id: String,
    /// Print one JSON document on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

/// Runs the check and prints it; fails when nothing could be measured.
pub fn run(a: &NetcheckArgs) -> anyhow::Result<()> {
    let (id, ca) = a.tls.load()?;
    let tls = transfer::tls::client_config(id, &ca)
        .map_err(|e| anyhow::anyhow!("{}: TLS setup: {e}", Code::SslCertNotLoaded))?;
    let connector = Connector {
        addr: a.target.clone(),
        tls,
        timeout: Duration::from_secs(10),
    };
    let opts = CheckOptions {
        task_id: a.task_id.clone(),
        streams: a.streams,
        duration: Duration::from_secs(a.seconds),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    // Ctrl-C ends the check at once; nothing is left behind on either side.
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&cancel));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&cancel));
    if !a.json {
        eprintln!(
            "sms-agent netcheck: {} for {} s with {} streams...",
            a.target, a.seconds, a.streams
        );
    }
    let r = measure(&connector, &opts, &cancel);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", table(&r));
    }
    match (&r.check, &r.error) {
        (Some(_), _) => Ok(()),
        (None, e) => {
            let e = e.as_deref().unwrap_or("no measurement");
            // Session errors name their code already.
            if e.starts_with("SMS.") {
                Err(anyhow::anyhow!("{e}"))
            } else {
                let code = r.error_code.as_deref().unwrap_or("SMS.1908");
                Err(anyhow::anyhow!("{code}: {e}"))
            }
        }
    }
}

/// The report for people.
fn table(r: &NetReport) -> String {
    let mut s = format!("target       {}\n", r.target);
    let yes = |b: bool| if b { "yes" } else { "no" };
    s += &format!("reachable    {}\n", yes(r.destination_connectivity));
    if let Some(c) = &r.check {
        s += &format!(
            "delay        {:.2} ms  (median of {} echoes; min {:.2}, max {:.2})\n",
            c.delay_ms,
            c.echoes_sent - c.echoes_late,
            c.delay_min_ms,
            c.delay_max_ms
        );
        s += &format!("jitter       {:.2} ms  (RFC 3550)\n", c.jitter_ms);
        let retrans = c
            .retrans_pct
            .map_or_else(|| "unknown".to_string(), |p| format!("{p:.2} %"));
        s += &format!(
            "loss         {:.2} %  (echoes late {}/{} past {:.0} ms; TCP retransmissions {retrans})\n",
            c.loss_pct, c.echoes_late, c.echoes_sent, c.echo_deadline_ms
        );
        s += &format!(
            "bandwidth    {:.1} Mbit/s  ({} streams, {:.1} s measured after {:.1} s warm-up)\n",
            c.bandwidth_mbps, c.streams, c.measured_secs, c.warmup_secs
        );
    }
    if let Some(e) = &r.error {
        s += &format!("error        {e}\n");
    }
    s += &format!(
        "source       CPU {:.1} %, memory {:.1} %\n",
        r.cpu_usage, r.mem_usage
    );
    s += &format!("evaluation   {}\n", r.evaluation);
    s
}
