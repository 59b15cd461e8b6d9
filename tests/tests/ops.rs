//! The operations kit in `ops/`, checked: the alert rules by `promtool` (syntax and their unit
//! tests), the Kubernetes manifests against the Kubernetes schemas (and their herald.toml by
//! `herald config`), the Grafana dashboard's and the rules' metric names against what a live
//! Herald exports on `/metrics`, and README's metrics table against the one list of names.
//! The checkers come from `scripts/stack` (HERALD_PROMTOOL, HERALD_KUBE_VALIDATE_PATH).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use herald_core::telemetry;
use herald_tests::*;
use serde_json::json;

fn ops(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ops")
        .join(rel)
}

fn tool(var: &str) -> PathBuf {
    let p = std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `eval \"$(scripts/stack env)\"` (scripts/stack installs it)")
    });
    assert!(
        Path::new(&p).exists(),
        "{var}={p} does not exist: run scripts/stack install"
    );
    PathBuf::from(p)
}

/// Runs a checker; its output on failure.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().expect("run checker");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Every metric name a file mentions (`herald_…` in lower case; a histogram's `_bucket`, `_sum`
/// and `_count` series are its own name).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("herald_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && telemetry::ALL.contains(&base)
            {
                name = base;
            }
        }
        names.insert(name.to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = tool("HERALD_PROMTOOL");
    let checked = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(ops("prometheus/alerts.yml")))
    .unwrap_or_else(|e| panic!("promtool check rules:\n{e}"));
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = run(Command::new(&promtool)
        .args(["test", "rules"])
        .arg(ops("prometheus/alerts.test.yml")))
    .unwrap_or_else(|e| panic!("promtool test rules:\n{e}"));
    assert!(tested.contains("SUCCESS"), "{tested}");

    // The checker does catch a broken rule: it is not just accepting anything.
    let broken = std::env::temp_dir().join(format!("{}.yml", unique("broken-rules")));
    let rules = std::fs::read_to_string(ops("prometheus/alerts.yml")).unwrap();
    std::fs::write(
        &broken,
        rules.replace(
            "max by (app) (herald_app_quota_used_ratio) > 0.8",
            "max by (app (x",
        ),
    )
    .unwrap();
    let refused = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&broken));
    assert!(refused.is_err(), "a rule that does not parse is refused");
    let _ = std::fs::remove_file(broken);

    // Each of the alerts is there.
    for alert in [
        "HeraldRequestToCallSlow",
        "HeraldFailureRateHigh",
        "HeraldStageInstancesLow",
        "HeraldConsumerLagGrowing",
        "HeraldBreakerOpen",
        "HeraldDeadLettersGrowing",
        "HeraldAppQuotaNearlyUsed",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
}

#[test]
fn the_kubernetes_manifests_are_schema_valid_and_herald_accepts_their_config() {
    let lib = tool("HERALD_KUBE_VALIDATE_PATH");
    let validate = |files: &[PathBuf]| {
        run(Command::new("python3")
            .env("PYTHONPATH", &lib)
            .args(["-m", "kubernetes_validate", "--strict"])
            .args(files))
    };
    let manifests = [ops("k8s/config.yaml"), ops("k8s/herald.yaml")];
    let out = validate(&manifests).unwrap_or_else(|e| panic!("kubernetes-validate:\n{e}"));
    for resource in [
        "deployment/herald-gateway",
        "deployment/herald-pipeline",
        "deployment/herald-send",
        "deployment/herald-projector",
        "poddisruptionbudget/herald-send",
        "configmap/herald-config",
        "secret/herald-secrets",
    ] {
        assert!(
            out.contains(&format!("passed for resource {resource}")),
            "{resource}: {out}"
        );
    }
    let text = std::fs::read_to_string(&manifests[1]).unwrap();
    assert_eq!(
        text.matches("livenessProbe:").count(),
        4,
        "every Deployment has probes"
    );
    assert_eq!(text.matches("readinessProbe:").count(), 4);

    // The validator refuses what Kubernetes would: a misspelt field.
    let broken = std::env::temp_dir().join(format!("{}.yaml", unique("broken-k8s")));
    std::fs::write(
        &broken,
        text.replacen("readinessProbe:", "readynessProbe:", 1),
    )
    .unwrap();
    assert!(
        validate(std::slice::from_ref(&broken)).is_err(),
        "a misspelt field is refused"
    );
    let _ = std::fs::remove_file(broken);

    // The ConfigMap's herald.toml is a config Herald accepts, with the Secret's variables set.
    let config = std::fs::read_to_string(&manifests[0]).unwrap();
    let toml: String = config
        .split("herald.toml: |\n")
        .nth(1)
        .expect("herald.toml in the ConfigMap")
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let file = std::env::temp_dir().join(format!("{}.toml", unique("k8s-config")));
    std::fs::write(&file, toml).unwrap();
    let secrets = [
        "HERALD_SERVER_SECRET",
        "HERALD_APP_ORDERS_SECRET",
        "HERALD_SMTP_USERNAME",
        "HERALD_SMTP_PASSWORD",
    ];
    for s in secrets {
        assert!(config.contains(&format!("{s}: ")), "the Secret holds {s}");
    }
    let checked = run(Command::new(herald_bin())
        .arg("-c")
        .arg(&file)
        .args(["config", "validate"])
        .envs(
            secrets
                .iter()
                .map(|s| (*s, "a-long-enough-test-secret-0123456789")),
        ));
    assert!(
        checked.is_ok(),
        "herald config refuses the ConfigMap's config: {checked:?}"
    );
    let _ = std::fs::remove_file(file);
}

#[test]
fn the_readme_metrics_table_lists_exactly_the_metrics_herald_declares() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let section = readme
        .split("## Metrics\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a Metrics section");
    let table: BTreeSet<String> = section
        .lines()
        .filter(|l| l.starts_with("| `herald_"))
        .flat_map(metric_names)
        .collect();
    let declared: BTreeSet<String> = telemetry::ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        table, declared,
        "README's metrics table and telemetry::names differ"
    );
}

/// The dashboard and the rules query only metrics a live Herald exports, and Herald exports
/// only metrics it declares. The run drives the paths that create them: an e-mail and an SMS
/// through the gateway (the SMS's receipt comes back through the callback), a paced Feishu
/// message (rate limit), and an undecodable request (dead letter).
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_alert_rules_use_only_metrics_a_live_herald_exports() {
    let (api, admin) = (18_700, 19_900);
    let cfg = std::env::temp_dir().join("herald-ops.toml");
    let base = std::fs::read_to_string(config_path()).unwrap();
    // A quota for the demo app, so that its usage is exported.
    let with_quota = base.replacen(
        "secret_env = \"HERALD_APP_DEMO_SECRET\"",
        "secret_env = \"HERALD_APP_DEMO_SECRET\"\ndaily_quota = 1000000",
        1,
    );
    assert_ne!(base, with_quota, "ops/herald.toml's demo app moved");
    std::fs::write(&cfg, with_quota).unwrap();
    let _herald = Herald::start(&cfg, &herald_env(api, admin));
    let http = reqwest::Client::new();
    api_up(api).await;
    let token = herald_simulators::credential("HERALD_SIM_CALLBACK_TOKEN");
    let receipts = format!("http://127.0.0.1:{}/callbacks/aliyun-sim/{token}", api + 1);
    http.put(format!("{}/_control/aliyun/receipts", sim_url()))
        .json(&json!({ "url": receipts }))
        .send()
        .await
        .unwrap();

    let now = herald_core::util::now_ms();
    let tag = unique("ops");
    let phone = format!("139{:08}", now % 100_000_000);
    let bodies = [
        json!({"app_id": "demo", "channel": "EMAIL", "template": "welcome",
               "params": {"product": "Herald"}, "priority": "HIGH", "requested_at": now,
               "recipients": [{"address": format!("{tag}@example.com"), "params": {"name": "Ops"}}]}),
        json!({"app_id": "demo", "channel": "SMS", "template": "verify_code", "priority": "HIGH",
               "params": {"code": "482913"}, "recipients": [{"address": phone}], "requested_at": now}),
        json!({"app_id": "demo", "channel": "FEISHU", "content": {"text": format!("ops {tag}")},
               "priority": "HIGH", "recipients": [{"address": "-"}], "requested_at": now}),
    ];
    let mut ids = Vec::new();
    for body in &bodies {
        ids.push(send_message(api, body).await);
    }
    // An undecodable request: dead-lettered with its bytes.
    publish_records(
        "kafka",
        vec![herald_core::transport::OutRecord {
            topic: herald_schemas::topics::REQUESTS.into(),
            key: Some(tag.clone().into_bytes()),
            payload: b"not avro at all".to_vec(),
            headers: vec![],
        }],
    )
    .await;
    for id in &ids {
        await_status(api, id, "delivered").await;
    }

    // Every name the dashboard and the rules use is on /metrics (lag, outbox backlogs and quota
    // are reported on a timer: wait for them too).
    let mut wanted = metric_names(&std::fs::read_to_string(ops("grafana/herald.json")).unwrap());
    wanted.extend(metric_names(
        &std::fs::read_to_string(ops("prometheus/alerts.yml")).unwrap(),
    ));
    assert!(
        wanted.len() >= 15,
        "the dashboard queries Herald's metrics: {wanted:?}"
    );
    // Exported on Redis Streams only: checked by the Redis test below.
    for name in REDIS_ONLY {
        assert!(wanted.remove(*name), "{name} is used by the rules");
    }
    let exported = eventually(Duration::from_secs(60), "every metric exported", || {
        let (http, wanted) = (http.clone(), wanted.clone());
        async move {
            let text = http
                .get(format!("http://127.0.0.1:{admin}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let exported: BTreeSet<String> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .flat_map(metric_names)
                .collect();
            wanted.is_subset(&exported).then_some(exported)
        }
    })
    .await;
    let declared: BTreeSet<String> = telemetry::ALL.iter().map(|s| s.to_string()).collect();
    let undeclared: Vec<&String> = exported.difference(&declared).collect();
    assert!(
        undeclared.is_empty(),
        "exported but not in telemetry::names: {undeclared:?}"
    );
}

/// Metrics only a Herald on Redis Streams exports.
const REDIS_ONLY: &[&str] = &[telemetry::names::PENDING_OLDEST_SECONDS];

/// On Redis Streams the lag comes from XINFO GROUPS (entries not yet delivered to the group plus
/// pending ones): each stage's group reports it per stream, and it returns to 0 once a message
/// has gone all the way through.
#[tokio::test(flavor = "multi_thread")]
async fn consumer_lag_is_reported_on_redis_streams() {
    let (api, admin) = (18_720, 19_920);
    let cfg = std::env::temp_dir().join("herald-ops-redis.toml");
    std::fs::copy(config_path(), &cfg).unwrap();
    let mut env = herald_env(api, admin);
    env.push(("HERALD_TRANSPORT", "redis".to_owned()));
    let _herald = Herald::start(&cfg, &env);
    let http = reqwest::Client::new();
    let lag_of = |text: &str, group: &str, topic: &str| -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with("herald_stage_consumer_lag{"))
            .find(|l| {
                l.contains(&format!("group=\"{group}\""))
                    && l.contains(&format!("topic=\"{topic}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    api_up(api).await;
    let now = herald_core::util::now_ms();
    let body = json!({"app_id": "demo", "channel": "EMAIL", "template": "welcome",
        "params": {"product": "Herald"}, "priority": "HIGH", "requested_at": now,
        "recipients": [{"address": format!("{}@example.com", unique("lag")), "params": {"name": "L"}}]});
    let id = send_message(api, &body).await;
    await_status(api, &id, "delivered").await;
    eventually(
        Duration::from_secs(30),
        "accept's and render's lag on their streams, back to 0",
        || {
            let http = http.clone();
            async move {
                let text = http
                    .get(format!("http://127.0.0.1:{admin}/metrics"))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                let accept = lag_of(&text, "herald-accept", herald_schemas::topics::REQUESTS)?;
                let render = lag_of(&text, "herald-render", herald_schemas::topics::ACCEPTED)?;
                // The age of the oldest pending entry, which the rules watch, is exported too.
                let pending = REDIS_ONLY.iter().all(|name| {
                    text.lines().any(|l| {
                        l.starts_with(&format!("{name}{{")) && l.contains("group=\"herald-render\"")
                    })
                });
                (accept == 0.0 && render == 0.0 && pending).then_some(())
            }
        },
    )
    .await;
}
