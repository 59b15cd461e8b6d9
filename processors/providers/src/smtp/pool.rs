//! SMTP sessions over sockets Herald opens itself, kept in a small pool.
//!
//! lettre speaks the protocol (greeting, EHLO, STARTTLS, AUTH, MAIL/RCPT/DATA); this module opens
//! the TCP connection so that it can set `TCP_NODELAY`. lettre 0.11.23 writes a message's body
//! and its closing `.` in two writes, and with Nagle's algorithm on the second waits for the
//! server's delayed ACK: about 40 ms per mail on Linux, whatever the server's speed (fixed
//! upstream in lettre#1159, not yet released). With its own sockets Herald also bounds the whole
//! session by the provider's timeout (lettre's async transport bounds only the connect).
//!
//! A session is reused while it is healthy: one that saw any error is dropped (lettre has already
//! sent QUIT), one idle for longer than [`CHECK_AFTER`] is checked with NOOP before reuse, one
//! idle for longer than [`IDLE_MAX`] is closed.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::net::TcpStream;

/// A session idle for longer than this is checked with NOOP before it carries a mail.
const CHECK_AFTER: Duration = Duration::from_secs(1);
/// A session idle for longer than this is closed rather than reused (servers drop idle clients).
const IDLE_MAX: Duration = Duration::from_secs(50);

/// Longest a closing session may wait for the server's answer to QUIT.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// How the session is protected.
pub enum Security {
    None,
    /// STARTTLS, required: nothing (credentials included) is sent before the upgrade.
    StartTls(TlsParameters),
    /// TLS from the first byte (port 465).
    Implicit {
        connector: tokio_native_tls::TlsConnector,
        domain: String,
    },
}

/// Why a mail did not go.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be opened, or it timed out before the mail began: nothing was sent.
    Connect(String),
    /// The server answered with an error (greeting, STARTTLS, AUTH or the mail's own commands),
    /// or the session broke: lettre's error.
    Smtp(lettre::transport::smtp::Error),
    /// The implicit-TLS handshake failed (certificate, name, protocol): a configuration problem.
    Tls(String),
    /// The server cannot take this mail as it is (non-ASCII without SMTPUTF8/8BITMIME).
    Unsupported(&'static str),
    /// The timeout passed after the mail's body was sent: it may have been accepted.
    Timeout,
    /// The session broke after the mail's body was sent, before the server's answer: it may
    /// have been accepted.
    Lost(String),
}

pub struct Pool {
    host: String,
    port: u16,
    security: Security,
    credentials: Option<Credentials>,
    hello: ClientId,
    timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
}

impl Pool {
    pub fn new(
        host: String,
        port: u16,
        security: Security,
        credentials: Option<Credentials>,
        timeout: Duration,
        max_idle: usize,
    ) -> Self {
        Pool {
            host,
            port,
            security,
            credentials,
            hello: ClientId::default(),
            timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends one mail on a pooled or new session, within the timeout.
    pub async fn send(&self, envelope: &Envelope, email: &[u8]) -> Result<Response, Failure> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut conn = match tokio::time::timeout_at(deadline, self.checkout()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(e),
            // Still connecting, greeting or authenticating: no mail was sent.
            Err(_) => return Err(Failure::Connect("timed out opening a session".into())),
        };
        let body_sent = AtomicBool::new(false);
        match tokio::time::timeout_at(deadline, transact(&mut conn, envelope, email, &body_sent))
            .await
        {
            Ok(Ok(response)) => {
                self.checkin(conn);
                Ok(response)
            }
            Ok(Err(e)) => {
                close(conn);
                Err(e)
            }
            Err(_) if body_sent.load(Ordering::SeqCst) => Err(Failure::Timeout),
            Err(_) => Err(Failure::Connect(
                "timed out before the mail was sent".into(),
            )),
        }
    }

    // lettre's `AsyncSmtpConnection::send` does MAIL, RCPT, DATA and the body in one call and
    // cannot say at which step it failed; Herald needs to know whether the body went out.
    async fn checkout(&self) -> Result<AsyncSmtpConnection, Failure> {
        loop {
            let next = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some((mut conn, since)) = next else { break };
            let idle = since.elapsed();
            if idle > IDLE_MAX {
                close(conn);
                continue;
            }
            if idle <= CHECK_AFTER || conn.test_connected().await {
                return Ok(conn);
            }
        }
        self.connect().await
    }

    fn checkin(&self, conn: AsyncSmtpConnection) {
        if conn.has_broken() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push((conn, Instant::now()));
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, Failure> {
        let at = format!("{}:{}", self.host, self.port);
        let io = |what: &str, e: std::io::Error| Failure::Connect(format!("{what} {at}: {e}"));
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| io("connect", e))?;
        tcp.set_nodelay(true).map_err(|e| io("TCP_NODELAY on", e))?;
        let stream: Box<dyn AsyncTokioStream> = match &self.security {
            Security::Implicit { connector, domain } => Box::new(Tls(connector
                .connect(domain, tcp)
                .await
                .map_err(|e| Failure::Tls(format!("TLS with {at}: {e}")))?)),
            _ => Box::new(tcp),
        };
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello)
            .await
            .map_err(Failure::Smtp)?;
        if let Security::StartTls(params) = &self.security {
            conn.starttls(params.clone(), &self.hello)
                .await
                .map_err(Failure::Smtp)?;
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, credentials)
                .await
                .map_err(Failure::Smtp)?;
        }
        Ok(conn)
    }
}

/// Says QUIT and closes a session in the background, bounded: a server that stopped answering
/// must not keep a task and a socket forever.
fn close(mut conn: AsyncSmtpConnection) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CLOSE_WITHIN, conn.abort()).await;
    });
}

/// One mail transaction on an open session (what lettre's `send` does, step by step): an error
/// before the body went out means nothing was sent; a broken session after it means the mail
/// may have been taken (`Lost`), unless the server answered with a code. `body_sent` is set
/// just before the body is written, for the caller's timeout.
async fn transact(
    conn: &mut AsyncSmtpConnection,
    envelope: &Envelope,
    email: &[u8],
    body_sent: &AtomicBool,
) -> Result<Response, Failure> {
    let mut params = Vec::new();
    let ascii = |a: &lettre::Address| AsRef::<str>::as_ref(a).is_ascii();
    let non_ascii = envelope.from().is_some_and(|a| !ascii(a)) || !envelope.to().iter().all(ascii);
    if non_ascii {
        if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
            return Err(Failure::Unsupported(
                "non-ASCII addresses, and the server does not offer SMTPUTF8",
            ));
        }
        params.push(MailParameter::SmtpUtfEight);
    }
    if !email.is_ascii() {
        if !conn.server_info().supports_feature(Extension::EightBitMime) {
            return Err(Failure::Unsupported(
                "non-ASCII content, and the server does not offer 8BITMIME",
            ));
        }
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    conn.command(Mail::new(envelope.from().cloned(), params))
        .await
        .map_err(Failure::Smtp)?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), vec![]))
            .await
            .map_err(Failure::Smtp)?;
    }
    conn.command(Data).await.map_err(Failure::Smtp)?;
    body_sent.store(true, Ordering::SeqCst);
    conn.message(email).await.map_err(|e| match e.status() {
        // The server answered: accepted or not, it said so.
        Some(_) => Failure::Smtp(e),
        None => Failure::Lost(e.to_string()),
    })
}

/// An implicit-TLS stream as lettre's transport.
#[derive(Debug)]
struct Tls(tokio_native_tls::TlsStream<TcpStream>);

impl AsyncTokioStream for Tls {
    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.get_ref().get_ref().get_ref().peer_addr()
    }
}

impl tokio::io::AsyncRead for Tls {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tls {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    /// What the loopback peer does when the mail's closing `.` arrives.
    #[derive(Clone, Copy, PartialEq)]
    enum Peer {
        Accepts,
        /// Never answers the closing `.` (the mail may or may not have been taken).
        SilentAfterData,
        /// Accepts the connection and never greets.
        NeverGreets,
        /// Refuses every recipient with 550.
        RefusesRecipients,
        /// Reads the mail to its closing `.`, then closes the connection without an answer.
        DropsAfterData,
        /// Never answers MAIL FROM.
        SilentAtMail,
    }

    /// A minimal SMTP server on loopback; counts connections and accepted mails.
    async fn peer(kind: Peer) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (conns, mails) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, m) = (conns.clone(), mails.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let m = m.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    if kind == Peer::NeverGreets {
                        let _ = lines.next_line().await;
                        return;
                    }
                    let _ = w.write_all(b"220 peer ready\r\n").await;
                    let mut in_data = false;
                    while let Ok(Some(line)) = lines.next_line().await {
                        let reply: &[u8] = if in_data {
                            if line != "." {
                                continue;
                            }
                            in_data = false;
                            if kind == Peer::SilentAfterData {
                                continue;
                            }
                            if kind == Peer::DropsAfterData {
                                return;
                            }
                            m.fetch_add(1, Ordering::SeqCst);
                            b"250 queued\r\n"
                        } else if line.starts_with("EHLO") {
                            b"250-peer\r\n250 8BITMIME\r\n"
                        } else if line.starts_with("MAIL") && kind == Peer::SilentAtMail {
                            continue;
                        } else if line.starts_with("RCPT") && kind == Peer::RefusesRecipients {
                            b"550 no such user\r\n"
                        } else if line == "DATA" {
                            in_data = true;
                            b"354 go on\r\n"
                        } else if line == "QUIT" {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        } else {
                            b"250 ok\r\n"
                        };
                        let _ = w.write_all(reply).await;
                    }
                });
            }
        });
        (port, conns, mails)
    }

    fn pool(port: u16) -> Pool {
        Pool::new(
            "127.0.0.1".into(),
            port,
            Security::None,
            None,
            Duration::from_millis(500),
            4,
        )
    }

    fn envelope() -> Envelope {
        Envelope::new(
            Some("herald@example.com".parse().unwrap()),
            vec!["ada@example.com".parse().unwrap()],
        )
        .unwrap()
    }

    const MAIL: &[u8] = b"Subject: hi\r\n\r\nhello\r\n";

    #[tokio::test]
    async fn mails_in_sequence_share_one_session() {
        let (port, conns, mails) = peer(Peer::Accepts).await;
        let pool = pool(port);
        for _ in 0..3 {
            let r = pool.send(&envelope(), MAIL).await.unwrap();
            assert_eq!(r.code().to_string(), "250");
        }
        assert_eq!(mails.load(Ordering::SeqCst), 3);
        assert_eq!(conns.load(Ordering::SeqCst), 1, "the session was reused");
    }

    #[tokio::test]
    async fn a_refused_recipient_fails_permanently_and_its_session_is_not_reused() {
        let (port, conns, _) = peer(Peer::RefusesRecipients).await;
        let pool = pool(port);
        for _ in 0..2 {
            match pool.send(&envelope(), MAIL).await {
                Err(Failure::Smtp(e)) => assert!(e.is_permanent(), "{e}"),
                other => panic!("want a permanent SMTP error, got {other:?}"),
            }
        }
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn no_answer_after_the_mail_is_a_timeout_not_a_hang() {
        let (port, _, _) = peer(Peer::SilentAfterData).await;
        assert!(matches!(
            pool(port).send(&envelope(), MAIL).await,
            Err(Failure::Timeout)
        ));
    }

    #[tokio::test]
    async fn a_session_lost_after_the_mail_went_out_is_not_a_failure_to_retry() {
        // The server may have taken it: `Lost` (the message ends unknown), never `Smtp`
        // (transient, sent again).
        let (port, _, _) = peer(Peer::DropsAfterData).await;
        assert!(matches!(
            pool(port).send(&envelope(), MAIL).await,
            Err(Failure::Lost(_))
        ));
    }

    #[tokio::test]
    async fn no_answer_before_the_mail_went_out_means_nothing_was_sent() {
        let (port, _, _) = peer(Peer::SilentAtMail).await;
        assert!(matches!(
            pool(port).send(&envelope(), MAIL).await,
            Err(Failure::Connect(_))
        ));
    }

    #[tokio::test]
    async fn a_server_that_never_greets_is_unavailable_with_nothing_sent() {
        let (port, _, _) = peer(Peer::NeverGreets).await;
        assert!(matches!(
            pool(port).send(&envelope(), MAIL).await,
            Err(Failure::Connect(_))
        ));
    }

    #[tokio::test]
    async fn a_refused_connection_is_unavailable() {
        // Bind, learn the port, close: nothing listens there now.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(matches!(
            pool(port).send(&envelope(), MAIL).await,
            Err(Failure::Connect(_))
        ));
    }
}
