//! Provider calls ignore proxies from the environment (issue 23, finding 18): with
//! `HTTP_PROXY`, `HTTPS_PROXY` and `ALL_PROXY` naming a loopback listener that counts its
//! connections, a 掌榕网 send and a guarded webhook send reach their loopback target and the
//! "proxy" sees nothing, while a client built without the providers' settings does go to it (so
//! the variables are in effect).
//!
//! Its own test binary with one test: the environment is process-wide, and it is set before any
//! other thread exists.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use herald_core::config::ProviderConfig;
use herald_core::netguard::Guard;
use herald_providers::{Context, REGISTRY};
use herald_schemas::{
    Channel, DeliveryOutcome, EventHeader, MessageRouted, Priority, Recipient, RenderedContent,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// A loopback server answering every request with 掌榕网's success answer, counting requests.
async fn target() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                // Read the head and the body its content-length announces.
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let body = r#"{"code":"0","msg":"SUCCESS","smUuid":"u-1"}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

fn provider_config(v: serde_json::Value) -> ProviderConfig {
    let mut p: ProviderConfig = serde_json::from_value(v).unwrap();
    p.credentials = [("access_key", "k"), ("secret", "s")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    p
}

fn message(channel: Channel, address: &str, content: RenderedContent) -> MessageRouted {
    MessageRouted {
        header: EventHeader {
            event_id: "e".into(),
            event_time: 0,
            stage: "route".into(),
            trace_id: "t".into(),
            message_id: "m-1".into(),
            request_id: "r".into(),
            app_id: "demo".into(),
            channel,
            attempt: 1,
            metadata: Default::default(),
        },
        recipient: Recipient {
            address: address.into(),
            params: Default::default(),
            timezone: None,
        },
        priority: Priority::High,
        expires_at: None,
        template: None,
        template_version: None,
        content,
        provider: "p".into(),
        provider_kind: "k".into(),
        tried_providers: vec![],
        due_at: None,
    }
}

#[test]
fn provider_calls_ignore_proxies_from_the_environment() {
    // Bound before the runtime so the variables are set while this is the only thread.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    // SAFETY: no other thread exists yet (the one test of this binary, runtime not started).
    unsafe {
        for var in PROXY_VARS {
            std::env::set_var(var, &proxy_url);
        }
        // Nothing may exempt loopback from the proxy, nor turn the variables off.
        for var in ["NO_PROXY", "no_proxy", "REQUEST_METHOD"] {
            std::env::remove_var(var);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        proxy.set_nonblocking(true).unwrap();
        let proxy = TcpListener::from_std(proxy).unwrap();
        let proxied = Arc::new(AtomicUsize::new(0));
        let counter = proxied.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = proxy.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        let (addr, reached) = target().await;
        let guard = Guard::new(std::slice::from_ref(&addr));
        let cx = Context {
            postgres_url: "",
            guard: &guard,
        };

        // 掌榕网: the shared client (every HTTP provider's).
        let zrwinfo = REGISTRY
            .build(
                &provider_config(json!({
                    "code": "zrwinfo",
                    "kind": "zrwinfo_sms",
                    "endpoint": format!("http://{addr}"),
                    "timeout_ms": 2000,
                    "settings": {"sign": "【Herald】"},
                })),
                &cx,
            )
            .unwrap();
        let sms = RenderedContent {
            provider_template: Some("100001".into()),
            provider_params: [("1".to_owned(), "369751".to_owned())].into(),
            ..Default::default()
        };
        let r = zrwinfo
            .send(&message(Channel::Sms, "13800000001", sms), 1)
            .await;
        assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{r:?}");
        assert_eq!(reached.load(Ordering::SeqCst), 1);

        // A webhook to a caller-chosen URL: the guarded client.
        let webhook = REGISTRY
            .build(
                &provider_config(json!({
                    "code": "hook",
                    "kind": "webhook",
                    "timeout_ms": 2000,
                })),
                &cx,
            )
            .unwrap();
        let r = webhook
            .send(
                &message(
                    Channel::Webhook,
                    &format!("http://{addr}/hook"),
                    RenderedContent {
                        text: Some("hi".into()),
                        ..Default::default()
                    },
                ),
                1,
            )
            .await;
        assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{r:?}");
        assert_eq!(reached.load(Ordering::SeqCst), 2);
        assert_eq!(
            proxied.load(Ordering::SeqCst),
            0,
            "no call went to the proxy"
        );

        // The variables are in effect: a client with reqwest's defaults goes to the proxy.
        let _ = reqwest::Client::new()
            .get(format!("http://{addr}/"))
            .send()
            .await;
        assert_eq!(
            proxied.load(Ordering::SeqCst),
            1,
            "the control call was proxied"
        );
        assert_eq!(reached.load(Ordering::SeqCst), 2);
    });
}
