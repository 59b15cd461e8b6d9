//! The render sandbox against the real `herald-render` executable: a template that builds huge
//! intermediate strings kills only a child, fails only its own message, and the stage renders on.

use std::collections::HashMap;

use herald_core::config::TemplateConfig;
use herald_render::sandbox::{Limits, Sandbox, SandboxError};
use herald_schemas::{Channel, EventHeader, MessageAccepted, Priority, Recipient};

fn template(code: &str, text: &str) -> TemplateConfig {
    TemplateConfig {
        app: None,
        code: code.into(),
        channel: Channel::Email,
        version: 1,
        subject: None,
        text: Some(text.into()),
        html: None,
        markdown: None,
        provider_template: None,
        provider_params: Default::default(),
        provider_templates: Default::default(),
    }
}

fn message(id: &str, code: &str) -> MessageAccepted {
    MessageAccepted {
        header: EventHeader {
            event_id: format!("{id}-e"),
            event_time: 0,
            stage: "accept".into(),
            trace_id: "t".into(),
            message_id: id.into(),
            request_id: "r".into(),
            app_id: "a".into(),
            channel: Channel::Email,
            attempt: 0,
            metadata: HashMap::new(),
        },
        recipient: Recipient {
            address: "a@x.io".into(),
            params: HashMap::new(),
            timezone: None,
        },
        recipient_index: 0,
        template: Some(code.into()),
        params: HashMap::from([
            ("name".into(), "Ada".into()),
            ("blob".into(), "x".repeat(1024)),
        ]),
        content: None,
        send_at: None,
        priority: Priority::Normal,
        expires_at: None,
        requested_at: 0,
    }
}

/// Forty assignments, each doubling the last: 2^40 KiB if nothing stops it.
fn doubling() -> String {
    let mut src = "{% set v0 = blob %}".to_owned();
    for i in 1..=40 {
        src.push_str(&format!("{{% set v{i} = v{} ~ v{} %}}", i - 1, i - 1));
    }
    src.push_str("{{ v40 | length }}");
    src
}

fn limits() -> Limits {
    Limits {
        memory_bytes: 512 << 20,
        ..Limits::default()
    }
}

#[tokio::test]
async fn a_template_that_exhausts_memory_fails_alone_and_the_rest_render() {
    let program = env!("CARGO_BIN_EXE_herald-render").into();
    let templates = vec![
        template("hello", "Hello {{ name }}"),
        template("bomb", &doubling()),
    ];
    let mut sandbox = Sandbox::start(program, limits(), templates).await.unwrap();

    let batch: Vec<_> = (0..9)
        .map(|i| message(&format!("m{i}"), if i == 4 { "bomb" } else { "hello" }))
        .collect();
    let refs: Vec<&MessageAccepted> = batch.iter().collect();
    let results = sandbox.render(&refs).await.unwrap();
    assert_eq!(results.len(), 9);
    for (i, r) in results.iter().enumerate() {
        if i == 4 {
            let reason = r.as_ref().unwrap_err();
            assert_eq!(reason.code, "render_resource_limit", "{reason:?}");
        } else {
            let (_, content) = r.as_ref().unwrap();
            assert_eq!(content.text.as_deref(), Some("Hello Ada"));
        }
    }

    // The child that replaced the dead ones still holds the templates.
    let again = sandbox.render(&[&message("m9", "hello")]).await.unwrap();
    assert_eq!(
        again[0].as_ref().unwrap().1.text.as_deref(),
        Some("Hello Ada")
    );
}

#[tokio::test]
async fn templates_that_do_not_compile_leave_the_previous_set() {
    let program = env!("CARGO_BIN_EXE_herald-render").into();
    let mut sandbox = Sandbox::start(program, limits(), vec![template("hello", "Hi {{ name }}")])
        .await
        .unwrap();
    let err = sandbox
        .load(vec![template("hello", "{{ broken ")])
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::Compile(_)), "{err}");
    let r = sandbox.render(&[&message("m", "hello")]).await.unwrap();
    assert_eq!(r[0].as_ref().unwrap().1.text.as_deref(), Some("Hi Ada"));
}

#[tokio::test]
async fn a_missing_executable_is_an_error_not_a_failed_message() {
    let missing = std::path::PathBuf::from("/nonexistent/herald-render");
    let err = Sandbox::start(missing, limits(), Vec::new())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, SandboxError::Spawn { .. }), "{err}");
}

/// The child renders what apps wrote: none of the parent's environment (the server secret,
/// provider credentials, database URLs) reaches it.
#[tokio::test]
async fn the_child_starts_with_a_clean_environment() {
    let program = env!("CARGO_BIN_EXE_herald-render").into();
    // The test process's own environment stands for the parent's: PATH and HOME at least.
    assert!(std::env::var_os("PATH").is_some());
    let sandbox = Sandbox::start(program, limits(), vec![template("hello", "Hi")])
        .await
        .unwrap();
    let pid = sandbox.child_id().expect("a running child");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let names: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v.split(|b| *b == b'=').next().unwrap_or(v)).into_owned())
        .collect();
    assert_eq!(names, ["RUST_BACKTRACE"], "the child's environment");
}
