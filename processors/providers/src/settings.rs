//! Reading a provider's settings and credentials into its typed client, every problem collected:
//! `herald config validate` (and every process at start) lists all of a config's problems at
//! once, not the first one the send stage would have tripped over.

use herald_core::config::ProviderConfig;

use crate::ProviderError;

/// What a provider needs from its `[[providers]]` entry; missing or malformed values are
/// recorded (and an empty placeholder returned) so reading goes on to the end.
pub struct Needs<'a> {
    p: &'a ProviderConfig,
    problems: Vec<String>,
}

impl<'a> Needs<'a> {
    pub fn new(p: &'a ProviderConfig) -> Self {
        Needs {
            p,
            problems: Vec::new(),
        }
    }

    /// A credential the provider cannot work without (from `credentials_env`).
    pub fn credential(&mut self, name: &str) -> String {
        match self.p.credentials.get(name).filter(|v| !v.is_empty()) {
            Some(v) => v.clone(),
            None => {
                // An unset variable is reported by the config itself.
                if !self.p.credentials_env.contains_key(name) {
                    self.problem(format!(
                        "credential {name} is required (credentials_env.{name})"
                    ));
                }
                String::new()
            }
        }
    }

    /// A setting the provider cannot work without.
    pub fn setting(&mut self, name: &str) -> String {
        match self.p.settings.get(name).filter(|v| !v.is_empty()) {
            Some(v) => v.clone(),
            None => {
                self.problem(format!("settings.{name} is required"));
                String::new()
            }
        }
    }

    /// An optional setting with its default.
    pub fn setting_or(&self, name: &str, default: &str) -> String {
        self.p
            .settings
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    }

    /// A required setting parsed into `T`.
    pub fn parsed<T: std::str::FromStr>(&mut self, name: &str, what: &str) -> Option<T> {
        let raw = self.setting(name);
        if raw.is_empty() {
            return None;
        }
        let v = raw.parse().ok();
        if v.is_none() {
            self.problem(format!("settings.{name} must be {what}"));
        }
        v
    }

    /// The provider's endpoint URL, without a trailing `/`.
    pub fn endpoint(&mut self) -> String {
        if self.p.endpoint.is_empty() {
            self.problem("endpoint is required");
        }
        self.p.endpoint.trim_end_matches('/').to_owned()
    }

    /// `host[:port]` of the endpoint URL, as the HTTP client sends it in `Host` (signed by
    /// Aliyun ACS3 and Tencent TC3).
    pub fn signed_host(&mut self, endpoint: &str) -> String {
        if endpoint.is_empty() {
            return String::new();
        }
        match reqwest::Url::parse(endpoint) {
            Ok(url) => match (url.host_str(), url.port()) {
                (Some(h), Some(port)) => format!("{h}:{port}"),
                (Some(h), None) => h.to_owned(),
                _ => {
                    self.problem("endpoint has no host");
                    String::new()
                }
            },
            Err(e) => {
                self.problem(format!("endpoint: {e}"));
                String::new()
            }
        }
    }

    pub fn problem(&mut self, m: impl Into<String>) {
        self.problems.push(m.into());
    }

    /// Fails with every problem recorded, if any.
    pub fn done(self) -> Result<(), ProviderError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(ProviderError::Config {
                code: self.p.code.clone(),
                problems: self.problems,
            })
        }
    }
}
