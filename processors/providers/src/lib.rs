//! Herald's providers, one folder per provider kind, each owning everything about it: its kind
//! name and channel, its settings and credentials (read into its typed client, every problem
//! listed), its signer, its sender with its error-code table, and its receipt parser where the
//! provider pushes receipts. The send and callback stages find providers only through
//! [`REGISTRY`]; the config's provider kinds are checked against it when the config loads.
//!
//! Each sender classifies its answer once, at the edge: success, permanent failure, transient
//! failure, rate-limited, or unknown (the request may have left and the answer was lost).
//!
//! Every HTTP client here is built by [`http::http_client_builder`], which ignores proxies from
//! the environment (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`): calls go straight to the
//! provider, and guarded ones (webhook recipients) straight to an address the outbound guard
//! permitted. Herald has no proxy setting.
//!
//! Adding a provider: a folder here with a `KIND`, one line in [`REGISTRY`], its `[[providers]]`
//! entry in the config, and its simulator in `tests/simulators` (README, "Adding a provider").

pub mod aliyun_sms;
pub mod apns;
pub mod dingtalk_robot;
pub mod fcm;
pub mod feishu_bot;
pub mod http;
pub mod huawei_sms;
pub mod inapp;
pub mod jpush;
pub mod receipt;
pub mod settings;
pub mod smtp;
pub mod tencent_sms;
pub mod token;
pub mod webhook;
pub mod wechat_oa;
pub mod wecom;
pub mod zrwinfo_sms;

use futures::future::BoxFuture;
use herald_core::config::{ProviderConfig, ProviderKinds};
use herald_core::netguard::Guard;
use herald_schemas::{Channel, DeliveryOutcome, MessageRouted};

pub use herald_domain::failure::CallResult;
pub use receipt::{Receipts, Report};

use http::provider_error;

/// Every provider kind Herald knows. One line per provider.
pub static REGISTRY: Registry = Registry(&[
    smtp::KIND,
    aliyun_sms::KIND,
    tencent_sms::KIND,
    huawei_sms::KIND,
    wecom::ROBOT,
    wecom::APP,
    dingtalk_robot::KIND,
    feishu_bot::KIND,
    wechat_oa::KIND,
    webhook::KIND,
    inapp::KIND,
    fcm::KIND,
    apns::KIND,
    jpush::KIND,
    zrwinfo_sms::KIND,
]);

/// Builds one provider's client.
pub type Build = fn(&ProviderConfig, &Context) -> Result<Box<dyn Provider>, ProviderError>;

/// A provider kind: what the registry knows about it.
pub struct Kind {
    /// The `kind` of a `[[providers]]` entry.
    pub name: &'static str,
    pub channel: Channel,
    /// Reads and checks one configured provider's settings and credentials, every problem
    /// listed (run when the config loads).
    pub check: fn(&ProviderConfig) -> Result<(), ProviderError>,
    /// Builds the client of one configured provider (reading its settings, every problem
    /// listed). Makes no connection.
    pub build: Build,
    /// The provider's receipt push format, if it pushes receipts to the callback stage.
    pub receipts: Option<Receipts>,
    /// Which recipient addresses it can reach: the route stage (and `switch_provider`) only
    /// give a message to providers that accept its address (mobile push: one platform each).
    pub accepts: fn(&str) -> bool,
}

/// Every address (all but mobile push).
pub fn any_address(_: &str) -> bool {
    true
}

/// Mobile push addresses name their platform (one validation, one reading).
pub use herald_domain::validate::push_platform;

/// What building a client may need besides its own config entry.
pub struct Context<'a> {
    /// Herald's PostgreSQL (the in-app inbox lives there).
    pub postgres_url: &'a str,
    /// The outbound-address guard, for providers whose destination comes from the message.
    pub guard: &'a Guard,
}

pub struct Registry(&'static [Kind]);

impl Registry {
    pub fn kinds(&self) -> &'static [Kind] {
        self.0
    }

    pub fn find(&self, kind: &str) -> Option<&'static Kind> {
        self.0.iter().find(|k| k.name == kind)
    }

    /// Builds the client for a configured provider.
    pub fn build(
        &self,
        p: &ProviderConfig,
        cx: &Context,
    ) -> Result<Box<dyn Provider>, ProviderError> {
        let kind = self
            .find(&p.kind)
            .ok_or_else(|| ProviderError::one(p, format!("unknown kind {:?}", p.kind)))?;
        (kind.build)(p, cx)
    }

    /// Whether a provider of `kind` can reach `address` (unknown kinds reach nothing).
    pub fn accepts(&self, kind: &str, address: &str) -> bool {
        self.find(kind).is_some_and(|k| (k.accepts)(address))
    }

    /// The receipt format of a provider kind, if it has one.
    pub fn receipts(&self, kind: &str) -> Option<&'static Receipts> {
        self.find(kind).and_then(|k| k.receipts.as_ref())
    }
}

impl herald_domain::failure::eligible::Reach for Registry {
    fn accepts(&self, kind: &str, address: &str) -> bool {
        Registry::accepts(self, kind, address)
    }
}

impl ProviderKinds for Registry {
    fn channel(&self, kind: &str) -> Option<Channel> {
        self.find(kind).map(|k| k.channel)
    }

    fn check(&self, p: &ProviderConfig) -> Vec<String> {
        let Some(kind) = self.find(&p.kind) else {
            return vec![format!("unknown kind {:?}", p.kind)];
        };
        match (kind.check)(p) {
            Ok(()) => Vec::new(),
            Err(ProviderError::Config { problems, .. }) => problems,
        }
    }

    fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|k| k.name).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Every problem with the provider's config entry.
    #[error("provider {code}: {}", .problems.join("; "))]
    Config { code: String, problems: Vec<String> },
}

impl ProviderError {
    pub fn one(p: &ProviderConfig, problem: impl Into<String>) -> ProviderError {
        ProviderError::Config {
            code: p.code.clone(),
            problems: vec![problem.into()],
        }
    }
}

pub trait Provider: Send + Sync {
    /// Whether the channel confirms delivery later by receipt (then success means `sent`).
    fn has_receipts(&self) -> bool {
        false
    }
    /// How many calls can really be in progress at once (e.g. the SMTP connection pool): the
    /// send stage never marks more attempts as started than this.
    fn max_in_flight(&self) -> usize {
        256
    }
    fn send<'a>(&'a self, m: &'a MessageRouted, attempt: i32) -> BoxFuture<'a, CallResult>;
    /// Whether this answer says the recipient's address is gone for good (a mobile push
    /// device token the provider no longer knows): the send stage records it, the route stage
    /// suppresses later sends to it.
    fn dead_address(&self, _r: &CallResult) -> bool {
        false
    }
    /// Most messages one provider call can carry (1: no batching).
    fn batch_max(&self) -> usize {
        1
    }
    /// Sends several messages in one call where the provider allows it; one result per message,
    /// in order. Only called with up to [`Provider::batch_max`] messages.
    fn send_batch<'a>(
        &'a self,
        msgs: &'a [(&'a MessageRouted, i32)],
    ) -> BoxFuture<'a, Vec<CallResult>> {
        Box::pin(futures::future::join_all(
            msgs.iter().map(|(m, a)| self.send(m, *a)),
        ))
    }
}

/// Puts grouped calls' results back in message order: each group is the indexes of the messages
/// one call carried and that call's results. A message no result came back for (a provider
/// answering for fewer numbers than it was sent) gets a transient internal error.
pub fn in_message_order<I: AsRef<[usize]>>(
    n: usize,
    groups: impl IntoIterator<Item = (I, Vec<CallResult>)>,
) -> Vec<CallResult> {
    let mut out: Vec<Option<CallResult>> = vec![None; n];
    for (idx, results) in groups {
        for (i, r) in idx.as_ref().iter().zip(results) {
            if let Some(slot) = out.get_mut(*i) {
                *slot = Some(r);
            }
        }
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                provider_error(DeliveryOutcome::FailedTransient, "internal", "no result")
            })
        })
        .collect()
}
