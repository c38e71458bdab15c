//! Changed-block tracking without a kernel module: a BPF program on the block tracepoints
//! reports every write, discard or other non-read I/O to the migrated disks through a ring
//! buffer, and a poller thread folds them into one sparse 4 KiB map per disk. A sync pass then
//! reads and sends only the blocks that changed since the pass before it started.
//!
//! The tracker must never miss a write, so anything in doubt makes the affected disks wholly
//! changed ([`Changes::Unknown`], with the reason) and the pass compares hashes of every used
//! chunk as without a tracker: the first pass of a process (nothing was recorded before it
//! started), a full ring buffer, a disk whose I/O does not show up under its own device
//! number, a pass that resumed chunks copied before tracking began.

mod bpf;
pub mod dirty;

use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use dirty::Dirty;

use crate::changes::ChangeFeed;

/// Default ring buffer: 4 MiB, 174,000 events, about a second of a fast NVMe's 4 KiB writes
/// between two polls.
const RING_BYTES: u32 = 4 << 20;
/// How often the poller empties the ring buffer.
const POLL: Duration = Duration::from_millis(50);
/// Beyond this many changed megabyte groups per disk (1 TiB), the map costs more than a
/// hash sync saves: the disk counts as wholly changed.
const MAX_GROUPS: u64 = 1 << 20;

/// Why the tracker cannot run; the passes compare hashes instead.
#[derive(Debug, thiserror::Error)]
pub enum CbtError {
    /// BPF, the tracepoints or the permissions are missing.
    #[error("changed-block tracking unavailable: {0}")]
    Unavailable(String),
}

/// What a pass may rely on for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Only these blocks can differ from what the target received.
    Known(Dirty),
    /// Nothing is known (why): every used chunk must be compared.
    Unknown(String),
}

impl Changes {
    /// The byte ranges for the block sender, `None` when unknown.
    pub fn ranges(&self) -> Option<Vec<std::ops::Range<u64>>> {
        match self {
            Changes::Known(d) => Some(d.ranges()),
            Changes::Unknown(_) => None,
        }
    }
}

struct DiskState {
    path: PathBuf,
    dirty: Dirty,
    /// Wholly changed since the last take, and why.
    whole: Option<String>,
    /// Never trackable (why): every take is unknown.
    untrackable: Option<String>,
    /// When the oldest change not yet taken happened.
    oldest: Option<Instant>,
}

impl DiskState {
    fn make_whole(&mut self, why: &str, now: Instant) {
        if self.whole.is_none() {
            self.whole = Some(why.to_string());
        }
        self.dirty = Dirty::default();
        self.oldest.get_or_insert(now);
    }
}

struct State {
    disks: Vec<DiskState>,
    /// The program's lost-event count already acted upon.
    lost: u64,
    /// The oldest change taken by a pass that has not completed yet.
    inflight: Option<Instant>,
}

struct Shared {
    prog: Mutex<bpf::Program>,
    state: Mutex<State>,
}

/// A running tracker of a set of source disks. Dropping it detaches the program.
pub struct Tracker {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    poller: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The device number of a whole-disk block device as the tracepoints give it.
fn dev_of(path: &Path) -> Result<u32, String> {
    let md = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !md.file_type().is_block_device() {
        return Err("not a block device".into());
    }
    let rdev = md.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    u32::try_from((major << 20) | minor).map_err(|_| "device number out of range".to_string())
}

/// Reads 4 KiB of `path` past the page cache, so the block layer sees one I/O.
fn direct_read(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)?;
    const B: usize = 4096;
    let mut buf = vec![0u8; 3 * B];
    let skip = buf.as_ptr().align_offset(B);
    let block = &mut buf[skip..skip + B];
    let n = std::os::unix::fs::FileExt::read_at(&f, block, 0)?;
    if n == 0 {
        return Err(std::io::Error::other("empty device"));
    }
    Ok(())
}

/// Ring buffer size: `SMS_AGENT_CBT_RING_KIB` (a power of two, at least the page size) or
/// the default.
fn ring_bytes() -> u32 {
    std::env::var("SMS_AGENT_CBT_RING_KIB")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .and_then(|k| k.checked_mul(1024))
        .filter(|b| b.is_power_of_two() && *b >= 4096)
        .unwrap_or(RING_BYTES)
}

/// Poll interval: `SMS_AGENT_CBT_POLL_MS` or the default.
fn poll_every() -> Duration {
    std::env::var("SMS_AGENT_CBT_POLL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(POLL, |ms| Duration::from_millis(ms.clamp(1, 10_000)))
}

impl Tracker {
    /// Starts tracking `disks` (whole-disk devices). Each starts wholly changed: nothing was
    /// recorded before now. A disk whose I/O the program does not see under its own device
    /// stays wholly changed for good.
    pub fn start(disks: &[PathBuf]) -> Result<Tracker, CbtError> {
        Self::start_with(disks, ring_bytes(), poll_every())
    }

    /// [`Tracker::start`] with a ring buffer of `ring` bytes (a power of two, at least a
    /// page) polled every `every`.
    pub fn start_with(disks: &[PathBuf], ring: u32, every: Duration) -> Result<Tracker, CbtError> {
        if disks.len() > bpf::MAX_DISKS {
            return Err(CbtError::Unavailable(format!(
                "{} disks; the tracker takes at most {}",
                disks.len(),
                bpf::MAX_DISKS
            )));
        }
        let now = Instant::now();
        let mut devs = Vec::new();
        let mut states = Vec::new();
        for (i, p) in disks.iter().enumerate() {
            let (dev, untrackable) = match dev_of(p) {
                Ok(d) => (d, None),
                // An unused slot number: nothing matches it.
                Err(e) => (u32::MAX - u32::try_from(i).unwrap_or(0), Some(e)),
            };
            devs.push(dev);
            states.push(DiskState {
                path: p.clone(),
                dirty: Dirty::default(),
                whole: Some("no writes were recorded before the tracker started".into()),
                untrackable,
                oldest: Some(now),
            });
        }
        let prog = bpf::Program::load(&devs, ring)?;
        let lost = prog.lost()?;
        let shared = Arc::new(Shared {
            prog: Mutex::new(prog),
            state: Mutex::new(State {
                disks: states,
                lost,
                inflight: None,
            }),
        });
        self_check(&shared);
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("cbt-poll".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::park_timeout(every);
                        if !stop.load(Ordering::Relaxed) {
                            drain(&shared);
                        }
                    }
                })
                .map_err(|e| CbtError::Unavailable(format!("cannot start the poller: {e}")))?
        };
        tracing::info!(
            disks = disks.len(),
            ring_bytes = ring_bytes(),
            "changed-block tracker running"
        );
        Ok(Tracker {
            shared,
            stop,
            poller: Some(poller),
        })
    }

    /// Everything changed since the last take, per disk, and a fresh start: call it when a
    /// pass begins (after a freeze, so that every write before it is in). Every write that
    /// completed before this call is in what it returns.
    pub fn take(&self) -> Vec<Changes> {
        drain(&self.shared);
        let mut st = lock(&self.shared.state);
        let mut inflight = st.inflight;
        let out = st
            .disks
            .iter_mut()
            .map(|d| {
                if let Some(o) = d.oldest.take() {
                    inflight = Some(inflight.map_or(o, |i: Instant| i.min(o)));
                }
                if let Some(why) = &d.untrackable {
                    d.whole = None;
                    return Changes::Unknown(format!(
                        "{}: its writes cannot be tracked ({why})",
                        d.path.display()
                    ));
                }
                match d.whole.take() {
                    Some(why) => {
                        d.dirty = Dirty::default();
                        Changes::Unknown(why)
                    }
                    None => Changes::Known(std::mem::take(&mut d.dirty)),
                }
            })
            .collect();
        st.inflight = inflight;
        out
    }

    /// A pass that took `taken` failed: its changes are still to be sent.
    pub fn give_back(&self, taken: Vec<Changes>) {
        let mut st = lock(&self.shared.state);
        let now = Instant::now();
        let inflight = st.inflight.take();
        for (d, c) in st.disks.iter_mut().zip(taken) {
            if let Some(i) = inflight {
                d.oldest = Some(d.oldest.map_or(i, |o| o.min(i)));
            }
            match c {
                Changes::Known(x) => {
                    if d.whole.is_none() {
                        d.dirty.merge(&x);
                    }
                }
                Changes::Unknown(why) => d.make_whole(&why, now),
            }
        }
    }

    /// The pass that took the last changes completed: they are on the target.
    pub fn committed(&self) {
        lock(&self.shared.state).inflight = None;
    }

    /// Makes every disk wholly changed (a pass resumed chunks sent before tracking began).
    pub fn forget(&self, why: &str) {
        let mut st = lock(&self.shared.state);
        let now = Instant::now();
        for d in &mut st.disks {
            d.make_whole(why, now);
        }
    }
}

impl ChangeFeed for Tracker {
    fn lag(&self) -> Option<Duration> {
        drain(&self.shared);
        let st = lock(&self.shared.state);
        st.disks
            .iter()
            .filter_map(|d| d.oldest)
            .chain(st.inflight)
            .min()
            .map(|t| t.elapsed())
    }

    fn pending_bytes(&self) -> Option<u64> {
        drain(&self.shared);
        let st = lock(&self.shared.state);
        st.disks.iter().try_fold(0u64, |acc, d| {
            if d.whole.is_some() || d.untrackable.is_some() {
                None
            } else {
                Some(acc + d.dirty.bytes())
            }
        })
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.poller.take() {
            p.thread().unpark();
            let _ = p.join();
        }
    }
}

/// Folds the ring buffer's events into the maps; a lost event makes every disk wholly
/// changed.
fn drain(shared: &Shared) {
    let mut prog = lock(&shared.prog);
    let mut st = lock(&shared.state);
    let now = Instant::now();
    prog.drain(|e| {
        let Some(d) = st
            .disks
            .get_mut(usize::try_from(e.disk).unwrap_or(usize::MAX))
        else {
            return;
        };
        if d.whole.is_some() || d.untrackable.is_some() {
            return;
        }
        let start = e.sector.saturating_mul(512);
        d.dirty
            .mark(start, start.saturating_add(u64::from(e.nr_sector) * 512));
        d.oldest.get_or_insert(now);
        if d.dirty.bytes() / (1 << 20) > MAX_GROUPS {
            d.make_whole("more changed than the tracker keeps in memory", now);
        }
    });
    match prog.lost() {
        Ok(n) if n > st.lost => {
            let why = format!(
                "the tracker's ring buffer overflowed ({} writes could not be recorded)",
                n - st.lost
            );
            tracing::warn!("{why}; the next sync compares every used chunk");
            st.lost = n;
            for d in &mut st.disks {
                d.make_whole(&why, now);
            }
        }
        Ok(_) => {}
        Err(e) => {
            let why = format!("the tracker cannot be read: {e}");
            tracing::warn!("{why}; the next sync compares every used chunk");
            for d in &mut st.disks {
                d.make_whole(&why, now);
            }
        }
    }
}

/// Checks that a read of each disk shows up under its own device in both tracepoints;
/// one that does not (a driver without requests, a device mapper stack the disk is not the
/// bottom of) is marked untrackable.
fn self_check(shared: &Shared) {
    let mut st = lock(&shared.state);
    let prog = lock(&shared.prog);
    for (slot, d) in st.disks.iter_mut().enumerate() {
        if d.untrackable.is_some() {
            continue;
        }
        let before = prog.seen(slot);
        let read = direct_read(&d.path);
        let after = prog.seen(slot);
        let why = match (read, before, after) {
            (Err(e), ..) => Some(format!("a direct read to check it failed: {e}")),
            (Ok(()), Ok(b), Ok(a)) if a.0 > b.0 && a.1 > b.1 => None,
            (Ok(()), Ok(_), Ok(_)) => Some(
                "a read of it did not show up under its device in both block tracepoints"
                    .to_string(),
            ),
            (_, Err(e), _) | (_, _, Err(e)) => Some(e.to_string()),
        };
        if let Some(why) = why {
            tracing::warn!(disk = %d.path.display(), "changed-block tracking cannot cover this disk: {why}; its syncs compare every used chunk");
            d.untrackable = Some(why);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    /// A loop device over a sparse file, detached on drop.
    struct Loop(PathBuf, #[allow(dead_code)] tempfile::TempDir);

    impl Loop {
        fn new(mib: u64) -> Loop {
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("disk.img");
            std::fs::File::create(&img)
                .unwrap()
                .set_len(mib << 20)
                .unwrap();
            let out = Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&img)
                .output()
                .unwrap();
            assert!(out.status.success(), "losetup: {out:?}");
            let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
            Loop(PathBuf::from(dev), dir)
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    fn write_synced(dev: &Path, at: &[u64]) {
        let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
        for &o in at {
            f.write_all_at(&[0x5a; 4096], o).unwrap();
        }
        f.sync_all().unwrap();
    }

    #[test]
    fn writes_to_a_disk_are_recorded_and_an_overflow_makes_it_wholly_changed() {
        let disk = Loop::new(64);
        let t = Tracker::start(std::slice::from_ref(&disk.0)).unwrap();
        // Nothing was recorded before the start.
        assert!(
            matches!(&t.take()[0], Changes::Unknown(w) if w.contains("before the tracker started"))
        );
        t.committed();
        assert_eq!(t.take(), vec![Changes::Known(Dirty::default())]);
        write_synced(&disk.0, &[1 << 20, 40 << 20]);
        assert!(t.lag().is_some());
        let Changes::Known(d) = &t.take()[0] else {
            panic!("writes not tracked");
        };
        let r = d.ranges();
        assert!(
            r.iter()
                .any(|r| r.start <= 1 << 20 && r.end >= (1 << 20) + 4096),
            "{r:?}"
        );
        assert!(
            r.iter()
                .any(|r| r.start <= 40 << 20 && r.end >= (40 << 20) + 4096),
            "{r:?}"
        );
        // Given back after a failed pass, the changes are still there.
        t.give_back(vec![Changes::Known(d.clone())]);
        assert_eq!(t.pending_bytes(), Some(d.bytes()));
        drop(t);

        // A ring buffer of one page polled rarely overflows under a thousand scattered writes.
        let t = Tracker::start_with(std::slice::from_ref(&disk.0), 4096, Duration::from_secs(60))
            .unwrap();
        t.take();
        let offsets: Vec<u64> = (0..1000).map(|i| i * 16384).collect();
        write_synced(&disk.0, &offsets);
        assert!(
            matches!(&t.take()[0], Changes::Unknown(w) if w.contains("overflowed")),
            "an overflow went unnoticed"
        );
        assert_eq!(t.pending_bytes(), Some(0));
    }

    #[test]
    fn an_image_file_is_never_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let t = Tracker::start(&[img]).unwrap();
        t.take();
        assert!(matches!(&t.take()[0], Changes::Unknown(w) if w.contains("not a block device")));
    }
}
