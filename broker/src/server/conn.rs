//! Connection bounds: a per-source share of the connection limit, and a watchdog that closes
//! every connection that is not doing useful work.
//!
//! A connection must produce a complete request within the header timeout of being
//! accepted, whatever it sends (nothing, one byte, part of a request line or of the HTTP/2
//! preface), and is closed when it has no request in flight for the idle timeout (HTTP/2
//! connections that only answer pings included). HTTP/1.1 connections are additionally held
//! to the header timeout for each request's headers by hyper.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::limit::{KeyGuard, KeyLimiter, source_key};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// What a connection is doing: requests in flight, and when it last finished one.
#[derive(Debug)]
pub struct Activity {
    inflight: AtomicUsize,
    served: AtomicBool,
    last: Mutex<Instant>,
}

impl Activity {
    /// A connection accepted now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            inflight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            last: Mutex::new(Instant::now()),
        })
    }

    /// Marks a request as started; the guard marks it finished.
    pub fn start(self: &Arc<Self>) -> RequestGuard {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        self.served.store(true, Ordering::SeqCst);
        RequestGuard(self.clone())
    }

    fn last(&self) -> Instant {
        self.last
            .lock()
            .map(|l| *l)
            .unwrap_or_else(|_| Instant::now())
    }

    /// When the connection is to be closed unless a request starts: `None` while one is in
    /// flight.
    pub fn deadline(&self, header_timeout: Duration, idle_timeout: Duration) -> Option<Instant> {
        if self.inflight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let limit = if self.served.load(Ordering::SeqCst) {
            idle_timeout
        } else {
            header_timeout
        };
        Some(self.last() + limit)
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Ok(mut l) = self.0.last.lock() {
            *l = Instant::now();
        }
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A service wrapper that tracks a connection's [`Activity`].
#[derive(Clone, Debug)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Tracked<S> {
        Tracked { inner, activity }
    }
}

impl<S, R> tower::Service<R> for Tracked<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let guard = self.activity.start();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let _guard = guard;
            fut.await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn sources_share_the_limit_and_v6_counts_by_64() {
        let l = KeyLimiter::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let g1 = l.acquire(source_key(a)).unwrap();
        let _g2 = l.acquire(source_key(a)).unwrap();
        assert!(l.acquire(source_key(a)).is_none());
        assert!(
            l.acquire(source_key("192.0.2.2".parse().unwrap()))
                .is_some()
        );
        drop(g1);
        assert!(
            l.acquire(source_key(a)).is_some(),
            "a closed connection frees its place"
        );

        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(source_key(v6a), source_key(v6b));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(source_key(mapped), a);
    }

    #[test]
    fn deadlines_follow_activity() {
        let act = Activity::new();
        let h = Duration::from_secs(10);
        let i = Duration::from_secs(60);
        let first = act.deadline(h, i).unwrap();
        assert!(first <= Instant::now() + h, "first request: header timeout");
        let g = act.start();
        assert_eq!(act.deadline(h, i), None, "in flight");
        std::thread::sleep(Duration::from_millis(20));
        drop(g);
        let idle = act.deadline(h, i).unwrap();
        assert!(
            idle >= first + (i - h),
            "after a request: idle timeout from its end"
        );
    }
}
