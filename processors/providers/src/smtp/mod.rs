//! E-mail over SMTP: lettre speaks the protocol on sockets Herald opens (`pool.rs`), pooled; plain,
//! STARTTLS-required or implicit TLS; auth.
//!
//! Config: endpoint `host:port`; `tls` = `none` | `starttls` (required: nothing, credentials
//! included, goes in clear) | `implicit` (port 465); optional credentials `username`,
//! `password`; optional settings `tls_ca_file` (PEM of a private CA to trust) and `tls_domain`
//! (the name to verify, default the endpoint's host).

mod pool;

use std::time::Duration;

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};
use lettre::message::{Mailbox, MultiPart, SinglePart, header};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, TlsParameters};

use self::pool::{Failure, Pool, Security};
use crate::settings::Needs;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub const KIND: Kind = Kind {
    name: "smtp",
    channel: herald_schemas::Channel::Email,
    check: |p| Smtp::settings(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(Smtp::new(p)?)),
    receipts: None,
    accepts: crate::any_address,
};

/// Pooled SMTP connections per provider.
const SMTP_POOL: usize = 16;

/// What an SMTP provider entry says.
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub from: Mailbox,
}

pub struct Smtp {
    pool: Pool,
    from: Mailbox,
}

impl Smtp {
    /// Reads and checks the provider's settings (no transport is built: that needs a runtime).
    pub fn settings(p: &ProviderConfig) -> Result<Settings, ProviderError> {
        let mut n = Needs::new(p);
        let (host, port) = match p
            .endpoint
            .rsplit_once(':')
            .and_then(|(h, port)| Some((h.to_owned(), port.parse::<u16>().ok()?)))
        {
            Some(hp) => hp,
            None => {
                n.problem(format!(
                    "smtp needs endpoint host:port, not {:?}",
                    p.endpoint
                ));
                (String::new(), 0)
            }
        };
        let domain = n.setting_or("tls_domain", &host);
        let ca_pem = match p.settings.get("tls_ca_file") {
            Some(ca) => match std::fs::read(ca) {
                Ok(pem) => Some(pem),
                Err(e) => {
                    n.problem(format!("settings.tls_ca_file {ca}: {e}"));
                    None
                }
            },
            None => None,
        };
        // STARTTLS: lettre's TLS parameters (it upgrades the session).
        let mut starttls = || -> Option<TlsParameters> {
            let mut tp = TlsParameters::builder(domain.clone());
            if let Some(pem) = &ca_pem {
                match Certificate::from_pem(pem) {
                    Ok(cert) => tp = tp.add_root_certificate(cert),
                    Err(e) => {
                        n.problem(format!("settings.tls_ca_file: {e}"));
                        return None;
                    }
                }
            }
            tp.build().map_err(|e| n.problem(format!("tls: {e}"))).ok()
        };
        let security = match p.tls.as_deref().unwrap_or("none") {
            "none" => Some(Security::None),
            "starttls" => starttls().map(Security::StartTls),
            // Implicit TLS: Herald's own connector (it opens the socket; see pool.rs).
            "implicit" => {
                let mut b = native_tls::TlsConnector::builder();
                let cert = ca_pem.as_deref().map(native_tls::Certificate::from_pem);
                match cert {
                    Some(Err(e)) => {
                        n.problem(format!("settings.tls_ca_file: {e}"));
                        None
                    }
                    cert => {
                        if let Some(Ok(cert)) = cert {
                            b.add_root_certificate(cert);
                        }
                        b.build()
                            .map_err(|e| n.problem(format!("tls: {e}")))
                            .ok()
                            .map(|c| Security::Implicit {
                                connector: c.into(),
                                domain: domain.clone(),
                            })
                    }
                }
            }
            other => {
                n.problem(format!("tls {other:?}: want none, starttls or implicit"));
                None
            }
        };
        let from: Option<Mailbox> = match p.from.as_deref() {
            None => {
                n.problem("smtp needs from");
                None
            }
            Some(f) => f.parse().map_err(|e| n.problem(format!("from: {e}"))).ok(),
        };
        n.done()?;
        let (Some(security), Some(from)) = (security, from) else {
            unreachable!("every None above recorded a problem")
        };
        Ok(Settings {
            host,
            port,
            security,
            from,
        })
    }

    /// The client: a pool of sessions, opened as calls need them. Sessions need a Tokio runtime.
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let Settings {
            host,
            port,
            security,
            from,
        } = Self::settings(p)?;
        let credentials = match (p.credentials.get("username"), p.credentials.get("password")) {
            (Some(u), Some(pw)) => Some(Credentials::new(u.clone(), pw.clone())),
            _ => None,
        };
        let timeout = Duration::from_millis(p.timeout_ms);
        Ok(Smtp {
            pool: Pool::new(host, port, security, credentials, timeout, SMTP_POOL),
            from,
        })
    }

    fn message(&self, m: &MessageRouted) -> Result<lettre::Message, Reason> {
        let to: Mailbox = m
            .recipient
            .address
            .parse()
            .map_err(|e| Reason::new("invalid_recipient", format!("{e}")))?;
        let b = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .message_id(Some(format!("<{}@herald>", m.header.message_id)))
            .subject(m.content.subject.clone().unwrap_or_default());
        let text = m
            .content
            .text
            .clone()
            .or_else(|| m.content.markdown.clone());
        let built = match (text, m.content.html.clone()) {
            (Some(t), Some(h)) => b.multipart(MultiPart::alternative_plain_html(t, h)),
            (None, Some(h)) => b.singlepart(
                SinglePart::builder()
                    .header(header::ContentType::TEXT_HTML)
                    .body(h),
            ),
            (Some(t), None) => b.singlepart(SinglePart::plain(t)),
            (None, None) => b.singlepart(SinglePart::plain(String::new())),
        };
        built.map_err(|e| Reason::new("invalid_message", e.to_string()))
    }
}

impl Provider for Smtp {
    fn max_in_flight(&self) -> usize {
        SMTP_POOL
    }

    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let msg = match self.message(m) {
                Ok(msg) => msg,
                Err(reason) => {
                    return CallResult::fail(DeliveryOutcome::FailedPermanent, None, reason);
                }
            };
            let unavailable = |e: String| {
                let reason = Reason::new("smtp_unavailable", e);
                CallResult::fail(DeliveryOutcome::FailedTransient, None, reason)
            };
            match self.pool.send(msg.envelope(), &msg.formatted()).await {
                Ok(resp) => CallResult::ok(
                    resp.code().to_string(),
                    resp.message().next().map(str::to_owned),
                ),
                Err(Failure::Connect(e)) => unavailable(e),
                Err(Failure::Tls(e)) => CallResult::fail(
                    DeliveryOutcome::FailedPermanent,
                    None,
                    Reason::new("smtp_client_error", e),
                ),
                // The message may have been accepted before the answer was lost.
                Err(Failure::Timeout) => CallResult::fail(
                    DeliveryOutcome::Unknown,
                    None,
                    Reason::new("smtp_timeout", "no answer within the provider's timeout"),
                ),
                Err(Failure::Lost(e)) => CallResult::fail(
                    DeliveryOutcome::Unknown,
                    None,
                    Reason::new("smtp_connection_lost", e),
                ),
                Err(Failure::Unsupported(e)) => CallResult::fail(
                    DeliveryOutcome::FailedPermanent,
                    None,
                    Reason::new("smtp_client_error", e),
                ),
                Err(Failure::Smtp(e)) => {
                    let code = e.status().map(|c| c.to_string());
                    // A client error is our side refusing (e.g. non-ASCII content to a server
                    // without 8BITMIME, no STARTTLS offered): a configuration problem.
                    let (outcome, reason) = if e.is_permanent() {
                        (DeliveryOutcome::FailedPermanent, "smtp_rejected")
                    } else if e.is_client() || e.is_tls() {
                        (DeliveryOutcome::FailedPermanent, "smtp_client_error")
                    } else {
                        (DeliveryOutcome::FailedTransient, "smtp_unavailable")
                    };
                    let reason = Reason::new(reason, e.to_string());
                    CallResult::fail(outcome, code, reason)
                }
            }
        })
    }
}
