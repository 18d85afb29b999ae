//! Request bodies a handler did not read to the end are read (and discarded) before the
//! answer goes out, up to a bound, so an HTTP/2 stream ends cleanly with the answer (a 413
//! for a body over the limit, or a challenge sent with `{}`) instead of a stream reset, and an
//! HTTP/1.1 connection stays usable. Past the bound the stream is reset as before.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http_body::Frame;
use http_body_util::BodyExt;

/// Most bytes read past what a handler wanted.
pub const MAX_DRAIN: usize = 8 * 1024 * 1024;
/// Longest time spent reading them.
const DRAIN_TIME: Duration = Duration::from_secs(5);

type Slot = Arc<Mutex<Option<Body>>>;

/// A request body whose unread rest the middleware can take back.
struct Shared(Slot);

impl HttpBody for Shared {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Ok(mut guard) = self.0.lock() else {
            return Poll::Ready(None);
        };
        match guard.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .lock()
            .map(|g| g.as_ref().is_none_or(HttpBody::is_end_stream))
            .unwrap_or(true)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(HttpBody::size_hint))
            .unwrap_or_default()
    }
}

/// The middleware: runs the handler, then drains what it left unread.
pub async fn drain_unread(req: Request, next: Next) -> Response {
    // A client that asked to be told before it sends its body gets the refusal instead of an
    // invitation to upload.
    let expects_continue = req.headers().contains_key(axum::http::header::EXPECT);
    let (parts, body) = req.into_parts();
    let slot: Slot = Arc::new(Mutex::new(Some(body)));
    let req = Request::from_parts(parts, Body::new(Shared(slot.clone())));
    let response = next.run(req).await;
    let rest = slot.lock().ok().and_then(|mut g| g.take());
    if let Some(mut rest) = rest
        && !expects_continue
        && !rest.is_end_stream()
    {
        let drained = tokio::time::timeout(DRAIN_TIME, async {
            let mut read = 0usize;
            while let Some(frame) = rest.frame().await {
                let Ok(frame) = frame else { return };
                if let Some(data) = frame.data_ref() {
                    read += data.len();
                    if read > MAX_DRAIN {
                        return;
                    }
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::debug!("request body not drained in time");
        }
    }
    response
}
