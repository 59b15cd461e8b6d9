//! The registry against the shipped config: every provider in `ops/herald.toml` is known to the
//! registry and builds (no connection is made), every registered kind is configured there, and a
//! provider entry's problems are all listed at config load.

use herald_core::config::{Config, ConfigError};
use herald_core::netguard::Guard;
use herald_providers::{Context, REGISTRY};

fn shipped_config() -> Config {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../ops/herald.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut cfg = Config::parse(&text).unwrap();
    // Every variable the config names is set (long enough for the server secret).
    cfg.apply_env(any_secret);
    cfg
}

/// The environment of a deployment: every secret variable set (each to a different value),
/// nothing else overridden.
fn any_secret(name: &str) -> Option<String> {
    if name.ends_with("AUTH_KEY") {
        // An APNs .p8 key must be a P-256 key.
        return Some(include_str!("../src/apns/testdata/rfc7515-a3.p8").to_owned());
    }
    if name.ends_with("SERVICE_ACCOUNT") {
        // A key file must be one: a service account with a real RSA key.
        return Some(
            serde_json::json!({
                "type": "service_account", "project_id": "p", "private_key_id": "k",
                "private_key": include_str!("../src/fcm/testdata/rfc7515-a2.pem"),
                "client_email": "a@p.iam.gserviceaccount.com",
                "token_uri": "https://oauth2.googleapis.com/token",
            })
            .to_string(),
        );
    }
    ((!name.starts_with("HERALD_") && !name.starts_with("OTEL_"))
        || name.contains("SECRET")
        || name.contains("SIM_"))
    // A value of its own per variable: validation refuses a receipt secret equal to a signing one.
    .then(|| format!("a-value-for-{name}-0123456789"))
}

/// Building the SMTP client's pool needs a runtime, as in the send stage.
#[tokio::test]
async fn every_configured_provider_builds_from_ops_herald_toml() {
    let mut cfg = shipped_config();
    cfg.validate(&REGISTRY).unwrap();
    let guard = Guard::new(&cfg.security.outbound_allow);
    let cx = Context {
        postgres_url: &cfg.postgres.url,
        guard: &guard,
    };
    for p in &cfg.providers {
        let kind = REGISTRY.find(&p.kind).unwrap();
        assert_eq!(p.channel, Some(kind.channel), "{}", p.code);
        if let Err(e) = REGISTRY.build(p, &cx) {
            panic!("{}: {e}", p.code);
        }
    }
    for kind in REGISTRY.kinds() {
        assert!(
            cfg.providers.iter().any(|p| p.kind == kind.name),
            "kind {} is registered but ops/herald.toml configures no provider of it",
            kind.name
        );
    }
}

#[test]
fn receipts_are_found_by_kind() {
    assert!(REGISTRY.receipts("aliyun_sms").is_some());
    assert!(REGISTRY.receipts("tencent_sms").is_some());
    assert!(REGISTRY.receipts("smtp").is_none());
    assert!(REGISTRY.receipts("nope").is_none());
}

/// `herald config validate` used to pass an Aliyun provider without `sign_name`, and the send
/// stage then failed on the first missing value only.
#[test]
fn config_load_lists_every_problem_of_every_provider() {
    let mut cfg = shipped_config();
    let text = r#"
        [[providers]]
        code = "ali"
        kind = "aliyun_sms"
        endpoint = "http://127.0.0.1:1/aliyun"
        settings = { signature = "v4" }

        [[providers]]
        code = "mail"
        kind = "smtp"
        endpoint = "localhost"
        tls = "sometimes"

        [[providers]]
        code = "corp"
        kind = "wecom_app"
        settings = { agent_id = "seven" }

        [[providers]]
        code = "tc"
        kind = "tencent_sms"
        endpoint = "not a url"
        credentials_env = { secret_id = "TC_ID", secret_key = "TC_KEY" }
        settings = { sdk_app_id = "1400000000", sign_name = "Herald" }

        [[providers]]
        code = "carrier-pigeon"
        kind = "pigeon"
    "#;
    cfg.providers = Config::parse(text).unwrap().providers;
    cfg.rules.clear();
    cfg.policies.clear();
    cfg.apply_env(any_secret);
    let ConfigError::Invalid(problems) = cfg.validate(&REGISTRY).unwrap_err() else {
        panic!("expected Invalid");
    };
    let all = problems.join("\n");
    for needle in [
        "providers.ali: settings.signature \"v4\": want v2 or acs3",
        "providers.ali: credential access_key_id is required",
        "providers.ali: credential access_key_secret is required",
        "providers.ali: settings.sign_name is required",
        "providers.mail: smtp needs endpoint host:port",
        "providers.mail: tls \"sometimes\": want none, starttls or implicit",
        "providers.mail: smtp needs from",
        "providers.corp: settings.agent_id must be an integer",
        "providers.corp: endpoint is required",
        "providers.corp: credential corp_id is required",
        "providers.corp: credential corp_secret is required",
        "providers.tc: endpoint: relative URL without a base",
        "providers.carrier-pigeon: unknown kind \"pigeon\"",
    ] {
        assert!(all.contains(needle), "{needle:?} missing from:\n{all}");
    }
}
