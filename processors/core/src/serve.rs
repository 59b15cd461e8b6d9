//! The HTTP server every listener of Herald's runs (gateway and read API, provider callbacks):
//! axum's router on hyper, with bounds a caller cannot push past. Headers must arrive within
//! [`Limits::header_read_timeout`] (slow-header clients are cut off), at most
//! [`Limits::max_connections`] connections are open at once (more wait in the kernel's backlog,
//! then are refused), and shutdown drains open connections within a bounded time.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// How long shutdown waits for open connections.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
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
        let service = TowerToHyperService::new(router.clone());
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
}
