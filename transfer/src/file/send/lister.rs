//! The source's lister: walks the roots and writes each item as a listing message on the
//! control stream, numbering entries, queueing regular files as pending jobs and keeping the
//! links and directory times the final phase sends.

use std::cell::RefCell;
use std::io::BufWriter;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use super::{flush, Job, Listed, Pass, Shared, FLUSH_EVERY};
use crate::conn::ConnWriter;
use crate::file::proto::{FileMsg, Meta, PassKind, Time, S_IFDIR, S_IFREG};
use crate::file::walk::{Item, WalkOptions, Walker};
use crate::file::FileError;
use crate::lock;
use crate::task::{Control, Progress};

/// Messages written before the listing is flushed even when [`FLUSH_EVERY`] has not passed.
const FLUSH_COUNT: u32 = 512;

/// Turns walked items into listing messages.
pub(super) struct Lister<'a> {
    kind: PassKind,
    progress: &'a Progress,
    shared: &'a Shared,
    cw: &'a Mutex<BufWriter<ConnWriter>>,
    /// Id of the next entry or directory end.
    next_id: u64,
    /// Index of the root being walked.
    group: usize,
    /// Bytes of regular files listed so far.
    walked: u64,
    last_flush: Instant,
    /// Messages written since the last flush.
    since: u32,
    dirs: Vec<(Vec<u8>, Time, Time)>,
    links: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<'a> Lister<'a> {
    /// A lister writing to `cw`.
    pub(super) fn new(
        kind: PassKind,
        progress: &'a Progress,
        shared: &'a Shared,
        cw: &'a Mutex<BufWriter<ConnWriter>>,
    ) -> Self {
        Lister {
            kind,
            progress,
            shared,
            cw,
            next_id: 0,
            group: 0,
            walked: 0,
            last_flush: Instant::now(),
            since: 0,
            dirs: Vec::new(),
            links: Vec::new(),
        }
    }

    /// Walks every root of `pass`, then ends the listing. A failed walk cuts the control
    /// stream (`cut_ctl`) so that the control reader and the workers end too.
    pub(super) fn run(
        self,
        pass: &Pass<'_>,
        control: &Control,
        cut_ctl: &dyn Fn(),
    ) -> Result<Listed, FileError> {
        let (shared, progress, cw, kind) = (self.shared, self.progress, self.cw, self.kind);
        let cancelled = || control.cancelled() || shared.abort.load(Ordering::Relaxed);
        // Shared between the walker's sink and the loop below, which never run at once.
        let lister = RefCell::new(self);
        let (res, notes, entries) = {
            let mut walker = Walker::new(
                WalkOptions {
                    excludes: pass.excludes,
                    hash: pass.compare == crate::file::proto::Compare::Hash,
                    links_as_entries: kind == PassKind::Check,
                    cancelled: &cancelled,
                },
                |item| lister.borrow_mut().item(item),
            );
            let mut res = Ok(());
            for (i, r) in pass.roots.iter().enumerate() {
                if cancelled() {
                    break;
                }
                let start = lister.borrow_mut().start_root(i);
                lock(&shared.starts).push(start);
                res = match pass.changes.and_then(|c| c.root(&r.src)) {
                    Some(rc) => walker.walk_changes(i, r, rc),
                    None => walker.walk(i, r),
                };
                if res.is_err() {
                    break;
                }
            }
            (res, std::mem::take(&mut walker.notes), walker.entries)
        };
        if let Err(e) = res {
            cut_ctl();
            return Err(e);
        }
        {
            let mut w = lock(cw);
            FileMsg::ListEnd.write_to(&mut *w)?;
            flush(&mut w)?;
        }
        let lister = lister.into_inner();
        let t = Progress::get(&progress.total);
        if lister.walked < t && !cancelled() {
            progress.total.store(lister.walked, Ordering::Relaxed);
        }
        Ok(Listed {
            dirs: lister.dirs,
            links: lister.links,
            notes,
            entries,
        })
    }

    /// Root `index` starts here; returns the id of its first entry.
    fn start_root(&mut self, index: usize) -> u64 {
        self.group = index;
        self.next_id
    }

    /// The walker's sink: one item, one message.
    fn item(&mut self, item: Item<'_>) -> Result<(), FileError> {
        let msg = match item {
            Item::Entry {
                root,
                src_rel,
                rel,
                meta,
                target,
                linked,
                hash,
                key,
                ino,
            } => {
                let id = self.take_id();
                self.count(rel, &meta);
                if meta.kind() == S_IFREG && self.kind == PassKind::Copy {
                    let job = Job {
                        id,
                        root,
                        src_rel: src_rel.to_vec(),
                        meta: meta.clone(),
                        key,
                        ino,
                        sums: None,
                    };
                    lock(&self.shared.pending).insert(id, job);
                }
                FileMsg::Entry {
                    id,
                    path: rel.to_vec(),
                    meta,
                    target,
                    linked,
                    hash,
                }
            }
            Item::Link { rel, target } => {
                self.links.push((rel.to_vec(), target.to_vec()));
                FileMsg::Link {
                    path: rel.to_vec(),
                    target: target.to_vec(),
                }
            }
            Item::Gone { rel } => FileMsg::Gone {
                id: self.take_id(),
                path: rel.to_vec(),
            },
            Item::DirEnd { rel } => FileMsg::DirEnd {
                id: self.take_id(),
                path: rel.to_vec(),
            },
        };
        self.write(&msg)
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Keeps a directory's times for the final phase, counts a checked file, and grows the
    /// progress total as regular files are found.
    fn count(&mut self, rel: &[u8], meta: &Meta) {
        let k = meta.kind();
        if k == S_IFDIR {
            self.dirs.push((rel.to_vec(), meta.atime, meta.mtime));
        } else if self.kind == PassKind::Check {
            if let Some(c) = lock(&self.shared.checks).get_mut(self.group) {
                c.num_total_files += 1;
            }
        }
        if k == S_IFREG {
            self.walked += meta.size;
            let t = Progress::get(&self.progress.total);
            if self.walked > t {
                Progress::add(&self.progress.total, self.walked - t);
            }
        }
    }

    /// Writes `msg`, flushing often enough that the target starts comparing early.
    fn write(&mut self, msg: &FileMsg) -> Result<(), FileError> {
        let mut w = lock(self.cw);
        msg.write_to(&mut *w)?;
        self.since += 1;
        if self.since >= FLUSH_COUNT || self.last_flush.elapsed() >= FLUSH_EVERY {
            flush(&mut w)?;
            self.since = 0;
            self.last_flush = Instant::now();
        }
        Ok(())
    }
}
