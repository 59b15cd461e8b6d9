//! Secrets and personal data never leave in error texts (promise 8). Every failure reason the
//! send and callback stages record passes through [`Redactor::clean`]: URLs lose their query
//! strings and user info (WeCom `corpsecret` and robot `key`, DingTalk `access_token`, fetched
//! access tokens, Aliyun's signed query with the phone number and template parameters), and
//! every configured secret value is replaced by `[redacted]`.

use std::sync::Arc;

use herald_core::config::Config;

/// Secret values shorter than this are not searched for (they would match ordinary text).
const MIN_SECRET_CHARS: usize = 6;

/// Replaces configured secrets and URL query strings in texts.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Arc<Vec<String>>,
}

impl Redactor {
    /// Every secret the config holds: app secrets, provider credentials, alert secrets, the
    /// server secret.
    pub fn new(config: &Config) -> Redactor {
        let mut secrets: Vec<String> = config
            .apps
            .iter()
            .map(|a| a.secret.clone())
            .chain(
                config
                    .providers
                    .iter()
                    .flat_map(|p| p.credentials.values().cloned()),
            )
            .chain(config.rules.iter().map(|r| r.action_config.secret.clone()))
            .chain(std::iter::once(config.security.secret.clone()))
            .filter(|s| s.chars().count() >= MIN_SECRET_CHARS)
            .collect();
        // Longest first, so a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor {
            secrets: Arc::new(secrets),
        }
    }

    /// A redactor for just these values (tests, and stages that learn secrets at run time).
    pub fn with(values: &[&str]) -> Redactor {
        Redactor {
            secrets: Arc::new(
                values
                    .iter()
                    .filter(|s| s.chars().count() >= MIN_SECRET_CHARS)
                    .map(|s| (*s).to_owned())
                    .collect(),
            ),
        }
    }

    /// `text` without URL query strings or user info, and without any configured secret.
    pub fn clean(&self, text: &str) -> String {
        let mut out = strip_url_queries(text);
        for s in self.secrets.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "[redacted]");
            }
        }
        out
    }
}

/// Cuts the query string (and fragment) off every `http://`/`https://` URL in `text`, and any
/// `user:password@` in front of its host.
pub fn strip_url_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let at = match (rest.find("http://"), rest.find("https://")) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => break,
        };
        out.push_str(&rest[..at]);
        let url_and_more = &rest[at..];
        let end = url_and_more
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | '<'))
            .unwrap_or(url_and_more.len());
        let url = &url_and_more[..end];
        let cut = url.find(['?', '#']).unwrap_or(url.len());
        let mut kept = url[..cut].to_owned();
        if let Some(scheme_end) = kept.find("://") {
            let authority_start = scheme_end + 3;
            let authority_end = kept[authority_start..]
                .find('/')
                .map_or(kept.len(), |i| authority_start + i);
            if let Some(at_sign) = kept[authority_start..authority_end].rfind('@') {
                kept.replace_range(authority_start..authority_start + at_sign + 1, "");
            }
        }
        out.push_str(&kept);
        if cut < url.len() {
            out.push_str("?[redacted]");
        }
        rest = &url_and_more[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_user_info_and_secrets_go() {
        let r = Redactor::with(&["s3cr3t-value", "abc"]);
        let text = "error sending request for url (https://qyapi.weixin.qq.com/cgi-bin/gettoken?corpid=ww1&corpsecret=s3cr3t-value): timed out; also http://u:pw@h:1/p?x=1#f and s3cr3t-value, abc";
        let clean = r.clean(text);
        assert!(!clean.contains("corpsecret"), "{clean}");
        assert!(!clean.contains("s3cr3t-value"), "{clean}");
        assert!(!clean.contains("pw@"), "{clean}");
        assert!(clean.contains("https://qyapi.weixin.qq.com/cgi-bin/gettoken?[redacted]"));
        assert!(clean.contains("http://h:1/p?[redacted]"));
        // Too short to search for: left alone.
        assert!(clean.ends_with("abc"));
        assert_eq!(r.clean("plain text, no url"), "plain text, no url");
        assert_eq!(
            strip_url_queries("https://x/é?q=é"),
            "https://x/é?[redacted]"
        );
    }
}
