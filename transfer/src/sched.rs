//! CPU and I/O priority of the transfer threads, and the process CPU clock the CPU-limit pacer
//! reads. These are the few scheduling syscalls nix 0.29 has no safe wrapper for
//! (`setpriority` on one thread, `ioprio_set`/`ioprio_get`, `clock_gettime` of the process
//! CPU clock).
//!
//! The task's `priority` (ref. §5.4.5 line 11252, §5.4.2 line 10279: "进程优先级 0: 低 1: 标准
//! (默认) 2: 高") is applied to the thread that runs a pass; the threads it starts inherit both
//! the nice value and the I/O priority (Linux copies them at `clone`).
#![allow(unsafe_code)]

use std::io;
use std::time::Duration;

use nix::libc;

/// The reference's process priority of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// 0: low. Nice 19 and best-effort I/O level 7 (not `SCHED_IDLE`/`IOPRIO_CLASS_IDLE`:
    /// an idle-class migration of a busy server could starve for good).
    Low,
    /// 1: standard (the default). Nice 0, best-effort I/O level 4 (the kernel's default).
    Standard,
    /// 2: high. Nice -10, best-effort I/O level 0.
    High,
}

impl Priority {
    /// The priority of the task's `priority` value; anything but 0 and 2 is standard
    /// (the reference allows 0..=2 and defaults to 1).
    pub fn from_task(v: Option<i64>) -> Self {
        match v {
            Some(0) => Priority::Low,
            Some(2) => Priority::High,
            _ => Priority::Standard,
        }
    }

    /// The nice value of this priority.
    pub fn nice(self) -> i32 {
        match self {
            Priority::Low => 19,
            Priority::Standard => 0,
            Priority::High => -10,
        }
    }

    /// The best-effort I/O level (0 highest, 7 lowest).
    pub fn io_level(self) -> u16 {
        match self {
            Priority::Low => 7,
            Priority::Standard => 4,
            Priority::High => 0,
        }
    }
}

const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const IOPRIO_CLASS_SHIFT: u16 = 13;
/// Best-effort I/O scheduling class.
pub const IOPRIO_CLASS_BE: u16 = 2;

/// Sets the calling thread's nice value and I/O priority (threads it starts afterwards
/// inherit both). Both are tried; the first error is returned.
pub fn apply_to_current_thread(p: Priority) -> io::Result<()> {
    let nice = set_thread_nice(p.nice());
    let io = set_thread_ioprio(IOPRIO_CLASS_BE, p.io_level());
    nice.and(io)
}

/// Sets the calling thread's nice value.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let who = libc::id_t::try_from(tid).map_err(|_| io::Error::other("negative tid"))?;
    // SAFETY: plain syscall on the calling thread's id; no memory is passed.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the calling thread's I/O priority (`ioprio_set(IOPRIO_WHO_PROCESS, 0, …)`).
pub fn set_thread_ioprio(class: u16, level: u16) -> io::Result<()> {
    let prio = libc::c_int::from((class << IOPRIO_CLASS_SHIFT) | (level & 7));
    // SAFETY: ioprio_set takes three integers; who 0 is the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, prio) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's I/O priority as (class, level).
pub fn thread_ioprio() -> io::Result<(u16, u16)> {
    // SAFETY: ioprio_get takes two integers; who 0 is the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) };
    let v = u16::try_from(r).map_err(|_| io::Error::last_os_error())?;
    Ok((v >> IOPRIO_CLASS_SHIFT, v & 7))
}

/// CPU time used by the whole process so far (all threads, user and system).
pub fn process_cpu_time() -> io::Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &raw mut ts) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of the calling thread, from `/proc/thread-self/stat` (field 19).
    fn proc_nice() -> i32 {
        let s = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after = &s[s.rfind(')').unwrap() + 2..];
        after.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn low_priority_is_applied_and_inherited_by_the_threads_it_starts() {
        std::thread::spawn(|| {
            apply_to_current_thread(Priority::Low).unwrap();
            assert_eq!(proc_nice(), 19);
            assert_eq!(thread_ioprio().unwrap(), (IOPRIO_CLASS_BE, 7));
            // A stream thread started by the pass thread inherits both.
            std::thread::spawn(|| {
                assert_eq!(proc_nice(), 19);
                assert_eq!(thread_ioprio().unwrap(), (IOPRIO_CLASS_BE, 7));
            })
            .join()
            .unwrap();
        })
        .join()
        .unwrap();
        // Other threads are untouched.
        assert_ne!(proc_nice(), 19);
    }

    #[test]
    fn high_priority_needs_privilege_and_says_so_otherwise() {
        std::thread::spawn(|| match apply_to_current_thread(Priority::High) {
            Ok(()) => {
                assert_eq!(proc_nice(), -10);
                assert_eq!(thread_ioprio().unwrap(), (IOPRIO_CLASS_BE, 0));
            }
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
        })
        .join()
        .unwrap();
    }

    #[test]
    fn task_values_map_to_priorities() {
        assert_eq!(Priority::from_task(Some(0)), Priority::Low);
        assert_eq!(Priority::from_task(Some(1)), Priority::Standard);
        assert_eq!(Priority::from_task(None), Priority::Standard);
        assert_eq!(Priority::from_task(Some(2)), Priority::High);
        assert_eq!(Priority::from_task(Some(7)), Priority::Standard);
    }

    #[test]
    fn the_process_cpu_clock_advances_with_work() {
        let a = process_cpu_time().unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_time().unwrap() > a);
    }
}
