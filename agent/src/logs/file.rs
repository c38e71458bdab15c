//! A log file in `log_dir` rotated by size and age, its rotated copies pruned by age and by a
//! bound on the total, so that logs never fill the disk of the host being migrated.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// When files rotate and how many are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Rotate before a write would take the file past this many bytes.
    pub max_file_size: u64,
    /// Rotate a file written to for this long.
    pub rotate_interval: Duration,
    /// Delete rotated files older than this.
    pub max_age: Duration,
    /// Keep the current and rotated files under this many bytes in all.
    pub max_total: u64,
}

/// `NAME.log` in a directory, rotated to `NAME.log.<unix-micros>`.
#[derive(Debug)]
pub struct Rotating {
    dir: PathBuf,
    name: String,
    limits: Limits,
    file: File,
    size: u64,
    opened: SystemTime,
}

impl Rotating {
    /// Opens (appending) `dir/NAME.log`, creating `dir` (mode 0750) when missing and the file
    /// (0640).
    pub fn open(dir: &Path, name: &str, limits: Limits) -> io::Result<Self> {
        if !dir.is_dir() {
            fs::create_dir_all(dir)?;
            // Logs name hosts, disks and paths: not for every local user. An existing
            // directory keeps its mode (systemd's LogsDirectoryMode=, the administrator's).
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o750));
        }
        let (file, size) = open_current(&dir.join(format!("{name}.log")))?;
        let mut r = Self {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            limits,
            file,
            size,
            opened: SystemTime::now(),
        };
        r.prune()?;
        Ok(r)
    }

    /// The current file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// Appends one whole line (or event), rotating first when the limits say so.
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        let full = self.size > 0 && self.size.saturating_add(len) > self.limits.max_file_size;
        let old = self.size > 0
            && self.opened.elapsed().unwrap_or(Duration::ZERO) >= self.limits.rotate_interval;
        if full || old {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.size = self.size.saturating_add(len);
        Ok(())
    }

    /// Renames the current file aside, starts a new one and prunes the old ones.
    pub fn rotate(&mut self) -> io::Result<()> {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let current = self.path();
        let aside = self.dir.join(format!("{}.log.{micros:020}", self.name));
        // Another process on the same file (a second receiver) may have rotated it already.
        match fs::rename(&current, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (file, size) = open_current(&current)?;
        self.file = file;
        self.size = size;
        self.opened = SystemTime::now();
        self.prune()
    }

    /// Deletes rotated files past `max_age`, then the oldest until the total fits.
    fn prune(&mut self) -> io::Result<()> {
        let mut rotated = rotated_files(&self.dir, &self.name)?;
        let now = SystemTime::now();
        rotated.retain(|(p, _, mtime)| {
            let expired =
                now.duration_since(*mtime).unwrap_or(Duration::ZERO) > self.limits.max_age;
            !(expired && fs::remove_file(p).is_ok())
        });
        // The current file may grow to max_file_size before the next prune: count it full.
        let current = self.size.max(self.limits.max_file_size);
        let mut total = current + rotated.iter().map(|(_, len, _)| len).sum::<u64>();
        // Oldest first: the names sort by their rotation time.
        for (p, len, _) in &rotated {
            if total <= self.limits.max_total {
                break;
            }
            if fs::remove_file(p).is_ok() {
                total -= len;
            }
        }
        Ok(())
    }
}

/// The files of a log `name` in `dir`, rotated ones oldest first, then the current one.
pub fn log_files(dir: &Path, name: &str) -> io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = rotated_files(dir, name)?
        .into_iter()
        .map(|(p, _, _)| p)
        .collect();
    let cur = dir.join(format!("{name}.log"));
    if cur.is_file() {
        v.push(cur);
    }
    Ok(v)
}

/// Rotated files of `name`: (path, length, mtime), oldest first.
fn rotated_files(dir: &Path, name: &str) -> io::Result<Vec<(PathBuf, u64, SystemTime)>> {
    let prefix = format!("{name}.log.");
    let mut v = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let fname = e.file_name();
        let Some(suffix) = fname.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        v.push((e.path(), meta.len(), meta.modified().unwrap_or(UNIX_EPOCH)));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

fn open_current(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_file_size: 1000,
            rotate_interval: Duration::from_secs(3600),
            max_age: Duration::from_secs(3600),
            max_total: 3500,
        }
    }

    #[test]
    fn rotates_by_size_and_bounds_the_total() {
        let t = tempfile::tempdir().unwrap();
        let mut r = Rotating::open(t.path(), "agent", limits()).unwrap();
        let line = [b'x'; 99]
            .iter()
            .copied()
            .chain([b'\n'])
            .collect::<Vec<_>>();
        for _ in 0..200 {
            r.write_line(&line).unwrap();
        }
        let files = log_files(t.path(), "agent").unwrap();
        let sizes: Vec<u64> = files
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .collect();
        assert!(sizes.iter().all(|s| *s <= 1000), "{sizes:?}");
        assert!(sizes.iter().sum::<u64>() <= 3500, "{sizes:?}");
        // 20,000 bytes written, 3,500 kept: rotation happened and the oldest went.
        assert!(files.len() >= 3, "{files:?}");
        assert_eq!(files.last().unwrap(), &t.path().join("agent.log"));
        // The newest lines survive: the current file holds the last ones written.
        assert!(fs::read_to_string(&files[files.len() - 1])
            .unwrap()
            .ends_with("x\n"));
    }

    #[test]
    fn rotates_by_age_and_drops_expired() {
        let t = tempfile::tempdir().unwrap();
        let l = Limits {
            rotate_interval: Duration::from_millis(50),
            ..limits()
        };
        let mut r = Rotating::open(t.path(), "receive", l).unwrap();
        r.write_line(b"first\n").unwrap();
        std::thread::sleep(Duration::from_millis(80));
        r.write_line(b"second\n").unwrap();
        let files = log_files(t.path(), "receive").unwrap();
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!(fs::read_to_string(&files[0]).unwrap(), "first\n");
        // The rotated file last written two hours ago is past max_age (1 h).
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(&files[0])
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        std::thread::sleep(Duration::from_millis(80));
        r.write_line(b"third\n").unwrap();
        let files = log_files(t.path(), "receive").unwrap();
        let all: String = files
            .iter()
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(all, "second\nthird\n");
        let mode = fs::metadata(t.path().join("receive.log"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }
}
