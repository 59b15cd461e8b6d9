//! Graceful shutdown: one root token cancelled by SIGTERM or Ctrl-C; workers drain their
//! in-flight batch, commit, and return.

use tokio_util::sync::CancellationToken;
use tracing::info;

/// The process's token, cancelled on SIGTERM or SIGINT. The first call (inside the runtime)
/// installs the signal handlers; later calls return the same token, so code that has no token
/// handed to it (start-up retries) still stops when the process is asked to.
pub fn on_signals() -> CancellationToken {
    static TOKEN: std::sync::OnceLock<CancellationToken> = std::sync::OnceLock::new();
    let mut first = false;
    let token = TOKEN
        .get_or_init(|| {
            first = true;
            CancellationToken::new()
        })
        .clone();
    if !first {
        return token;
    }
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => info!("SIGINT: shutting down"),
                _ = term.recv() => info!("SIGTERM: shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        t.cancel();
    });
    token
}
