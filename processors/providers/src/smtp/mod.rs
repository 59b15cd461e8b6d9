//! E-mail over SMTP (lettre): pooled connections, plain / STARTTLS-required / implicit TLS, auth.
//!
//! Config: endpoint `host:port`; `tls` = `none` | `starttls` (required: nothing, credentials
//! included, goes in clear) | `implicit` (port 465); optional credentials `username`,
//! `password`; optional settings `tls_ca_file` (PEM of a private CA to trust) and `tls_domain`
//! (the name to verify, default the endpoint's host).

use std::time::Duration;

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};
use lettre::message::{Mailbox, MultiPart, SinglePart, header};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::settings::Needs;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub const KIND: Kind = Kind {
    name: "smtp",
    channel: herald_schemas::Channel::Email,
    check: |p| Smtp::settings(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(Smtp::new(p)?)),
    receipts: None,
};

/// Pooled SMTP connections per provider.
const SMTP_POOL: u32 = 16;

/// What an SMTP provider entry says.
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub tls: Tls,
    pub from: Mailbox,
}

pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
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
        let mut params = || -> Option<TlsParameters> {
            let domain = n.setting_or("tls_domain", &host);
            let mut tp = TlsParameters::builder(domain);
            if let Some(ca) = p.settings.get("tls_ca_file") {
                let cert = std::fs::read(ca)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| Certificate::from_pem(&pem).map_err(|e| e.to_string()));
                match cert {
                    Ok(cert) => tp = tp.add_root_certificate(cert),
                    Err(e) => {
                        n.problem(format!("settings.tls_ca_file {ca}: {e}"));
                        return None;
                    }
                }
            }
            tp.build().map_err(|e| n.problem(format!("tls: {e}"))).ok()
        };
        let tls = match p.tls.as_deref().unwrap_or("none") {
            "none" => Some(Tls::None),
            "starttls" => params().map(Tls::Required),
            "implicit" => params().map(Tls::Wrapper),
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
        let (Some(tls), Some(from)) = (tls, from) else {
            unreachable!("every None above recorded a problem")
        };
        Ok(Settings {
            host,
            port,
            tls,
            from,
        })
    }

    /// The client: a pool of connections, opened as calls need them. Needs a Tokio runtime.
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let Settings {
            host,
            port,
            tls,
            from,
        } = Self::settings(p)?;
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host)
            .tls(tls)
            .port(port)
            .timeout(Some(Duration::from_millis(p.timeout_ms)))
            .pool_config(PoolConfig::new().max_size(SMTP_POOL));
        if let (Some(u), Some(pw)) = (p.credentials.get("username"), p.credentials.get("password"))
        {
            b = b.credentials(Credentials::new(u.clone(), pw.clone()));
        }
        Ok(Smtp {
            transport: b.build(),
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
        SMTP_POOL as usize
    }

    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let msg = match self.message(m) {
                Ok(msg) => msg,
                Err(reason) => {
                    return CallResult::fail(DeliveryOutcome::FailedPermanent, None, reason);
                }
            };
            match self.transport.send(msg).await {
                Ok(resp) => CallResult::ok(
                    resp.code().to_string(),
                    resp.message().next().map(str::to_owned),
                ),
                Err(e) => {
                    let code = e.status().map(|c| c.to_string());
                    // A client error is our side refusing (e.g. no way to authenticate without
                    // sending credentials in clear): a configuration problem, not transient.
                    let (outcome, reason) = if e.is_permanent() {
                        (DeliveryOutcome::FailedPermanent, "smtp_rejected")
                    } else if e.is_client() || e.is_tls() {
                        (DeliveryOutcome::FailedPermanent, "smtp_client_error")
                    } else if e.is_timeout() {
                        // The message may have been accepted before the answer was lost.
                        (DeliveryOutcome::Unknown, "smtp_timeout")
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
