//! Progress bars on a terminal (`indicatif`) and the log writer that keeps log lines from
//! landing in the middle of a bar.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{
    BinaryBytes, HumanDuration, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState,
    ProgressStyle,
};
use transfer::task::Progress;

/// The bars of the pass being drawn, if any. Each pass gets its own: a finished one's lines
/// then belong to the scrollback, and the next pass's redraws never move the cursor over the
/// summary printed in between.
static CURRENT: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// Whether stderr shows bars: a terminal, and not the journal. Elsewhere (a pipe, a file)
/// only the plain summaries are printed.
fn on_terminal() -> bool {
    static TTY: OnceLock<bool> = OnceLock::new();
    *TTY.get_or_init(|| {
        std::io::stderr().is_terminal() && std::env::var_os("JOURNAL_STREAM").is_none()
    })
}

/// Whether log lines may carry ANSI colour codes: stderr is a terminal (not a pipe, a file or
/// the journal) and `NO_COLOR` (no-color.org) is unset or empty.
pub fn colours() -> bool {
    on_terminal() && !matches!(std::env::var_os("NO_COLOR"), Some(v) if !v.is_empty())
}

fn current() -> std::sync::MutexGuard<'static, Option<MultiProgress>> {
    CURRENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A `tracing` writer: each event is written whole, with the bars lifted off the screen
/// meanwhile and redrawn below it, so no log line starts in the middle of a bar.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogWriter;

/// One event's bytes, written out when the event is complete.
pub struct LogLine(Vec<u8>);

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let out = |line: &[u8]| {
            let mut err = std::io::stderr().lock();
            // A log line that cannot be written has nowhere else to go.
            let _ = err.write_all(line);
            let _ = err.flush();
        };
        // The journal keeps what stderr gets: secrets are masked here as in the log files.
        let text = String::from_utf8_lossy(&self.0);
        let line = sms_agent::logs::redact::scrub(&text);
        let bars = current().clone();
        match bars {
            Some(m) => m.suspend(|| out(line.as_bytes())),
            None => out(line.as_bytes()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine(Vec::with_capacity(256))
    }
}

/// Counters of a pass when it ended, for the summary of an interrupted or failed one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Bytes covered (resumed ones included).
    pub done: u64,
    /// Bytes the pass has to cover.
    pub total: u64,
    /// Plain data bytes sent.
    pub plain_sent: u64,
    /// Data bytes on the wire.
    pub wire_sent: u64,
    /// Bytes the target acknowledged durable.
    pub durable: u64,
}

impl Counters {
    fn of(p: &Progress) -> Self {
        Self {
            done: Progress::get(&p.done),
            total: Progress::get(&p.total),
            plain_sent: Progress::get(&p.plain_sent),
            wire_sent: Progress::get(&p.wire_sent),
            durable: Progress::get(&p.durable),
        }
    }
}

/// Whole percent, rounded down: 100 % means every byte, not 99.5 % of them.
fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    let p = u128::from(done.min(total)) * 100 / u128::from(total);
    u64::try_from(p).unwrap_or(100)
}

/// Bytes per second in the style of the byte counts, `--` while nothing is known.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn rate_text(per_sec: f64) -> String {
    if per_sec.is_finite() && per_sec >= 1.0 {
        format!("{}/s", BinaryBytes(per_sec as u64))
    } else {
        "--".into()
    }
}

/// Time constant of the rate's smoothing: long enough to ride out the bursts of a checkpoint
/// or a token bucket, short enough to follow a changed speed limit within seconds.
const SMOOTHING_SECS: f64 = 3.0;

/// The rate of a pass, smoothed (exponentially weighted), over what this run moves: it starts
/// at the bytes the pass resumed from, and its first figure is the first tick's rate, not 0.
struct Rate {
    last_done: u64,
    last_at: Instant,
    /// The weighted sum so far; divided by the weight the samples carry in all, so that the
    /// first ticks are not pulled towards the 0 it starts from.
    weighted: f64,
    /// Where and when it was anchored.
    base: u64,
    since: Instant,
}

impl Rate {
    fn anchored(done: u64, now: Instant) -> Self {
        Self {
            last_done: done,
            last_at: now,
            weighted: 0.0,
            base: done,
            since: now,
        }
    }

    #[allow(clippy::cast_precision_loss)]
    fn update(&mut self, done: u64, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.last_at).as_secs_f64();
        if dt >= 0.05 {
            let now_rate = done.saturating_sub(self.last_done) as f64 / dt;
            let w = 1.0 - (-dt / SMOOTHING_SECS).exp();
            self.weighted += w * (now_rate - self.weighted);
            self.last_done = done;
            self.last_at = now;
        }
        let age = self
            .last_at
            .saturating_duration_since(self.since)
            .as_secs_f64();
        let weight = 1.0 - (-age / SMOOTHING_SECS).exp();
        if weight > 0.0 {
            self.weighted / weight
        } else {
            0.0
        }
    }

    /// The average over the whole run.
    #[allow(clippy::cast_precision_loss)]
    fn average(&self, done: u64, now: Instant) -> f64 {
        let secs = now.saturating_duration_since(self.since).as_secs_f64();
        if secs < 0.05 {
            return 0.0;
        }
        done.saturating_sub(self.base) as f64 / secs
    }
}

/// The rate the draw thread computed, for the style's keys (f64 bits).
type SharedRate = Arc<AtomicU64>;

fn style(rate: SharedRate) -> ProgressStyle {
    let left = Arc::clone(&rate);
    ProgressStyle::with_template(
        "{prefix:>5} [{bar:30}] {pct} {binary_bytes}/{binary_total_bytes}  {rate}  ETA {left}  {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key("pct", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = write!(w, "{:>3}%", percent(s.pos(), s.len().unwrap_or(0)));
    })
    .with_key("rate", move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = w.write_str(&rate_text(f64::from_bits(rate.load(Ordering::Relaxed))));
    })
    .with_key("left", move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
        let per_sec = f64::from_bits(left.load(Ordering::Relaxed));
        let rest = s.len().unwrap_or(0).saturating_sub(s.pos());
        let _ = if rest == 0 {
            w.write_str("0s")
        } else if per_sec >= 1.0 {
            #[allow(clippy::cast_precision_loss)]
            let secs = rest as f64 / per_sec;
            write!(w, "{:#}", HumanDuration(Duration::from_secs_f64(secs.min(1e9))))
        } else {
            w.write_str("--")
        };
    })
    .progress_chars("=> ")
}

/// Draws the bar of a pass from its counters until `stop` is set; returns it, if it was shown.
fn draw(
    multi: &MultiProgress,
    label: &str,
    progress: &Progress,
    stop: &AtomicBool,
) -> Option<ProgressBar> {
    let mut bar: Option<ProgressBar> = None;
    let shared: SharedRate = Arc::new(AtomicU64::new(0f64.to_bits()));
    let mut rate: Option<Rate> = None;
    // The engines set the total, then the resumed bytes: a first tick that fell between the
    // two is caught by anchoring again at the second when no data was sent yet.
    let mut anchors = 0;
    loop {
        let stopped = stop.load(Ordering::Relaxed);
        let total = Progress::get(&progress.total);
        let done = Progress::get(&progress.done);
        let now = Instant::now();
        // No bar before the pass knows its size: an empty one would look complete.
        if total > 0 {
            let sent = Progress::get(&progress.wire_sent) > 0;
            let r = match rate.as_mut() {
                Some(r) if stopped => r.average(done, now),
                Some(r) if anchors == 1 && !sent => {
                    anchors = 2;
                    *r = Rate::anchored(done, now);
                    0.0
                }
                Some(r) => {
                    anchors = 2;
                    r.update(done, now)
                }
                None => {
                    anchors = 1;
                    rate = Some(Rate::anchored(done, now));
                    0.0
                }
            };
            shared.store(r.to_bits(), Ordering::Relaxed);
            let b = bar.get_or_insert_with(|| {
                multi.add(
                    ProgressBar::new(total)
                        .with_style(style(Arc::clone(&shared)))
                        .with_prefix(label.to_string()),
                )
            });
            b.set_length(total.max(done));
            b.set_position(done);
            b.set_message(format!("compress {:.2}", progress.compress_ratio()));
        }
        if stopped {
            return bar;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs one pass with fresh counters, drawing a bar labelled `label` meanwhile when stderr is
/// a terminal; returns the pass's result and its counters at the end.
pub fn with_progress<T>(label: &str, pass: impl FnOnce(&Progress) -> T) -> (T, Counters) {
    let progress = Progress::default();
    if !on_terminal() {
        let r = pass(&progress);
        return (r, Counters::of(&progress));
    }
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    *current() = Some(multi.clone());
    let stop = AtomicBool::new(false);
    let (r, bar) = std::thread::scope(|s| {
        let drawer = s.spawn(|| draw(&multi, label, &progress, &stop));
        let r = pass(&progress);
        stop.store(true, Ordering::Relaxed);
        (r, drawer.join().ok().flatten())
    });
    let c = Counters::of(&progress);
    if let Some(bar) = bar {
        if c.total > 0 && c.done >= c.total {
            bar.finish();
        } else {
            bar.abandon();
        }
        drop(bar);
        *current() = None;
        // indicatif leaves the cursor at the end of the bar's line, where the summary would
        // otherwise begin.
        let _ = std::io::stderr().write_all(b"\n");
    }
    *current() = None;
    (r, c)
}

#[cfg(test)]
mod tests {
    use super::{percent, Rate};
    use std::time::{Duration, Instant};

    #[test]
    fn the_rate_counts_only_this_run_and_is_right_from_the_first_tick() {
        let t0 = Instant::now();
        // Resumed at 100 MiB; then 10 MiB/s.
        let mut r = Rate::anchored(100 << 20, t0);
        let tick = |n: u64| t0 + Duration::from_millis(200 * n);
        let first = r.update((100 << 20) + (2 << 20), tick(1));
        assert!((first / f64::from(1 << 20) - 10.0).abs() < 0.01, "{first}");
        let mut last = first;
        for n in 2..=20 {
            last = r.update((100 << 20) + n * (2 << 20), tick(n));
        }
        assert!((last / f64::from(1 << 20) - 10.0).abs() < 0.01, "{last}");
        let avg = r.average((100 << 20) + 20 * (2 << 20), tick(20));
        assert!((avg / f64::from(1 << 20) - 10.0).abs() < 0.01, "{avg}");
    }

    #[test]
    fn percent_is_rounded_down() {
        assert_eq!(percent(0, 0), 0);
        assert_eq!(percent(995, 1000), 99);
        assert_eq!(percent(1000, 1000), 100);
        assert_eq!(percent(u64::MAX - 1, u64::MAX), 99);
    }
}
