//! `sms-emulator`: the SMS API emulator as a process, for tests and for trying the agent out.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sms_tests::emulator::{serve, serve_tls, store::Store, Emu, EmuConfig};

/// An emulator of the Huawei Cloud SMS API v3 (agent and operator calls, AK/SK and IAM tokens,
/// request journal and fault injection under /_emulator/).
#[derive(Debug, Parser)]
#[command(name = "sms-emulator", version)]
struct Args {
    /// Address to listen on (port 0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Access key accepted.
    #[arg(long)]
    ak: String,
    /// Secret key of that access key.
    #[arg(long)]
    sk: String,
    /// File keeping sources, tasks and commands across restarts.
    #[arg(long)]
    state: Option<PathBuf>,
    /// IAM user accepted by POST /v3/auth/tokens.
    #[arg(long, default_value = "")]
    iam_user: String,
    /// IAM password of that user.
    #[arg(long, default_value = "")]
    iam_password: String,
    /// Lifetime of issued tokens, seconds.
    #[arg(long, default_value_t = 86_400)]
    token_ttl: i64,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// `obs_domain` that GET /v3/config answers (the OBS endpoint of log uploads; a URL with
    /// a scheme, e.g. http://127.0.0.1:9000, for a local S3 server).
    #[arg(long)]
    obs_domain: Option<String>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let store = match Store::open(a.state.as_deref()) {
        Ok(mut s) => {
            s.obs_domain = a.obs_domain.clone();
            s
        }
        Err(e) => {
            eprintln!("sms-emulator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let emu = Emu::new(
        EmuConfig {
            ak: a.ak,
            sk: a.sk,
            iam_user: a.iam_user,
            iam_password: a.iam_password,
            token_ttl: a.token_ttl,
        },
        store,
    );
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sms-emulator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        let l = tokio::net::TcpListener::bind(&a.listen).await?;
        match (&a.tls_cert, &a.tls_key) {
            (Some(c), Some(k)) => {
                println!("listening on https://{}", l.local_addr()?);
                serve_tls(l, emu, c, k).await
            }
            _ => {
                println!("listening on http://{}", l.local_addr()?);
                serve(l, emu).await
            }
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sms-emulator: {e}");
            ExitCode::FAILURE
        }
    }
}
