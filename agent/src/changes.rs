//! What continuous sync needs from a change source, whatever the engine: block changes from
//! the BPF tracker, file changes from a journal. A source answers how old the oldest change
//! not yet on the target is and how much is waiting; the sync loop decides from that when to
//! run a pass.

use std::time::Duration;

/// A source of the changes made since the last pass began.
pub trait ChangeFeed {
    /// Age of the oldest change not yet on the target (including those a running pass took),
    /// `None` when the target is current.
    fn lag(&self) -> Option<Duration>;
    /// Bytes changed and not yet taken by a pass; `None` when unknown (everything must be
    /// compared, as after an overflow).
    fn pending_bytes(&self) -> Option<u64>;
}

/// When continuous sync runs a pass: the changes pass `threshold` bytes (or are unknown), or
/// `interval` has passed since the last pass with anything pending.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Run at the latest this long after the last pass.
    pub interval: Duration,
    /// Run as soon as this many bytes changed.
    pub threshold: u64,
}

impl Policy {
    /// Whether a pass is due, `since` the last one ended.
    pub fn due(&self, feed: Option<&dyn ChangeFeed>, since: Duration) -> bool {
        let Some(feed) = feed else {
            // Without a change source, only the clock says when.
            return since >= self.interval;
        };
        match feed.pending_bytes() {
            None => since >= self.interval || feed.lag().is_some(),
            Some(b) if b >= self.threshold => true,
            Some(0) => false,
            Some(_) => since >= self.interval,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Option<u64>, Option<Duration>);
    impl ChangeFeed for Fixed {
        fn lag(&self) -> Option<Duration> {
            self.1
        }
        fn pending_bytes(&self) -> Option<u64> {
            self.0
        }
    }

    #[test]
    fn a_pass_is_due_on_volume_or_on_time_when_anything_changed() {
        let p = Policy {
            interval: Duration::from_secs(60),
            threshold: 1 << 20,
        };
        let s = Duration::from_secs;
        assert!(p.due(None, s(60)));
        assert!(!p.due(None, s(59)));
        assert!(!p.due(Some(&Fixed(Some(0), None)), s(600)));
        assert!(p.due(Some(&Fixed(Some(1 << 20), Some(s(1)))), s(0)));
        assert!(!p.due(Some(&Fixed(Some(4096), Some(s(1)))), s(10)));
        assert!(p.due(Some(&Fixed(Some(4096), Some(s(1)))), s(60)));
        assert!(p.due(Some(&Fixed(None, Some(s(1)))), s(0)));
    }
}
