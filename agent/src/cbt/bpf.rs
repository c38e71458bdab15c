//! Loads the tracker's BPF program (`tracker.bpf.c`, committed as `tracker.bpf.o`), attaches
//! it to the block tracepoints and reads its ring buffer.

use std::os::fd::AsRawFd;
use std::path::Path;

use aya::maps::{Array, HashMap, MapData, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};

use super::CbtError;

/// The compiled program (see `build-bpf.sh`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("tracker.bpf.o");

/// Disk slots of the program (`MAX_DISKS`).
pub const MAX_DISKS: usize = 64;

/// The tracepoint fields the program reads at fixed offsets: (event, field, offset).
const LAYOUT: [(&str, &str, usize); 8] = [
    ("block_bio_queue", "dev", 8),
    ("block_bio_queue", "sector", 16),
    ("block_bio_queue", "nr_sector", 24),
    ("block_bio_queue", "rwbs", 28),
    ("block_rq_complete", "dev", 8),
    ("block_rq_complete", "sector", 16),
    ("block_rq_complete", "nr_sector", 24),
    ("block_rq_complete", "rwbs", 34),
];

/// One change the program reported: `nr_sector` 512-byte sectors at `sector` of slot `disk`.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// Disk slot.
    pub disk: u32,
    /// First sector (absolute on the whole disk).
    pub sector: u64,
    /// Sectors.
    pub nr_sector: u32,
}

/// The loaded, attached program and the maps user space reads.
pub struct Program {
    /// Owns the programs and their links: dropping it detaches them.
    _ebpf: Ebpf,
    ring: RingBuf<MapData>,
    stats: Array<MapData, u64>,
}

/// The tracing file system's root, mounted if nobody did (tracepoint ids are read there).
fn tracefs() -> Result<&'static Path, CbtError> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("events/block").is_dir() {
            return Ok(Path::new(p));
        }
    }
    let root = Path::new("/sys/kernel/tracing");
    nix::mount::mount(
        Some("tracefs"),
        root,
        Some("tracefs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| CbtError::Unavailable(format!("tracefs is not mounted and cannot be: {e}")))?;
    if root.join("events/block").is_dir() {
        Ok(root)
    } else {
        Err(CbtError::Unavailable(
            "the kernel has no block tracepoints".into(),
        ))
    }
}

/// Checks that the running kernel lays out the tracepoints' fields where the program reads
/// them; another layout would make it read garbage, so the tracker is not used at all.
fn check_layout(root: &Path) -> Result<(), CbtError> {
    for (event, field, want) in LAYOUT {
        let path = root.join("events/block").join(event).join("format");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| CbtError::Unavailable(format!("{}: {e}", path.display())))?;
        let found = text.lines().find_map(|l| {
            let decl = l.trim().strip_prefix("field:")?;
            let (decl, rest) = decl.split_once(';')?;
            let name = decl.rsplit(' ').next()?.split('[').next()?;
            if name != field {
                return None;
            }
            rest.trim()
                .strip_prefix("offset:")?
                .split(';')
                .next()?
                .parse::<usize>()
                .ok()
        });
        if found != Some(want) {
            return Err(CbtError::Unavailable(format!(
                "tracepoint block:{event} has its field {field} at {found:?}, not at {want} where the tracker reads it"
            )));
        }
    }
    Ok(())
}

impl Program {
    /// Loads the program with a ring buffer of `ring_bytes`, maps each device number
    /// (`major << 20 | minor`, the tracepoints' encoding) to its slot and attaches.
    pub fn load(devs: &[u32], ring_bytes: u32) -> Result<Self, CbtError> {
        let root = tracefs()?;
        check_layout(root)?;
        let bpf_err = |what: &str, e: &dyn std::fmt::Display| {
            CbtError::Unavailable(format!("{what}: {e} (needs CAP_BPF and CAP_PERFMON, a kernel with BPF ring buffers, 5.8 or later, and no lockdown)"))
        };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("events", ring_bytes)
            .load(OBJECT)
            .map_err(|e| bpf_err("cannot load the tracker's BPF program", &e))?;
        {
            let map = ebpf
                .map_mut("disks")
                .ok_or_else(|| CbtError::Unavailable("the BPF object has no disks map".into()))?;
            let mut disks: HashMap<&mut MapData, u32, u32> =
                HashMap::try_from(map).map_err(|e| bpf_err("disks map", &e))?;
            for (slot, dev) in devs.iter().enumerate() {
                let slot = u32::try_from(slot).unwrap_or(u32::MAX);
                disks
                    .insert(dev, slot, 0)
                    .map_err(|e| bpf_err("disks map", &e))?;
            }
        }
        for (prog, event) in [
            ("bio_queue", "block_bio_queue"),
            ("rq_complete", "block_rq_complete"),
        ] {
            let p: &mut TracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| CbtError::Unavailable(format!("the BPF object has no {prog}")))?
                .try_into()
                .map_err(|e| bpf_err(prog, &e))?;
            p.load().map_err(|e| bpf_err(prog, &e))?;
            p.attach("block", event)
                .map_err(|e| bpf_err(&format!("attach to block:{event}"), &e))?;
        }
        let ring = ebpf
            .take_map("events")
            .ok_or_else(|| CbtError::Unavailable("the BPF object has no ring buffer".into()))?;
        let ring = RingBuf::try_from(ring).map_err(|e| bpf_err("ring buffer", &e))?;
        let stats = ebpf
            .take_map("stats")
            .ok_or_else(|| CbtError::Unavailable("the BPF object has no stats map".into()))?;
        let stats = Array::try_from(stats).map_err(|e| bpf_err("stats map", &e))?;
        tracing::debug!(ring_fd = ring.as_raw_fd(), "changed-block tracker attached");
        Ok(Program {
            _ebpf: ebpf,
            ring,
            stats,
        })
    }

    /// Takes every event now in the ring buffer.
    pub fn drain(&mut self, mut each: impl FnMut(Event)) {
        while let Some(item) = self.ring.next() {
            let b: &[u8] = &item;
            let u32_at = |i: usize| {
                b.get(i..i + 4)
                    .and_then(|s| s.try_into().ok())
                    .map_or(0, u32::from_ne_bytes)
            };
            let sector = b
                .get(8..16)
                .and_then(|s| s.try_into().ok())
                .map_or(0, u64::from_ne_bytes);
            each(Event {
                disk: u32_at(0),
                nr_sector: u32_at(4),
                sector,
            });
        }
    }

    /// Events the program could not record because the ring buffer was full.
    pub fn lost(&self) -> Result<u64, CbtError> {
        self.stat(0)
    }

    /// I/Os of any kind (reads too) seen on slot `slot`: by block_bio_queue and by
    /// block_rq_complete.
    pub fn seen(&self, slot: usize) -> Result<(u64, u64), CbtError> {
        let base = 1 + 2 * slot;
        Ok((self.stat(base)?, self.stat(base + 1)?))
    }

    fn stat(&self, i: usize) -> Result<u64, CbtError> {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        self.stats
            .get(&i, 0)
            .map_err(|e| CbtError::Unavailable(format!("stats map: {e}")))
    }
}
