//! `emu-load URL AGENTS SECONDS`: simulates many agents against an SMS emulator, each with its
//! own client and keep-alive connection, registering and then polling for commands as fast as
//! the emulator answers; prints requests per second and latency percentiles.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sms_agent::api::models::{Command, IdResponse};
use sms_agent::api::Client;
use sms_agent::config::{Config, Secret};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(url), Some(n), Some(secs)) = (
        args.get(1),
        args.get(2).and_then(|a| a.parse::<usize>().ok()),
        args.get(3).and_then(|a| a.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: emu-load URL AGENTS SECONDS");
        return ExitCode::FAILURE;
    };
    let mut cfg = Config::default();
    cfg.api.endpoint = url.clone();
    cfg.auth.access_key = "AK".into();
    cfg.auth.secret_key = Some(Secret::new("SK"));
    let mut body = probe::probe(&probe::Options::default()).body;
    let cfg = Arc::new(cfg);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..n {
        body.name = format!("load-{i}");
        let (cfg, body) = (cfg.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(client) = Client::new(&cfg) else {
                return (0u64, 0u64, Vec::new());
            };
            let Ok(id) = client
                .send::<_, IdResponse>(reqwest::Method::POST, "/v3/sources", &body)
                .await
            else {
                return (0, 1, Vec::new());
            };
            let path = format!("/v3/sources/{}/command", id.id);
            let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.get::<Command>(&path, &[]).await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                lat.push(t.elapsed());
            }
            (ok, failed, lat)
        }));
    }
    let started = Instant::now();
    let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        if let Ok((o, f, l)) = t.await {
            ok += o;
            failed += f;
            lat.extend(l);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((lat.len() as f64 - 1.0) * p) as usize;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let mut out = BTreeMap::new();
    #[allow(clippy::cast_precision_loss)]
    out.insert("requests_per_s", ok as f64 / wall);
    #[allow(clippy::cast_precision_loss)]
    out.insert("failed", failed as f64);
    out.insert("p50_ms", pct(0.5));
    out.insert("p99_ms", pct(0.99));
    println!(
        "{n} agents, {secs} s: {}",
        serde_json::to_string(&out).unwrap_or_default()
    );
    ExitCode::SUCCESS
}
