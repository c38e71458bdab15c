//! The messages of file mode (wire types 64–127) and their bounded encoding.
//!
//! Streams: the control stream carries the source's listing (`Plan`, `Entry`, `Link`, `DirEnd`,
//! `Gone`, `ListEnd`), the target's answers (`Need`, `Processed`, `Verdict`, `Extra`, `ListDone`) and the
//! final phase (`Finish`, `Link`, `Times`, then the common `Checkpoint`/`Ack`); each data stream
//! carries whole files (`File`, then `Data`/`Copy` and `End` or `Abandon`) and ends with
//! `StreamEnd`. Paths are relative byte strings (not necessarily UTF-8); every length is capped
//! by a named constant before anything is allocated.

use crate::wire::{self, too_long, Reader, WireError, MAX_CHUNK};

/// Longest relative path accepted (Linux `PATH_MAX`): a longer one could not be named by the
/// target's own tools either.
pub const MAX_PATH: usize = 4096;
/// Longest path component (Linux `NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Longest xattr value (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE: usize = 64 << 10;
/// Most xattrs of one entry; Linux lists at most 64 KiB of names, real files have a handful.
pub const MAX_XATTRS: usize = 1024;
/// Most xattr bytes (names and values) of one entry: bounds what one `Entry` can hold.
pub const MAX_XATTR_TOTAL: usize = 1 << 20;
/// Most chunk sums in one `Need` (1 MiB of sums): the target picks its chunk size to fit.
pub const MAX_SUMS: usize = 65_536;
/// Bytes of one chunk sum (a truncated BLAKE3; the data itself is hashed in full on the wire).
pub const SUM_LEN: usize = 16;
/// Most exclude patterns in a plan.
pub const MAX_EXCLUDES: usize = 4096;

/// Wire types of the file messages (all within [`wire::FILE_TYPES`]).
mod kind {
    pub const PLAN: u8 = 64;
    pub const ENTRY: u8 = 65;
    pub const LINK: u8 = 66;
    pub const DIR_END: u8 = 67;
    pub const LIST_END: u8 = 68;
    pub const FINISH: u8 = 69;
    pub const TIMES: u8 = 70;
    pub const GONE: u8 = 71;
    pub const NEED: u8 = 80;
    pub const PROCESSED: u8 = 81;
    pub const LIST_DONE: u8 = 82;
    pub const VERDICT: u8 = 83;
    pub const EXTRA: u8 = 84;
    pub const SUMMARY: u8 = 85;
    pub const FILE: u8 = 96;
    pub const DATA: u8 = 97;
    pub const COPY: u8 = 98;
    pub const END: u8 = 99;
    pub const ABANDON: u8 = 100;
    pub const STREAM_END: u8 = 101;
    pub const KEEP_ALIVE: u8 = 127;
}

/// A time stamp: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    /// Seconds (may be negative).
    pub sec: i64,
    /// Nanoseconds, 0..1e9.
    pub nsec: u32,
}

/// Everything kept of an entry besides its name and contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// `st_mode`: type and permission bits (setuid/setgid/sticky included).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Size in bytes (regular files).
    pub size: u64,
    /// Device number (character and block devices).
    pub rdev: u64,
    /// Access time.
    pub atime: Time,
    /// Modification time.
    pub mtime: Time,
    /// Extended attributes (POSIX ACLs and SELinux labels included), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// File type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Directory.
pub const S_IFDIR: u32 = 0o040_000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;
/// Block device.
pub const S_IFBLK: u32 = 0o060_000;
/// FIFO.
pub const S_IFIFO: u32 = 0o010_000;
/// Socket.
pub const S_IFSOCK: u32 = 0o140_000;

impl Meta {
    /// The file type bits.
    pub fn kind(&self) -> u32 {
        self.mode & S_IFMT
    }
    /// Permission bits including setuid, setgid and sticky.
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// How a pass compares files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// Size and mtime.
    Quick,
    /// Content hash (the source sends the BLAKE3 of every regular file).
    Hash,
}

/// What a session does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// Copy (first copy, sync and resume alike): make the target equal the source.
    Copy,
    /// Consistency check: compare and count, change nothing.
    Check,
}

/// One file-mode message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileMsg {
    /// First message on the control stream: what this pass does.
    Plan {
        /// Copy or check.
        pass: PassKind,
        /// How files are compared.
        compare: Compare,
        /// Whether target entries the source no longer has are deleted.
        delete: bool,
        /// Excluded paths (relative to the target root; a trailing `*` matches a name prefix):
        /// never deleted on the target.
        excludes: Vec<Vec<u8>>,
        /// The source's disk layout, for a target that prepares blank disks
        /// (`receive --prepare`); `None` when the source could not read it.
        layout: Option<Box<super::layout::Layout>>,
    },
    /// One entry of the listing; the empty path is the target root itself.
    Entry {
        /// Sequence number, increasing.
        id: u64,
        /// Relative path.
        path: Vec<u8>,
        /// Metadata.
        meta: Meta,
        /// Symlink target (symlinks only).
        target: Vec<u8>,
        /// Whether other names of this inode follow as `Link`s.
        linked: bool,
        /// BLAKE3 of the contents (regular files in hash mode).
        hash: Option<[u8; 32]>,
    },
    /// `path` is another name of the regular file `target`. In the listing it only claims the
    /// name; after `Finish` the link is made.
    Link {
        /// New name.
        path: Vec<u8>,
        /// Existing name (listed earlier with `linked`).
        target: Vec<u8>,
    },
    /// The listing of directory `path` is complete: the target may delete what it did not name.
    DirEnd {
        /// Sequence number (shares the `Entry` sequence).
        id: u64,
        /// The directory.
        path: Vec<u8>,
    },
    /// Journal pass: `path` changed and no longer exists on the source; the target deletes it
    /// (with everything below it) when the plan deletes.
    Gone {
        /// Sequence number (shares the `Entry` sequence).
        id: u64,
        /// The name that vanished.
        path: Vec<u8>,
    },
    /// The listing is complete.
    ListEnd,
    /// All data has been sent; the final phase follows.
    Finish,
    /// Final times of a directory (set last, after its contents changed).
    Times {
        /// Directory.
        path: Vec<u8>,
        /// Access time.
        atime: Time,
        /// Modification time.
        mtime: Time,
    },
    /// Target: send the contents of entry `id`; with `sums`, the target has an older copy
    /// whose chunks of `chunk_size` bytes hash to these.
    Need {
        /// Entry.
        id: u64,
        /// Chunk size of the sums (0 without sums).
        chunk_size: u32,
        /// Truncated BLAKE3 per chunk.
        sums: Vec<[u8; SUM_LEN]>,
    },
    /// Target: entries up to `upto` are handled; those not needed are up to date.
    Processed {
        /// Last handled sequence number.
        upto: u64,
    },
    /// Target: the whole listing is handled.
    ListDone,
    /// Target (check pass): entry `id` differs (`missing` false) or is missing on the target.
    Verdict {
        /// Entry.
        id: u64,
        /// Missing rather than different.
        missing: bool,
    },
    /// Target (check pass): the target has `count` files under the directory of `DirEnd` `id`
    /// that the source does not.
    Extra {
        /// The `DirEnd`.
        id: u64,
        /// Files.
        count: u64,
    },
    /// Target: totals of the session, sent before the final `Ack`.
    Summary {
        /// Regular files written.
        written: u64,
        /// Entries deleted.
        deleted: u64,
        /// Entries whose metadata was updated in place.
        updated: u64,
    },
    /// Data stream: a file. With `complete`, `data` is all of it; otherwise `Data`/`Copy`
    /// messages and `End` follow.
    File {
        /// Entry.
        id: u64,
        /// Relative path.
        path: Vec<u8>,
        /// Metadata to apply before the file takes its name.
        meta: Meta,
        /// Whether `data` is the whole file.
        complete: bool,
        /// BLAKE3 of the plain `data`.
        hash: [u8; 32],
        /// Whether `data` is zstd-compressed.
        compressed: bool,
        /// Uncompressed length of `data`.
        len: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Data stream: `len` plain bytes at `offset` of the current file.
    Data {
        /// Offset.
        offset: u64,
        /// Uncompressed length.
        len: u32,
        /// BLAKE3 of the plain bytes.
        hash: [u8; 32],
        /// Whether `data` is zstd-compressed.
        compressed: bool,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Data stream: the target's older copy has these bytes already; copy them.
    Copy {
        /// Offset (same in both copies).
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Data stream: the current file is complete. `changed`: it changed while it was read
    /// (the target keeps it under the old mtime so the next pass sends it again).
    End {
        /// Changed while read.
        changed: bool,
    },
    /// Data stream: drop the current file (it vanished or could not be read).
    Abandon,
    /// Data stream: nothing more on this stream.
    StreamEnd,
    /// Any stream, either way: nothing to say, but alive (sent when a side is legitimately
    /// quiet, so the other's peer timeout only catches a dead or stopped peer). [`read_any`]
    /// skips it.
    KeepAlive,
}

/// Appends a length-prefixed (u16) byte string of at most `max` bytes.
fn put_bytes(p: &mut Vec<u8>, what: &'static str, b: &[u8], max: usize) -> Result<(), WireError> {
    if b.len() > max {
        return Err(too_long(what, b.len(), max));
    }
    let n = u16::try_from(b.len()).map_err(|_| WireError::Invalid(what))?;
    p.extend_from_slice(&n.to_be_bytes());
    p.extend_from_slice(b);
    Ok(())
}

fn get_bytes(r: &mut Reader<'_>, what: &'static str, max: usize) -> Result<Vec<u8>, WireError> {
    let n = usize::from(r.u16(what)?);
    if n > max {
        return Err(too_long(what, n, max));
    }
    Ok(r.take(n, what)?.to_vec())
}

fn put_time(p: &mut Vec<u8>, t: Time) {
    p.extend_from_slice(&t.sec.to_be_bytes());
    p.extend_from_slice(&t.nsec.to_be_bytes());
}

fn get_time(r: &mut Reader<'_>, what: &'static str) -> Result<Time, WireError> {
    let sec = i64::from_be_bytes(r.u64(what)?.to_be_bytes());
    let nsec = r.u32(what)?;
    if nsec >= 1_000_000_000 {
        return Err(WireError::Invalid(what));
    }
    Ok(Time { sec, nsec })
}

fn put_meta(p: &mut Vec<u8>, m: &Meta) -> Result<(), WireError> {
    p.extend_from_slice(&m.mode.to_be_bytes());
    p.extend_from_slice(&m.uid.to_be_bytes());
    p.extend_from_slice(&m.gid.to_be_bytes());
    p.extend_from_slice(&m.size.to_be_bytes());
    p.extend_from_slice(&m.rdev.to_be_bytes());
    put_time(p, m.atime);
    put_time(p, m.mtime);
    if m.xattrs.len() > MAX_XATTRS {
        return Err(too_long("xattrs", m.xattrs.len(), MAX_XATTRS));
    }
    let total: usize = m.xattrs.iter().map(|(n, v)| n.len() + v.len()).sum();
    if total > MAX_XATTR_TOTAL {
        return Err(too_long("xattr bytes", total, MAX_XATTR_TOTAL));
    }
    let n = u16::try_from(m.xattrs.len()).map_err(|_| WireError::Invalid("xattrs"))?;
    p.extend_from_slice(&n.to_be_bytes());
    for (name, value) in &m.xattrs {
        put_bytes(p, "xattr name", name, MAX_NAME)?;
        if value.len() > MAX_XATTR_VALUE {
            return Err(too_long("xattr value", value.len(), MAX_XATTR_VALUE));
        }
        let vl = u32::try_from(value.len()).map_err(|_| WireError::Invalid("xattr value"))?;
        p.extend_from_slice(&vl.to_be_bytes());
        p.extend_from_slice(value);
    }
    Ok(())
}

fn get_meta(r: &mut Reader<'_>) -> Result<Meta, WireError> {
    let mode = r.u32("mode")?;
    let uid = r.u32("uid")?;
    let gid = r.u32("gid")?;
    let size = r.u64("size")?;
    let rdev = r.u64("rdev")?;
    let atime = get_time(r, "atime")?;
    let mtime = get_time(r, "mtime")?;
    let n = usize::from(r.u16("xattrs")?);
    if n > MAX_XATTRS {
        return Err(too_long("xattrs", n, MAX_XATTRS));
    }
    let mut xattrs = Vec::with_capacity(n);
    let mut total = 0usize;
    for _ in 0..n {
        let name = get_bytes(r, "xattr name", MAX_NAME)?;
        if name.is_empty() || name.contains(&0) {
            return Err(WireError::Invalid("xattr name"));
        }
        let vl = usize::try_from(r.u32("xattr value")?).unwrap_or(usize::MAX);
        if vl > MAX_XATTR_VALUE {
            return Err(too_long("xattr value", vl, MAX_XATTR_VALUE));
        }
        total += name.len() + vl;
        if total > MAX_XATTR_TOTAL {
            return Err(too_long("xattr bytes", total, MAX_XATTR_TOTAL));
        }
        let value = r.take(vl, "xattr value")?.to_vec();
        xattrs.push((name, value));
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        size,
        rdev,
        atime,
        mtime,
        xattrs,
    })
}

/// Checks a data field: at most [`MAX_CHUNK`] plain bytes; uncompressed data must be `len`.
fn check_data(len: u32, compressed: bool, data: &[u8]) -> Result<(), WireError> {
    let l = len as usize;
    if l > MAX_CHUNK || data.len() > MAX_CHUNK {
        return Err(too_long("file data", l.max(data.len()), MAX_CHUNK));
    }
    if !compressed && data.len() != l {
        return Err(WireError::Invalid("file data length"));
    }
    Ok(())
}

impl FileMsg {
    /// The wire type.
    pub fn kind(&self) -> u8 {
        match self {
            FileMsg::Plan { .. } => kind::PLAN,
            FileMsg::Entry { .. } => kind::ENTRY,
            FileMsg::Link { .. } => kind::LINK,
            FileMsg::DirEnd { .. } => kind::DIR_END,
            FileMsg::Gone { .. } => kind::GONE,
            FileMsg::ListEnd => kind::LIST_END,
            FileMsg::Finish => kind::FINISH,
            FileMsg::Times { .. } => kind::TIMES,
            FileMsg::Need { .. } => kind::NEED,
            FileMsg::Processed { .. } => kind::PROCESSED,
            FileMsg::ListDone => kind::LIST_DONE,
            FileMsg::Verdict { .. } => kind::VERDICT,
            FileMsg::Extra { .. } => kind::EXTRA,
            FileMsg::Summary { .. } => kind::SUMMARY,
            FileMsg::File { .. } => kind::FILE,
            FileMsg::Data { .. } => kind::DATA,
            FileMsg::Copy { .. } => kind::COPY,
            FileMsg::End { .. } => kind::END,
            FileMsg::Abandon => kind::ABANDON,
            FileMsg::StreamEnd => kind::STREAM_END,
            FileMsg::KeepAlive => kind::KEEP_ALIVE,
        }
    }

    /// A short name for logs and error texts (never the data).
    pub fn name(&self) -> &'static str {
        match self {
            FileMsg::Plan { .. } => "Plan",
            FileMsg::Entry { .. } => "Entry",
            FileMsg::Link { .. } => "Link",
            FileMsg::DirEnd { .. } => "DirEnd",
            FileMsg::Gone { .. } => "Gone",
            FileMsg::ListEnd => "ListEnd",
            FileMsg::Finish => "Finish",
            FileMsg::Times { .. } => "Times",
            FileMsg::Need { .. } => "Need",
            FileMsg::Processed { .. } => "Processed",
            FileMsg::ListDone => "ListDone",
            FileMsg::Verdict { .. } => "Verdict",
            FileMsg::Extra { .. } => "Extra",
            FileMsg::Summary { .. } => "Summary",
            FileMsg::File { .. } => "File",
            FileMsg::Data { .. } => "Data",
            FileMsg::Copy { .. } => "Copy",
            FileMsg::End { .. } => "End",
            FileMsg::Abandon => "Abandon",
            FileMsg::StreamEnd => "StreamEnd",
            FileMsg::KeepAlive => "KeepAlive",
        }
    }

    /// The payload (without the frame header).
    pub fn payload(&self) -> Result<Vec<u8>, WireError> {
        // Sized up front: growing by doubling copied a file's data about twice more.
        let data = match self {
            FileMsg::File { path, data, .. } => path.len() + data.len(),
            FileMsg::Data { data, .. } => data.len(),
            _ => 0,
        };
        let mut p = Vec::with_capacity(data + 256);
        match self {
            FileMsg::Plan {
                pass,
                compare,
                delete,
                excludes,
                layout,
            } => {
                put_plan(&mut p, *pass, *compare, *delete, excludes)?;
                put_layout(&mut p, layout.as_deref())?;
            }
            FileMsg::Entry {
                id,
                path,
                meta,
                target,
                linked,
                hash,
            } => {
                p.extend_from_slice(&id.to_be_bytes());
                put_bytes(&mut p, "path", path, MAX_PATH)?;
                put_meta(&mut p, meta)?;
                put_bytes(&mut p, "symlink target", target, MAX_PATH)?;
                p.push(u8::from(*linked));
                match hash {
                    Some(h) => {
                        p.push(1);
                        p.extend_from_slice(h);
                    }
                    None => p.push(0),
                }
            }
            FileMsg::Link { path, target } => {
                put_bytes(&mut p, "path", path, MAX_PATH)?;
                put_bytes(&mut p, "link target", target, MAX_PATH)?;
            }
            FileMsg::DirEnd { id, path } | FileMsg::Gone { id, path } => {
                p.extend_from_slice(&id.to_be_bytes());
                put_bytes(&mut p, "path", path, MAX_PATH)?;
            }
            FileMsg::ListEnd
            | FileMsg::Finish
            | FileMsg::ListDone
            | FileMsg::Abandon
            | FileMsg::StreamEnd
            | FileMsg::KeepAlive => {}
            FileMsg::Times { path, atime, mtime } => {
                put_bytes(&mut p, "path", path, MAX_PATH)?;
                put_time(&mut p, *atime);
                put_time(&mut p, *mtime);
            }
            FileMsg::Need {
                id,
                chunk_size,
                sums,
            } => put_need(&mut p, *id, *chunk_size, sums)?,
            FileMsg::Processed { upto } => p.extend_from_slice(&upto.to_be_bytes()),
            FileMsg::Verdict { id, missing } => {
                p.extend_from_slice(&id.to_be_bytes());
                p.push(u8::from(*missing));
            }
            FileMsg::Extra { id, count } => {
                p.extend_from_slice(&id.to_be_bytes());
                p.extend_from_slice(&count.to_be_bytes());
            }
            FileMsg::Summary {
                written,
                deleted,
                updated,
            } => {
                p.extend_from_slice(&written.to_be_bytes());
                p.extend_from_slice(&deleted.to_be_bytes());
                p.extend_from_slice(&updated.to_be_bytes());
            }
            FileMsg::File {
                id,
                path,
                meta,
                complete,
                hash,
                compressed,
                len,
                data,
            } => {
                check_data(*len, *compressed, data)?;
                p.extend_from_slice(&id.to_be_bytes());
                put_bytes(&mut p, "path", path, MAX_PATH)?;
                put_meta(&mut p, meta)?;
                p.push(u8::from(*complete));
                p.extend_from_slice(hash);
                p.push(u8::from(*compressed));
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(data);
            }
            FileMsg::Data {
                offset,
                len,
                hash,
                compressed,
                data,
            } => {
                check_data(*len, *compressed, data)?;
                p.reserve(45 + data.len());
                p.extend_from_slice(&offset.to_be_bytes());
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(hash);
                p.push(u8::from(*compressed));
                p.extend_from_slice(data);
            }
            FileMsg::Copy { offset, len } => {
                p.extend_from_slice(&offset.to_be_bytes());
                p.extend_from_slice(&len.to_be_bytes());
            }
            FileMsg::End { changed } => p.push(u8::from(*changed)),
        }
        if p.len() > wire::MAX_PAYLOAD {
            return Err(too_long("frame payload", p.len(), wire::MAX_PAYLOAD));
        }
        Ok(p)
    }

    /// Writes the frame to `w`.
    pub fn write_to(&self, w: &mut impl std::io::Write) -> Result<(), WireError> {
        wire::write_frame(w, self.kind(), &self.payload()?)
    }

    /// Decodes the payload of a frame of type `kind` (one of [`wire::FILE_TYPES`]).
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let m = match kind {
            kind::PLAN => decode_plan(&mut r)?,
            kind::ENTRY => decode_entry(&mut r)?,
            kind::LINK => FileMsg::Link {
                path: get_bytes(&mut r, "path", MAX_PATH)?,
                target: get_bytes(&mut r, "link target", MAX_PATH)?,
            },
            kind::DIR_END => FileMsg::DirEnd {
                id: r.u64("id")?,
                path: get_bytes(&mut r, "path", MAX_PATH)?,
            },
            kind::GONE => FileMsg::Gone {
                id: r.u64("id")?,
                path: get_bytes(&mut r, "path", MAX_PATH)?,
            },
            kind::LIST_END => FileMsg::ListEnd,
            kind::FINISH => FileMsg::Finish,
            kind::TIMES => FileMsg::Times {
                path: get_bytes(&mut r, "path", MAX_PATH)?,
                atime: get_time(&mut r, "atime")?,
                mtime: get_time(&mut r, "mtime")?,
            },
            kind::NEED => decode_need(&mut r)?,
            kind::PROCESSED => FileMsg::Processed {
                upto: r.u64("upto")?,
            },
            kind::LIST_DONE => FileMsg::ListDone,
            kind::VERDICT => FileMsg::Verdict {
                id: r.u64("id")?,
                missing: r.bool("missing")?,
            },
            kind::EXTRA => FileMsg::Extra {
                id: r.u64("id")?,
                count: r.u64("count")?,
            },
            kind::SUMMARY => FileMsg::Summary {
                written: r.u64("written")?,
                deleted: r.u64("deleted")?,
                updated: r.u64("updated")?,
            },
            kind::FILE => decode_file(&mut r)?,
            kind::DATA => decode_data(&mut r)?,
            kind::COPY => FileMsg::Copy {
                offset: r.u64("offset")?,
                len: r.u32("length")?,
            },
            kind::END => FileMsg::End {
                changed: r.bool("changed")?,
            },
            kind::ABANDON => FileMsg::Abandon,
            kind::STREAM_END => FileMsg::StreamEnd,
            kind::KEEP_ALIVE => FileMsg::KeepAlive,
            other => return Err(WireError::Type(other)),
        };
        r.finish()?;
        Ok(m)
    }
}

/// A `Plan`'s fields.
fn decode_plan(r: &mut Reader<'_>) -> Result<FileMsg, WireError> {
    let pass = match r.u8("pass")? {
        0 => PassKind::Copy,
        1 => PassKind::Check,
        _ => return Err(WireError::Invalid("pass")),
    };
    let compare = match r.u8("compare")? {
        0 => Compare::Quick,
        1 => Compare::Hash,
        _ => return Err(WireError::Invalid("compare")),
    };
    let delete = r.bool("delete")?;
    let n = usize::from(r.u16("excludes")?);
    if n > MAX_EXCLUDES {
        return Err(too_long("excludes", n, MAX_EXCLUDES));
    }
    let mut excludes = Vec::with_capacity(n);
    for _ in 0..n {
        excludes.push(get_bytes(r, "exclude", MAX_PATH)?);
    }
    let layout = if r.bool("layout flag")? {
        let n = usize::try_from(r.u32("layout")?).unwrap_or(usize::MAX);
        if n > super::layout::MAX_LAYOUT {
            return Err(too_long("layout", n, super::layout::MAX_LAYOUT));
        }
        let json = r.take(n, "layout")?;
        let l: super::layout::Layout =
            serde_json::from_slice(json).map_err(|_| WireError::Invalid("layout"))?;
        // One encoding per message: only the JSON this build writes (no spaces, fields in
        // order, none missing or unknown) is taken.
        if serde_json::to_vec(&l).ok().as_deref() != Some(json) {
            return Err(WireError::Invalid("layout"));
        }
        Some(Box::new(l))
    } else {
        None
    };
    Ok(FileMsg::Plan {
        pass,
        compare,
        delete,
        excludes,
        layout,
    })
}

/// An `Entry`'s fields.
fn decode_entry(r: &mut Reader<'_>) -> Result<FileMsg, WireError> {
    let id = r.u64("id")?;
    let path = get_bytes(r, "path", MAX_PATH)?;
    let meta = get_meta(r)?;
    let target = get_bytes(r, "symlink target", MAX_PATH)?;
    let linked = r.bool("linked")?;
    let hash = if r.bool("hash flag")? {
        Some(r.hash32("hash")?)
    } else {
        None
    };
    Ok(FileMsg::Entry {
        id,
        path,
        meta,
        target,
        linked,
        hash,
    })
}

/// A `Need`'s fields.
fn decode_need(r: &mut Reader<'_>) -> Result<FileMsg, WireError> {
    let id = r.u64("id")?;
    let chunk_size = r.u32("chunk size")?;
    let n = usize::try_from(r.u32("sums")?).unwrap_or(usize::MAX);
    if n > MAX_SUMS {
        return Err(too_long("sums", n, MAX_SUMS));
    }
    if n > 0 && (chunk_size == 0 || chunk_size as usize > MAX_CHUNK) {
        return Err(WireError::Invalid("chunk size"));
    }
    // Checked before allocating: the count must match the bytes present.
    if n.saturating_mul(SUM_LEN) > r.remaining() {
        return Err(WireError::Truncated("sums"));
    }
    let mut sums = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = [0u8; SUM_LEN];
        s.copy_from_slice(r.take(SUM_LEN, "sum")?);
        sums.push(s);
    }
    Ok(FileMsg::Need {
        id,
        chunk_size,
        sums,
    })
}

/// A `File`'s fields.
fn decode_file(r: &mut Reader<'_>) -> Result<FileMsg, WireError> {
    let id = r.u64("id")?;
    let path = get_bytes(r, "path", MAX_PATH)?;
    let meta = get_meta(r)?;
    let complete = r.bool("complete")?;
    let hash = r.hash32("hash")?;
    let compressed = r.bool("compressed")?;
    let len = r.u32("length")?;
    let data = r.rest().to_vec();
    check_data(len, compressed, &data)?;
    Ok(FileMsg::File {
        id,
        path,
        meta,
        complete,
        hash,
        compressed,
        len,
        data,
    })
}

/// A `Data`'s fields.
fn decode_data(r: &mut Reader<'_>) -> Result<FileMsg, WireError> {
    let offset = r.u64("offset")?;
    let len = r.u32("length")?;
    let hash = r.hash32("hash")?;
    let compressed = r.bool("compressed")?;
    let data = r.rest().to_vec();
    check_data(len, compressed, &data)?;
    Ok(FileMsg::Data {
        offset,
        len,
        hash,
        compressed,
        data,
    })
}

/// A `Plan`'s fields.
fn put_plan(
    p: &mut Vec<u8>,
    pass: PassKind,
    compare: Compare,
    delete: bool,
    excludes: &[Vec<u8>],
) -> Result<(), WireError> {
    p.push(match pass {
        PassKind::Copy => 0,
        PassKind::Check => 1,
    });
    p.push(match compare {
        Compare::Quick => 0,
        Compare::Hash => 1,
    });
    p.push(u8::from(delete));
    if excludes.len() > MAX_EXCLUDES {
        return Err(too_long("excludes", excludes.len(), MAX_EXCLUDES));
    }
    let n = u16::try_from(excludes.len()).map_err(|_| WireError::Invalid("excludes"))?;
    p.extend_from_slice(&n.to_be_bytes());
    for e in excludes {
        put_bytes(p, "exclude", e, MAX_PATH)?;
    }
    Ok(())
}

/// A `Plan`'s layout: a flag, then its JSON with a u32 length.
fn put_layout(p: &mut Vec<u8>, layout: Option<&super::layout::Layout>) -> Result<(), WireError> {
    let Some(l) = layout else {
        p.push(0);
        return Ok(());
    };
    let json = serde_json::to_vec(l).map_err(|_| WireError::Invalid("layout"))?;
    if json.len() > super::layout::MAX_LAYOUT {
        return Err(too_long("layout", json.len(), super::layout::MAX_LAYOUT));
    }
    p.push(1);
    let n = u32::try_from(json.len()).map_err(|_| WireError::Invalid("layout"))?;
    p.extend_from_slice(&n.to_be_bytes());
    p.extend_from_slice(&json);
    Ok(())
}

/// A `Need`'s fields.
fn put_need(
    p: &mut Vec<u8>,
    id: u64,
    chunk_size: u32,
    sums: &[[u8; SUM_LEN]],
) -> Result<(), WireError> {
    if sums.len() > MAX_SUMS {
        return Err(too_long("sums", sums.len(), MAX_SUMS));
    }
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&chunk_size.to_be_bytes());
    let n = u32::try_from(sums.len()).map_err(|_| WireError::Invalid("sums"))?;
    p.extend_from_slice(&n.to_be_bytes());
    for s in sums {
        p.extend_from_slice(s);
    }
    Ok(())
}

impl FileMsg {
    /// A `File` message carrying all of a small file, uncompressed, with its hash.
    pub fn whole_file(
        id: u64,
        path: Vec<u8>,
        meta: Meta,
        data: Vec<u8>,
    ) -> Result<Self, WireError> {
        let len = u32::try_from(data.len()).map_err(|_| WireError::Invalid("file data"))?;
        check_data(len, false, &data)?;
        Ok(FileMsg::File {
            id,
            path,
            meta,
            complete: true,
            hash: *blake3::hash(&data).as_bytes(),
            compressed: false,
            len,
            data,
        })
    }
}

/// Either kind of message a file-mode stream carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Any {
    /// A file-mode message.
    File(FileMsg),
    /// A message common to both modes (Error, Checkpoint, Ack, Bye…).
    Common(wire::Message),
}

/// Reads the next frame that is not a [`FileMsg::KeepAlive`] and decodes it with the decoder
/// its type belongs to. Each keep-alive read restarts the socket's read timeout.
pub fn read_any(r: &mut impl std::io::Read) -> Result<Any, WireError> {
    loop {
        let (kind, payload) = wire::read_frame(r)?;
        if kind == self::kind::KEEP_ALIVE {
            FileMsg::decode(kind, &payload)?;
            continue;
        }
        return if wire::FILE_TYPES.contains(&kind) {
            FileMsg::decode(kind, &payload).map(Any::File)
        } else {
            wire::Message::decode(kind, &payload).map(Any::Common)
        };
    }
}

/// Compresses file data with zstd when a probe says it may pay and it then saves a tenth; the
/// decision is per file or chunk, since neighbouring files share nothing.
#[derive(Debug, Default)]
pub struct Packer {
    zstd: crate::chunk::Zstd,
}

impl Packer {
    /// The compressed form of `data`, or `None` to send it as it is (always when compression
    /// is not `wanted` now).
    pub fn pack(&mut self, data: &[u8], wanted: bool) -> Option<Vec<u8>> {
        if !wanted || !self.zstd.promising(data) {
            return None;
        }
        self.zstd.shrink(data)
    }

    /// The plain bytes of a data field, checked against its BLAKE3; `None` when corrupt.
    pub fn unpack(
        &mut self,
        len: u32,
        hash: &[u8; 32],
        compressed: bool,
        data: Vec<u8>,
    ) -> Option<Vec<u8>> {
        let plain = if compressed {
            self.zstd.expand(&data, len as usize)?
        } else {
            data
        };
        (plain.len() == len as usize && blake3::hash(&plain).as_bytes() == hash).then_some(plain)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            mode: S_IFREG | 0o4755,
            uid: 1000,
            gid: 65534,
            size: 10 << 30,
            rdev: 0x0801,
            atime: Time { sec: -5, nsec: 1 },
            mtime: Time {
                sec: 1_700_000_000,
                nsec: 999_999_999,
            },
            xattrs: vec![
                (b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0]),
                (
                    b"security.selinux".to_vec(),
                    b"system_u:object_r:etc_t:s0\0".to_vec(),
                ),
            ],
        }
    }

    fn samples() -> Vec<FileMsg> {
        vec![
            FileMsg::Plan {
                pass: PassKind::Copy,
                compare: Compare::Hash,
                delete: true,
                excludes: vec![b"proc".to_vec(), b"tmp/_MEI*".to_vec()],
                layout: Some(Box::new(crate::file::layout::Layout {
                    disks: vec![crate::file::layout::Disk {
                        name: "disk0".into(),
                        size: 1 << 30,
                        table: crate::file::layout::Table::None,
                        parts: vec![],
                        whole: None,
                    }],
                })),
            },
            FileMsg::Plan {
                pass: PassKind::Check,
                compare: Compare::Quick,
                delete: false,
                excludes: vec![],
                layout: None,
            },
            FileMsg::Entry {
                id: 7,
                path: b"etc/\xff\xfe-not-utf8".to_vec(),
                meta: meta(),
                target: vec![],
                linked: true,
                hash: Some([9; 32]),
            },
            FileMsg::Entry {
                id: 0,
                path: vec![],
                meta: Meta::default(),
                target: b"../x".to_vec(),
                linked: false,
                hash: None,
            },
            FileMsg::Link {
                path: b"a/b".to_vec(),
                target: b"c".to_vec(),
            },
            FileMsg::DirEnd {
                id: 3,
                path: b"usr".to_vec(),
            },
            FileMsg::Gone {
                id: 4,
                path: b"usr/old".to_vec(),
            },
            FileMsg::ListEnd,
            FileMsg::Finish,
            FileMsg::Times {
                path: b"d".to_vec(),
                atime: Time { sec: 1, nsec: 2 },
                mtime: Time { sec: 3, nsec: 4 },
            },
            FileMsg::Need {
                id: 5,
                chunk_size: 1 << 20,
                sums: vec![[1; SUM_LEN], [2; SUM_LEN]],
            },
            FileMsg::Need {
                id: 6,
                chunk_size: 0,
                sums: vec![],
            },
            FileMsg::Processed { upto: u64::MAX },
            FileMsg::ListDone,
            FileMsg::Verdict {
                id: 1,
                missing: true,
            },
            FileMsg::Extra { id: 2, count: 3 },
            FileMsg::Summary {
                written: 1,
                deleted: 2,
                updated: 3,
            },
            FileMsg::File {
                id: 1,
                path: b"f".to_vec(),
                meta: meta(),
                complete: true,
                hash: [4; 32],
                compressed: false,
                len: 3,
                data: b"abc".to_vec(),
            },
            FileMsg::Data {
                offset: 1 << 33,
                len: 1 << 20,
                hash: [5; 32],
                compressed: true,
                data: vec![1, 2, 3],
            },
            FileMsg::Copy {
                offset: 4096,
                len: 4096,
            },
            FileMsg::End { changed: true },
            FileMsg::Abandon,
            FileMsg::StreamEnd,
        ]
    }

    #[test]
    fn every_message_round_trips_and_mixes_with_common_messages() {
        let mut buf = Vec::new();
        for m in samples() {
            m.write_to(&mut buf).unwrap();
            wire::Message::Ack { upto: 1 }.write_to(&mut buf).unwrap();
        }
        let mut r = &buf[..];
        for m in samples() {
            assert_eq!(read_any(&mut r).unwrap(), Any::File(m));
            assert_eq!(
                read_any(&mut r).unwrap(),
                Any::Common(wire::Message::Ack { upto: 1 })
            );
        }
        assert!(r.is_empty());
        for m in samples() {
            assert!(wire::FILE_TYPES.contains(&m.kind()), "{}", m.name());
        }
    }

    #[test]
    fn a_plan_layout_has_one_encoding() {
        let plan = |json: &[u8]| {
            let mut p = vec![0, 0, 0, 0, 0, 1];
            p.extend_from_slice(&u32::try_from(json.len()).unwrap().to_be_bytes());
            p.extend_from_slice(json);
            FileMsg::decode(kind::PLAN, &p)
        };
        let good = br#"{"disks":[]}"#;
        assert!(matches!(
            plan(good),
            Ok(FileMsg::Plan {
                layout: Some(_),
                ..
            })
        ));
        for bad in [
            &br#"{ "disks": [] }"#[..],
            br#"{"disks":[],"x":1}"#,
            b"{}",
            b"[1",
        ] {
            assert!(
                matches!(plan(bad), Err(WireError::Invalid("layout"))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn keep_alives_are_skipped_wherever_they_come() {
        assert!(wire::FILE_TYPES.contains(&FileMsg::KeepAlive.kind()));
        let mut buf = Vec::new();
        FileMsg::KeepAlive.write_to(&mut buf).unwrap();
        FileMsg::ListEnd.write_to(&mut buf).unwrap();
        FileMsg::KeepAlive.write_to(&mut buf).unwrap();
        FileMsg::KeepAlive.write_to(&mut buf).unwrap();
        wire::Message::Bye.write_to(&mut buf).unwrap();
        FileMsg::KeepAlive.write_to(&mut buf).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_any(&mut r).unwrap(), Any::File(FileMsg::ListEnd));
        assert_eq!(read_any(&mut r).unwrap(), Any::Common(wire::Message::Bye));
        // Only keep-alives left: the stream ends like an empty one.
        assert!(read_any(&mut r).is_err());
        assert_eq!(
            FileMsg::decode(FileMsg::KeepAlive.kind(), &[]).unwrap(),
            FileMsg::KeepAlive
        );
        assert!(FileMsg::decode(FileMsg::KeepAlive.kind(), &[0]).is_err());
    }

    #[test]
    fn limits_hold_on_both_sides() {
        let long = vec![b'a'; MAX_PATH + 1];
        assert!(FileMsg::Link {
            path: long.clone(),
            target: vec![]
        }
        .payload()
        .is_err());
        // A hand-made Link whose path is longer than the limit.
        let mut p = Vec::new();
        p.extend_from_slice(&((MAX_PATH + 1) as u16).to_be_bytes());
        p.extend_from_slice(&long);
        p.extend_from_slice(&0u16.to_be_bytes());
        assert!(matches!(
            FileMsg::decode(kind::LINK, &p),
            Err(WireError::TooLong { .. })
        ));
        // Xattrs: too many, too big.
        let mut m = meta();
        m.xattrs = vec![(b"user.x".to_vec(), vec![0; MAX_XATTR_VALUE + 1])];
        assert!(put_meta(&mut Vec::new(), &m).is_err());
        m.xattrs = (0..=MAX_XATTRS)
            .map(|i| (format!("user.{i}").into_bytes(), vec![]))
            .collect();
        assert!(put_meta(&mut Vec::new(), &m).is_err());
        // A Need announcing more sums than it carries is refused before allocating.
        let mut p = Vec::new();
        p.extend_from_slice(&1u64.to_be_bytes());
        p.extend_from_slice(&(1u32 << 20).to_be_bytes());
        p.extend_from_slice(&(MAX_SUMS as u32).to_be_bytes());
        assert_eq!(
            FileMsg::decode(kind::NEED, &p),
            Err(WireError::Truncated("sums"))
        );
        // Uncompressed data of the wrong length, nanoseconds out of range.
        let mut f = FileMsg::Data {
            offset: 0,
            len: 3,
            hash: [0; 32],
            compressed: false,
            data: b"abc".to_vec(),
        }
        .payload()
        .unwrap();
        f.pop();
        assert_eq!(
            FileMsg::decode(kind::DATA, &f),
            Err(WireError::Invalid("file data length"))
        );
        let mut t = FileMsg::Times {
            path: vec![],
            atime: Time::default(),
            mtime: Time::default(),
        }
        .payload()
        .unwrap();
        let n = t.len();
        t[n - 4..].copy_from_slice(&1_000_000_000u32.to_be_bytes());
        assert_eq!(
            FileMsg::decode(kind::TIMES, &t),
            Err(WireError::Invalid("mtime"))
        );
    }

    #[test]
    fn random_payloads_never_panic() {
        let mut x = 0x5EED_F11Eu64;
        let seeds: Vec<Vec<u8>> = samples().iter().map(|m| m.payload().unwrap()).collect();
        for i in 0..30_000 {
            crate::testutil::xorshift(&mut x);
            let kind = 64 + (x >> 8) as u8 % 40;
            let payload: Vec<u8> = if i % 2 == 0 {
                let len = (x % 128) as usize;
                (0..len).map(|j| (x >> (j % 56)) as u8).collect()
            } else {
                // Mutate a valid payload: flip one byte.
                let mut p = seeds[(x as usize >> 3) % seeds.len()].clone();
                if !p.is_empty() {
                    let at = (x as usize >> 11) % p.len();
                    p[at] ^= (x >> 20) as u8 | 1;
                }
                p
            };
            if let Ok(m) = FileMsg::decode(kind, &payload) {
                assert_eq!(m.kind(), kind);
                assert_eq!(m.payload().unwrap(), payload);
            }
        }
    }

    #[test]
    fn packer_compresses_text_and_unpack_checks_hashes() {
        let mut p = Packer::default();
        let text = b"hello world ".repeat(1000);
        let d = p.pack(&text, true).unwrap();
        assert!(p.pack(&text, false).is_none());
        assert!(d.len() < text.len());
        let h = *blake3::hash(&text).as_bytes();
        let len = text.len() as u32;
        assert_eq!(p.unpack(len, &h, true, d.clone()).unwrap(), text);
        assert!(p.unpack(len, &[0; 32], true, d.clone()).is_none());
        assert!(p.unpack(len - 1, &h, true, d).is_none());
        assert_eq!(
            p.unpack(3, blake3::hash(b"abc").as_bytes(), false, b"abc".to_vec()),
            Some(b"abc".to_vec())
        );
        assert!(p
            .unpack(2, blake3::hash(b"abc").as_bytes(), false, b"abc".to_vec())
            .is_none());
    }
}
