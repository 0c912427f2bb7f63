//! A connection's requests handed to the router: each body under the body deadline (408 when
//! it does not arrive in time), each response counted as in flight until it ends.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::Router;
use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use super::watchdog::Activity;
use crate::serve::openai::ApiError;

/// Hands each request of a connection to the router: its body under the body deadline, its
/// response counted as in flight until it ends.
#[derive(Clone)]
pub(super) struct Requests {
    /// The application.
    pub(super) router: Router,
    /// The connection's watchdog.
    pub(super) activity: Arc<Activity>,
    /// Time for a body to arrive after its head.
    pub(super) body_timeout: Duration,
}

impl Requests {
    /// Answers one request.
    pub(super) async fn call(self, request: Request<Incoming>) -> Result<Response, Infallible> {
        let in_flight = InFlight::start(self.activity);
        let timed_out = Arc::new(AtomicBool::new(false));
        let request = request.map(|body| {
            Body::new(Deadlined {
                body,
                deadline: Instant::now() + self.body_timeout,
                sleep: None,
                timed_out: timed_out.clone(),
            })
        });
        let response = self.router.oneshot(request).await?;
        // A handler that met the deadline answered as the body was broken; say why instead.
        let response = match timed_out.load(Ordering::Relaxed) {
            true => body_timed_out(self.body_timeout),
            false => response,
        };
        Ok(response.map(|body| {
            Body::new(Tracked {
                body,
                _in_flight: in_flight,
            })
        }))
    }
}

/// 408 for a body that did not arrive in time; the connection closes after it.
fn body_timed_out(timeout: Duration) -> Response {
    let message = format!(
        "the request body did not arrive within {} s",
        timeout.as_secs_f64()
    );
    ApiError::invalid("", message).closing(StatusCode::REQUEST_TIMEOUT)
}

/// Counts a request as in flight from its head to the end of its response.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.request_started();
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// The request's body, failing once its deadline passes.
struct Deadlined {
    body: Incoming,
    deadline: Instant,
    /// Set up the first time the body is not ready (bodies that are already there never need
    /// a timer).
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

/// A request body that did not arrive within the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl HttpBody for Deadlined {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.timed_out.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(BodyTimedOut))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its request in flight until it ends or is dropped.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
