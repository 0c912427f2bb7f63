//! The server's connection loop: the router served over HTTP/1.1 on a TCP listener, with
//! bounds on what a client can hold open, so that clients that connect and then send slowly or
//! nothing cannot exhaust the process's file descriptors.
//!
//! - At most [`ConnectionLimits::max_connections`] connections are open at once, and never more
//!   than the open-file limit (`RLIMIT_NOFILE`) allows with a reserve for the server's own files;
//!   a connection beyond that is accepted, answered 503 and closed at once.
//! - A request's head must arrive within the header timeout, counted from the connection's
//!   start (first request) or from the first byte of a later one; its body must arrive within the
//!   body timeout after the head (408 otherwise); a connection with no request in flight closes
//!   after the keep-alive timeout.
//! - When `shutdown` resolves the listener closes, connections without a request in flight close
//!   at once, and the others close after their response.
//!
//! hyper's own `header_read_timeout` is left off: since hyper 1.6 it also runs while a
//! keep-alive connection waits between requests (the idle wait and the next head share one
//! window), so it cannot give an idle timeout and a header timeout of their own. Each connection
//! has a watchdog instead, fed by its reads and by the start and end of its requests.
//!
//! The loop and its limits live here; `watchdog` keeps each connection's timers, `requests`
//! hands its requests to the router.

mod requests;
mod watchdog;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use requests::Requests;
use watchdog::{Activity, Watched};

/// File descriptors kept for the server's own use (rank sockets, shared memory, model files,
/// the runtime) when the connection cap is derived from the open-file limit.
pub const DESCRIPTOR_RESERVE: usize = 128;

/// Bounds on the connections the server holds. The defaults are those of `serve`'s flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once (default 1024); more are answered 503 and closed. Capped
    /// at the soft open-file limit less [`DESCRIPTOR_RESERVE`] (or less half the limit, when
    /// that is smaller).
    pub max_connections: usize,
    /// Time for a request's whole head to arrive (default 10 s), from the connection's start for
    /// its first request, from the first byte of a request on a kept-alive connection.
    pub header_timeout: Duration,
    /// Time for a request's whole body to arrive after its head (default 30 s); 408 after it.
    pub body_timeout: Duration,
    /// Time a connection with no request in flight stays open waiting for the next (default
    /// 15 s).
    pub keep_alive: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(15),
        }
    }
}

/// Connections the kernel queues for accepting (capped by `net.core.somaxconn`): a burst of
/// connections waits here rather than having its SYNs dropped (the standard library's 128 is
/// small for a flood).
const ACCEPT_BACKLOG: u32 = 1024;

/// A listener on `address` whose kernel queue holds 1024 connections waiting to be accepted
/// (`ACCEPT_BACKLOG`).
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then stops
/// accepting and returns once every connection has closed (connections idle or still sending a
/// head close at once; those with a request in flight after its response). The caller bounds
/// that wait with its own deadline. Errors only when the listener itself fails; a client's
/// error ends that client's connection alone.
pub async fn serve_connections(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let soft_limit = soft_descriptor_limit();
    let capacity = connection_cap(limits.max_connections, soft_limit);
    if capacity < limits.max_connections {
        tracing::warn!(
            "at most {capacity} connections (not {}): the open-file limit is {soft_limit:?}",
            limits.max_connections,
        );
    }
    let slots = Arc::new(Semaphore::new(capacity));
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    pause_after(e).await?;
                    continue;
                }
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let connection = Connection {
                    router: router.clone(),
                    limits,
                    stopping: stopping.clone(),
                    _slot: slot,
                };
                tokio::spawn(connection.run(stream));
            }
            Err(_) => refuse(stream),
        }
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a slot until it closes.
    let all = u32::try_from(capacity).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    Ok(())
}

/// The most connections to hold: `configured`, but at most the soft open-file limit less a
/// reserve ([`DESCRIPTOR_RESERVE`], or half the limit when that is smaller), and at least one.
fn connection_cap(configured: usize, soft_limit: Option<u64>) -> usize {
    let room = soft_limit.map_or(usize::MAX, |limit| {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        limit - DESCRIPTOR_RESERVE.min(limit / 2)
    });
    let most = room.min(u32::MAX as usize).min(Semaphore::MAX_PERMITS);
    configured.clamp(1, most.max(1))
}

/// The process's soft `RLIMIT_NOFILE`; `None` when unlimited or unknown.
fn soft_descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live local of that type.
    let status = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (status == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// After a failed accept: a client's aborted connection or a momentary shortage of descriptors
/// or memory is waited out (briefly, so the loop does not spin); anything else is the
/// listener's own failure and is returned.
async fn pause_after(error: io::Error) -> io::Result<()> {
    let shortage = matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if shortage {
        tracing::warn!("accept failed: {error}; pausing");
        tokio::time::sleep(Duration::from_millis(100)).await;
        return Ok(());
    }
    match error.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted
        | io::ErrorKind::WouldBlock => Ok(()),
        _ => Err(error),
    }
}

/// The whole answer to a connection over the cap.
static BUSY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let body = r#"{"error":{"message":"the server holds too many connections; retry shortly","type":"server_error","param":null,"code":null}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Answers a connection over the cap 503 and closes it, without waiting: a fresh socket's send
/// buffer takes the short answer in one non-blocking write (if not, the client sees the close).
fn refuse(stream: TcpStream) {
    let _ = stream.try_write(&BUSY);
}

/// One accepted connection and what it needs.
struct Connection {
    router: Router,
    limits: ConnectionLimits,
    stopping: watch::Receiver<bool>,
    /// Held until the connection closes.
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    /// Serves HTTP/1.1 on `stream` until the client leaves, a timeout closes it, or the server
    /// stops.
    async fn run(mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            stream,
            activity: activity.clone(),
        });
        let requests = Requests {
            router: self.router.clone(),
            activity: activity.clone(),
            body_timeout: self.limits.body_timeout,
        };
        let mut builder = http1::Builder::new();
        builder.header_read_timeout(None);
        let connection = builder.serve_connection(
            io,
            hyper::service::service_fn(move |r| requests.clone().call(r)),
        );
        tokio::pin!(connection);
        let mut stopping = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!("connection ended: {e}");
                    }
                    return;
                }
                _ = self.stopping.wait_for(|&stop| stop), if !stopping => {
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                    if !activity.busy() {
                        return;
                    }
                }
                expired = activity.expired(&self.limits) => {
                    tracing::debug!("closing a connection: {expired}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    /// Reads what has arrived (0 at the end).
    async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            stream.readable().await?;
            match stream.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                read => return read,
            }
        }
    }

    /// Reads to the end of the stream.
    async fn read_to_end(stream: &TcpStream) -> io::Result<Vec<u8>> {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match read_some(stream, &mut buf).await? {
                0 => return Ok(all),
                n => all.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Sends a short request (it fits the fresh socket's buffer).
    async fn send(stream: &TcpStream, request: &[u8]) {
        stream.writable().await.unwrap();
        assert_eq!(stream.try_write(request).unwrap(), request.len());
    }

    #[test]
    fn the_cap_stays_below_the_open_file_limit_with_a_reserve() {
        assert_eq!(connection_cap(1024, Some(20_000)), 1024);
        assert_eq!(connection_cap(1024, Some(1024)), 1024 - DESCRIPTOR_RESERVE);
        assert_eq!(
            connection_cap(50_000, Some(20_000)),
            20_000 - DESCRIPTOR_RESERVE
        );
        // A tiny limit keeps half for the server.
        assert_eq!(connection_cap(1024, Some(100)), 50);
        assert_eq!(connection_cap(1024, None), 1024);
        assert_eq!(connection_cap(0, Some(1024)), 1, "at least one");
    }

    #[test]
    fn the_busy_answer_declares_its_body_length() {
        let text = String::from_utf8(BUSY.clone()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
        let error: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(error["error"]["type"], "server_error");
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_answered_503_and_closed() {
        let listener = bind(([127, 0, 0, 1], 0).into()).unwrap();
        let address = listener.local_addr().unwrap();
        let router = Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let limits = ConnectionLimits {
            max_connections: 1,
            ..ConnectionLimits::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_connections(listener, router, limits, async {
            let _ = stopped.await;
        }));
        let _held = TcpStream::connect(address).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let over = TcpStream::connect(address).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(1), read_to_end(&over))
            .await
            .expect("the connection over the cap stayed open")
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 503 "), "{answer:?}");
        let _ = stop.send(());
        let stopped = tokio::time::timeout(Duration::from_secs(1), server).await;
        assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
    }

    #[tokio::test]
    async fn a_stop_closes_idle_connections_at_once_and_lets_a_running_request_finish() {
        let listener = bind(([127, 0, 0, 1], 0).into()).unwrap();
        let address = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/quick", axum::routing::get(|| async { "quick" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow"
                }),
            );
        let limits = ConnectionLimits {
            header_timeout: Duration::from_secs(60),
            keep_alive: Duration::from_secs(60),
            ..ConnectionLimits::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_connections(listener, router, limits, async {
            let _ = stopped.await;
        }));
        // A kept-alive connection that has had its answer, and one waiting for a head.
        let idle = TcpStream::connect(address).await.unwrap();
        send(&idle, b"GET /quick HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut answer = [0u8; 1024];
        let n = read_some(&idle, &mut answer).await.unwrap();
        assert!(answer[..n].ends_with(b"quick"));
        let silent = TcpStream::connect(address).await.unwrap();
        let slow = TcpStream::connect(address).await.unwrap();
        send(&slow, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
        tokio::time::sleep(Duration::from_millis(50)).await;

        let asked = Instant::now();
        let _ = stop.send(());
        for connection in [&idle, &silent] {
            let read = tokio::time::timeout(
                Duration::from_millis(200),
                read_some(connection, &mut answer),
            );
            assert_eq!(read.await.expect("not closed at the stop").unwrap(), 0);
        }
        let rest = tokio::time::timeout(Duration::from_secs(2), read_to_end(&slow))
            .await
            .expect("the running request's connection stayed open")
            .unwrap();
        assert!(rest.starts_with(b"HTTP/1.1 200 ") && rest.ends_with(b"slow"));
        let stopped = tokio::time::timeout(Duration::from_secs(2), server).await;
        assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
        assert!(
            asked.elapsed() >= Duration::from_millis(200),
            "{:?}",
            asked.elapsed()
        );
    }
}
