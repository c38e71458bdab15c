//! The kernel's counters of one TCP connection (`getsockopt(TCP_INFO)`): segments sent and
//! retransmitted, for the check's retransmission rate.
#![allow(unsafe_code)]

use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// Bytes of `struct tcp_info` read: up to and including `tcpi_segs_in` (Linux 4.2+).
const LEN: usize = 144;
/// Offset of `tcpi_total_retrans` (u32) in `struct tcp_info` (linux/tcp.h).
const TOTAL_RETRANS: usize = 100;
/// Offset of `tcpi_segs_out` (u32).
const SEGS_OUT: usize = 136;

/// Segments a connection sent and retransmitted, as the kernel counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Segments sent, retransmissions included (`tcpi_segs_out`).
    pub segs_out: u64,
    /// Segments retransmitted over the connection's life (`tcpi_total_retrans`).
    pub retrans: u64,
}

impl TcpCounters {
    /// The counters of `sock`, or `None` where the kernel does not give them (older than 4.2,
    /// not TCP).
    pub fn of(sock: &TcpStream) -> Option<Self> {
        let mut buf = [0u8; LEN];
        let mut len = nix::libc::socklen_t::try_from(LEN).ok()?;
        // SAFETY: `buf` is writable for `len` bytes and `len` points to its size; the kernel
        // writes at most `len` bytes and stores the length it wrote back into `len`.
        let rc = unsafe {
            nix::libc::getsockopt(
                sock.as_raw_fd(),
                nix::libc::IPPROTO_TCP,
                nix::libc::TCP_INFO,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 || usize::try_from(len).ok()? < LEN {
            return None;
        }
        let u32_at = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        Some(Self {
            segs_out: u64::from(u32_at(SEGS_OUT)),
            retrans: u64::from(u32_at(TOTAL_RETRANS)),
        })
    }

    /// What happened between `earlier` and `self` (the kernel's u32 counters may wrap).
    #[allow(clippy::cast_possible_truncation)] // the values came from u32 counters
    pub fn since(self, earlier: Self) -> Self {
        let d = |a: u64, b: u64| u64::from((a as u32).wrapping_sub(b as u32));
        Self {
            segs_out: d(self.segs_out, earlier.segs_out),
            retrans: d(self.retrans, earlier.retrans),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_loopback_connection_counts_its_segments() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let before = TcpCounters::of(&c).unwrap();
        c.write_all(&[7u8; 100_000]).unwrap();
        let mut got = vec![0u8; 100_000];
        s.read_exact(&mut got).unwrap();
        let d = TcpCounters::of(&c).unwrap().since(before);
        assert!(d.segs_out >= 2, "{d:?}");
        assert_eq!(d.retrans, 0);
    }
}
