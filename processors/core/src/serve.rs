//! The HTTP server every listener of Herald's runs (gateway and read API, provider callbacks,
//! console, admin): axum's router on hyper, with bounds a caller cannot push past. Headers must
//! arrive within [`Limits::header_read_timeout`] (slow-header clients are cut off), a request's
//! whole body within [`Limits::body_read_timeout`] of its headers (a body trickled a byte at a
//! time is cut off with 408, whatever the gaps between its bytes), at most
//! [`Limits::max_connections`] connections are open at once (more wait in the kernel's backlog,
//! then are refused), and shutdown drains open connections within a bounded time. Handlers see
//! the peer's address as axum's `ConnectInfo<SocketAddr>`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    /// Longest time from a request's headers to the end of its body.
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    /// How long shutdown waits for open connections.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            drain: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let body_timeout = limits.body_read_timeout;
    let router = router.layer(axum::middleware::from_fn(
        move |req: Request<Body>, next: axum::middleware::Next| async move {
            let deadline = tokio::time::Instant::now() + body_timeout;
            let fired = Arc::new(AtomicBool::new(false));
            let (parts, body) = req.into_parts();
            let body = Body::new(Deadline {
                inner: body,
                sleep: Box::pin(tokio::time::sleep_until(deadline)),
                limit: body_timeout,
                fired: fired.clone(),
            });
            let resp = next.run(Request::from_parts(parts, body)).await;
            // Whatever the handler made of the failed read (extractors answer 400), the
            // caller learns what happened.
            if fired.load(Ordering::Relaxed) {
                metrics::counter!(crate::telemetry::names::BODY_TIMEOUTS).increment(1);
                return body_timeout_response(body_timeout);
            }
            resp
        },
    ));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    loop {
        // A connection slot first: at the limit, new connections wait in the backlog.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let with_peer =
            router
                .clone()
                .map_request(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req
                });
        let service = TowerToHyperService::new(with_peer);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // The protocol detection waits for a first byte with no timeout of its own: a
            // client that connects and sends nothing would hold its slot for ever.
            let mut first = [0u8; 1];
            match tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    debug!(%peer, "no request within the header timeout; closed");
                    drop(permit);
                    return;
                }
            }
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                debug!(%peer, error = %e, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("connections still open after the drain time; closing");
    }
    Ok(())
}

/// A request body that fails once its deadline passes (measured from the headers, not between
/// frames: a trickle of bytes does not keep it alive).
struct Deadline {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    fired: Arc<AtomicBool>,
}

/// The error a body past its deadline fails with; [`timed_out_answer`] recognises it.
#[derive(Debug)]
struct BodyTimedOut(Duration);

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} ms",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for BodyTimedOut {}

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.fired.store(true, Ordering::Relaxed);
            let limit = self.limit;
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut(limit)))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The 408 answer for a body that did not arrive in time.
fn body_timeout_response(limit: Duration) -> Response {
    let body = serde_json::json!({"error": {
        "code": "body_timeout",
        "message": BodyTimedOut(limit).to_string(),
        "field": null,
    }});
    let mut resp = (StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn get(addr: std::net::SocketAddr) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn connections_over_the_limit_wait_and_slow_headers_are_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            max_connections: 1,
            drain: Duration::from_secs(1),
            ..Limits::default()
        };
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = tokio::spawn(serve(listener, router, limits, stop.clone()));

        // One idle connection holds the only slot: a second client is not served meanwhile.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::spawn(get(addr));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!waiting.is_finished(), "served over the connection limit");
        // The idle one sends no headers: cut off after the header-read timeout, which frees
        // the slot for the waiting client.
        let mut buf = Vec::new();
        let cut = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut buf)).await;
        assert!(cut.is_ok(), "a slow-header connection is closed");
        let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("served once the slot is free")
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // A keep-alive connection that goes quiet after a request is closed too.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 512];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(n > 0);
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), kept.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "an idle keep-alive connection is closed");
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    /// A body trickled a byte at a time is cut off once the body-read time has passed since
    /// its headers (408 in the JSON error shape), however short the gaps between its bytes; a
    /// body sent at once is read, and handlers see the peer's address.
    #[tokio::test]
    async fn a_trickled_body_is_cut_off_and_handlers_see_the_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let limits = Limits {
            body_read_timeout: Duration::from_millis(800),
            ..Limits::default()
        };
        let router = Router::new().route(
            "/",
            axum::routing::post(
                |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>, body: Bytes| async move {
                    format!("{peer} {}", body.len())
                },
            ),
        );
        let server = tokio::spawn(serve(listener, router, limits, stop.clone()));

        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let trickle = async {
            for _ in 0..100 {
                if slow.write_all(b"x").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(1_500), trickle).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"body_timeout\""), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5));

        let mut quick = TcpStream::connect(addr).await.unwrap();
        let me = quick.local_addr().unwrap();
        quick
            .write_all(
                b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc",
            )
            .await
            .unwrap();
        let mut out = String::new();
        quick.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with(&format!("{me} 3")), "{out}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
