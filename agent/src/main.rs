//! `sms-agent`: the source-side migration agent. This file only parses the command line, sets
//! up logging and picks the exit code; each subcommand lives in its own module.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod interrupt;
mod logs_cmd;
mod netcheck_cmd;
mod probe_cmd;
mod run_cmd;
mod term;
mod transfer_cmd;
mod watch;

/// Exit status for an unusable configuration (as linkerd2-proxy uses; sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// The exit statuses of `migrate` and `receive`, for `--help` and the man page.
const TRANSFER_EXIT_STATUS: &str = "\
Exit status:
  0    complete: every pass acknowledged durable by the target (receive --once: the last
       pass of a session completed)
  1    failed (the message says why; what the target acknowledged stays resumable)
  2    bad usage (an unknown or missing option)
  64   bad configuration: certificates or keys that cannot be loaded, a malformed --disk,
       a --root whose parent does not exist; running again unchanged fails the same way
  130  interrupted by SIGINT (Ctrl-C), stopped at a checkpoint; migrate prints the command
       that resumes
  143  interrupted by SIGTERM, likewise
A second SIGINT or SIGTERM ends the process at once (the next run still resumes from the
target's last checkpoint).";

/// `--version`: this build's own version, and the `agent_version` it reports to SMS
/// (`sms_agent::api::REPORTED_AGENT_VERSION`, the lowest the service's documented gate, SMS.7707,
/// accepts; a test in `tests/tests/cli.rs` keeps the two literals in step).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (reports agent_version 25.2.0 to SMS)"
);

/// Source-side server migration agent for the Huawei Cloud SMS API v3.
#[derive(Debug, Parser)]
#[command(name = "sms-agent", version = VERSION, about, long_about = None)]
struct Cli {
    /// More log output on stderr (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print this host's inventory as the SMS registration body (JSON) and exit.
    ///
    /// Reads only: sysfs, procfs, /etc, partition tables and superblocks, and read-only
    /// `lvm fullreport` / `btrfs subvolume list` reports. Writes nothing, mounts nothing, needs no
    /// network. What cannot be read is reported as `warning: DEVICE: REASON` on stderr and the
    /// rest of the report still comes out (exit status 0).
    Probe(probe_cmd::ProbeArgs),
    /// Run the agent daemon in the foreground: register with SMS, then poll for commands.
    ///
    /// Under systemd it reports readiness (Type=notify), status and watchdog pings, and logs
    /// go to the journal; elsewhere logs go to stderr. SIGTERM stops it within seconds.
    Run(run_cmd::RunArgs),
    /// Show what the daemon is doing: source id, task, phase, bytes, rate, ETA.
    Status(run_cmd::StatusArgs),
    /// The agent's logs: ship the [log_transfer] windows to OBS now.
    Logs {
        /// What to do.
        #[command(subcommand)]
        command: logs_cmd::LogsCommand,
    },
    /// Target side of a standalone migration: receive disks (--disk) or files (--root).
    ///
    /// Serves sessions over mutual TLS until stopped (--once: until one pass completes).
    /// Writes only to the devices or image files named by --disk (refusing ones smaller than
    /// the source disk or mounted) or under --root, and keeps checkpoints in --state-dir so an
    /// interrupted pass resumes where it was, on either side.
    #[command(after_help = TRANSFER_EXIT_STATUS)]
    Receive(transfer_cmd::ReceiveArgs),
    /// Source side of a standalone migration: send disks (--mode block) or a tree (--mode file).
    ///
    /// Block mode reads only the blocks the filesystems use (ext4/XFS maps, LVM extents; other
    /// regions in full), skips zeros, and resumes from the receiver's checkpoint; --sync then
    /// sends only chunks whose hashes differ and verifies every chunk. Exits 0 only when the
    /// copy (and sync) is complete and verified.
    #[command(after_help = TRANSFER_EXIT_STATUS)]
    Migrate(transfer_cmd::MigrateArgs),
    /// Measure the network to a receiver: delay, jitter, loss, bandwidth, and this host's load.
    ///
    /// Talks to a running `sms-agent receive` on its own port with the certificates `migrate`
    /// uses; the receiver writes nothing. Delay is the median round trip of timed echoes,
    /// jitter their RFC 3550 smoothing, loss the echoes past their deadline or the data
    /// streams' TCP retransmission rate (the larger), bandwidth the rate of --streams streams
    /// of incompressible data after a warm-up. Exits 1 when nothing could be measured.
    Netcheck(netcheck_cmd::NetcheckArgs),
    /// Make a CA and source/target certificates for standalone mode (receive/migrate).
    ///
    /// Writes ca.pem, ca-key.pem, source.pem, source-key.pem, target.pem and target-key.pem
    /// (keys 0600) into DIR, and refuses to overwrite any of them.
    Certs {
        /// Output directory.
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// Host name or IP address the target certificate names (repeatable).
        #[arg(long = "target-name", value_name = "NAME")]
        target_names: Vec<String>,
    },
    /// Print a shell completion script (bash, zsh, fish) on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout.
    #[command(hide = true)]
    Manpage,
    /// Internal: thaws the given mount points at the deadline or when stdin closes (started
    /// by `migrate --freeze`, so a frozen filesystem outlives no crash of the agent).
    #[command(hide = true)]
    ThawGuard {
        /// Milliseconds until the thaw, at most 30,000.
        #[arg(long)]
        within_ms: u64,
        /// Mount points.
        mounts: Vec<std::path::PathBuf>,
    },
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let stderr = tracing_subscriber::fmt::layer().with_writer(term::LogWriter);
    // Colours only on a terminal: a log redirected to a file or a pipe (or the journal, which
    // stamps time itself and shows no colours) gets plain text, no ANSI escapes.
    let stderr = if std::env::var_os("JOURNAL_STREAM").is_some() {
        stderr.without_time().with_ansi(false).boxed()
    } else {
        stderr.with_ansi(term::colours()).boxed()
    };
    // The log files of `log_dir` (`run`, `receive`) start writing once the command has read
    // where they go (sms_agent::logs::sink::install).
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(sms_agent::logs::sink::layers())
        .init();
}

/// The man page's EXIT STATUS section (clap_mangen renders no subcommand's `after_help`).
fn render_exit_status(out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(out, ".SH \"EXIT STATUS\"")?;
    writeln!(out, "Of \\fBmigrate\\fR and \\fBreceive\\fR:")?;
    let mut lines = TRANSFER_EXIT_STATUS.lines().skip(1).peekable();
    while let Some(line) = lines.next() {
        let Some((code, text)) = line.trim_start().split_once(char::is_whitespace) else {
            continue;
        };
        if !code.bytes().all(|b| b.is_ascii_digit()) {
            writeln!(out, ".PP\n{}", roff_text(line.trim()))?;
            for more in lines.by_ref() {
                writeln!(out, "{}", roff_text(more.trim()))?;
            }
            break;
        }
        let mut body = text.trim().to_string();
        while let Some(next) = lines.peek() {
            if !next.starts_with("       ") {
                break;
            }
            body.push(' ');
            body.push_str(next.trim());
            lines.next();
        }
        writeln!(out, ".TP\n{code}\n{}", roff_text(&body))?;
    }
    Ok(())
}

/// Text safe in a roff line: backslashes and hyphens escaped, no leading control character.
fn roff_text(s: &str) -> String {
    let t = s.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Probe(args) => probe_cmd::run(&args),
        Command::Run(args) => run_cmd::run(&args),
        Command::Status(args) => run_cmd::status(&args),
        Command::Logs { command } => logs_cmd::run(&command),
        Command::Receive(args) => transfer_cmd::receive(&args),
        Command::Migrate(args) => transfer_cmd::migrate(&args),
        Command::Netcheck(args) => netcheck_cmd::run(&args),
        Command::ThawGuard { within_ms, mounts } => {
            sms_agent::freeze::guard_main(std::time::Duration::from_millis(within_ms), &mounts)
                .map_err(anyhow::Error::from)
        }
        Command::Certs { out, target_names } => transfer::certs::generate(&out, &target_names)
            .map(|paths| {
                for p in paths {
                    println!("{}", p.display());
                }
            })
            .map_err(anyhow::Error::from),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "sms-agent",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Manpage => {
            use clap::CommandFactory;
            let mut out = std::io::stdout();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .and_then(|()| render_exit_status(&mut out))
                .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`sms-agent probe | head`) is the reader's choice, not a failure.
            if e.chain()
                .filter_map(|c| c.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            if let Some(i) = e.downcast_ref::<interrupt::Interrupted>() {
                // The command said what was done and how to resume; this is not a failure.
                return ExitCode::from(i.exit_code());
            }
            eprintln!("sms-agent: error: {e:#}");
            // A bad configuration will not fix itself: a distinct status lets systemd
            // (RestartPreventExitStatus=) and scripts tell it from a runtime failure.
            if e.chain().any(|c| {
                c.is::<sms_agent::config::ConfigError>()
                    || c.is::<transfer_cmd::BadConfig>()
                    || matches!(
                        c.downcast_ref::<sms_agent::api::ApiError>(),
                        Some(sms_agent::api::ApiError::Config(_))
                    )
            }) {
                return ExitCode::from(EXIT_CONFIG);
            }
            ExitCode::FAILURE
        }
    }
}
