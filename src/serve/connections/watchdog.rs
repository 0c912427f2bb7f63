//! A connection's watchdog: where the connection stands (awaiting a head, idle between
//! requests, or with a request in flight) and how long it may stay there, fed by the bytes that
//! arrive and by the start and end of each request.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::ConnectionLimits;

/// Where a connection stands, for its watchdog.
#[derive(Debug)]
pub(super) struct Activity {
    state: Mutex<State>,
    changed: Notify,
}

/// The watchdog's view of a connection at one moment.
#[derive(Debug, Clone, Copy)]
struct State {
    /// Requests whose response has not ended.
    in_flight: usize,
    /// With nothing in flight: whether a head is awaited (the first request's, or one whose
    /// first byte arrived) rather than the connection idling between requests.
    head: bool,
    /// When the current wait began.
    since: Instant,
}

impl Activity {
    /// A new connection: awaiting its first head.
    pub(super) fn new() -> Self {
        Activity {
            state: Mutex::new(State {
                in_flight: 0,
                head: true,
                since: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    /// Applies `change`; wakes the watchdog when it says the state changed.
    fn update(&self, change: impl FnOnce(&mut State) -> bool) {
        let changed = change(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        if changed {
            self.changed.notify_one();
        }
    }

    /// The state now.
    fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes arrived: an idle connection is now receiving a head.
    pub(super) fn received(&self) {
        self.update(|state| {
            let starts = state.in_flight == 0 && !state.head;
            if starts {
                state.head = true;
                state.since = Instant::now();
            }
            starts
        });
    }

    /// A request's head has been read.
    pub(super) fn request_started(&self) {
        self.update(|state| {
            state.in_flight += 1;
            true
        });
    }

    /// A response has ended (or was dropped); with none left the connection idles.
    pub(super) fn request_finished(&self) {
        self.update(|state| {
            state.in_flight = state.in_flight.saturating_sub(1);
            if state.in_flight == 0 {
                state.head = false;
                state.since = Instant::now();
            }
            true
        });
    }

    /// Whether a request is in flight.
    pub(super) fn busy(&self) -> bool {
        self.state().in_flight > 0
    }

    /// Resolves when the connection has waited too long for a head or idled too long, naming
    /// which; never while a request is in flight.
    pub(super) async fn expired(&self, limits: &ConnectionLimits) -> &'static str {
        loop {
            // Created before the state is read, so no change between the two is missed.
            let changed = self.changed.notified();
            let state = self.state();
            if state.in_flight > 0 {
                changed.await;
                continue;
            }
            let (limit, what) = match state.head {
                true => (
                    limits.header_timeout,
                    "the request head did not arrive in time",
                ),
                false => (limits.keep_alive, "idle past the keep-alive timeout"),
            };
            let deadline = state.since + limit;
            if Instant::now() >= deadline {
                return what;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// The TCP stream, telling the watchdog when bytes arrive.
pub(super) struct Watched {
    /// The connection.
    pub(super) stream: TcpStream,
    /// Its watchdog.
    pub(super) activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.received();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Limits with short timeouts, for the watchdog's tests (real time, in milliseconds).
    fn quick() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_millis(200),
            keep_alive: Duration::from_millis(500),
            ..ConnectionLimits::default()
        }
    }

    #[tokio::test]
    async fn a_connection_expires_after_the_header_then_the_idle_timeout() {
        let limits = quick();
        let activity = Activity::new();
        let start = Instant::now();
        assert_eq!(
            activity.expired(&limits).await,
            "the request head did not arrive in time"
        );
        let waited = start.elapsed();
        assert!(
            waited >= limits.header_timeout && waited < limits.keep_alive,
            "{waited:?}"
        );

        activity.request_started();
        activity.request_finished();
        let start = Instant::now();
        assert_eq!(
            activity.expired(&limits).await,
            "idle past the keep-alive timeout"
        );
        let waited = start.elapsed();
        assert!(waited >= limits.keep_alive, "{waited:?}");
    }

    #[tokio::test]
    async fn a_request_in_flight_never_expires_and_a_new_head_restarts_the_clock() {
        let limits = quick();
        let activity = Arc::new(Activity::new());
        activity.request_started();
        let watched = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(&limits).await }
        });
        tokio::time::sleep(limits.keep_alive * 2).await;
        assert!(!watched.is_finished(), "expired with a request in flight");
        activity.request_finished();
        tokio::time::sleep(limits.keep_alive - Duration::from_millis(100)).await;
        // A byte of the next request: the header timeout now runs from here.
        let first_byte = Instant::now();
        activity.received();
        assert_eq!(
            watched.await.unwrap(),
            "the request head did not arrive in time"
        );
        let waited = first_byte.elapsed();
        assert!(waited >= limits.header_timeout, "{waited:?}");
    }
}
