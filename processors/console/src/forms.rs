//! The console's forms and what each is checked against before anything is stored, published
//! or rendered: the same checks as the API's routes (a published template is checked as
//! `PUT /v1/templates/{code}` checks one, a test send as the gateway validates a request, an
//! opt-out's address as a recipient's). Pure functions, so `scripts/fuzz` drives them with
//! hostile form bodies exactly as the handlers receive them ([`check`]).

use std::collections::{BTreeMap, HashMap};

use herald_core::config::{TemplateConfig, TemplateStoreConfig};
use herald_schemas::{Channel, EventHeader, MessageAccepted, Priority, Recipient, SendRequested};
use serde::Deserialize;
use serde_json::Value;

/// Sample parameters typed as a JSON object; values that are not strings are used as JSON text.
pub fn sample(params: &str) -> Result<HashMap<String, String>, String> {
    if params.trim().is_empty() {
        return Ok(Default::default());
    }
    let v: BTreeMap<String, Value> =
        serde_json::from_str(params).map_err(|e| format!("sample parameters: {e}"))?;
    Ok(v.into_iter()
        .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
        .collect())
}

/// A channel named in any case.
fn channel(name: &str) -> Option<Channel> {
    Channel::ALL
        .into_iter()
        .find(|c| c.as_str().eq_ignore_ascii_case(name.trim()))
}

/// The template editor (preview and publish).
#[derive(Deserialize)]
pub struct Edit {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub app: String,
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub html: String,
    #[serde(default)]
    pub markdown: String,
    #[serde(default)]
    pub params: String,
}

/// The template an edit describes, checked as every submitted template is
/// ([`herald_domain::templates::checked`]: code, no NUL, content, size, compiles).
pub fn edited(
    code: &str,
    e: &Edit,
    bounds: &TemplateStoreConfig,
) -> Result<TemplateConfig, String> {
    let field = |s: &str| Some(s.replace("\r\n", "\n")).filter(|s| !s.is_empty());
    let channel = channel(&e.channel).ok_or_else(|| format!("unknown channel {:?}", e.channel))?;
    let t = TemplateConfig {
        code: code.to_owned(),
        app: None,
        channel,
        version: 0,
        subject: field(&e.subject),
        text: field(&e.text),
        html: field(&e.html),
        markdown: field(&e.markdown),
        provider_template: None,
        provider_params: Default::default(),
        provider_templates: Default::default(),
    };
    herald_domain::templates::checked(t, bounds).map_err(|r| r.to_string())
}

/// The edited template and the message a preview renders it for.
pub fn preview_input(
    code: &str,
    e: &Edit,
    bounds: &TemplateStoreConfig,
) -> Result<(TemplateConfig, MessageAccepted), String> {
    let t = edited(code, e, bounds)?;
    let params = sample(&e.params)?;
    let m = MessageAccepted {
        header: EventHeader {
            event_id: "preview".into(),
            event_time: 0,
            stage: "console".into(),
            trace_id: String::new(),
            message_id: "preview".into(),
            request_id: "preview".into(),
            app_id: String::new(),
            channel: t.channel,
            attempt: 0,
            metadata: Default::default(),
        },
        recipient: Recipient {
            address: "preview@example.invalid".into(),
            params: Default::default(),
            timezone: None,
        },
        recipient_index: 0,
        template: Some(code.to_owned()),
        params,
        content: None,
        send_at: None,
        priority: Priority::Normal,
        expires_at: None,
        requested_at: 0,
    };
    Ok((t, m))
}

/// A test send of a template.
#[derive(Deserialize)]
pub struct TestSend {
    pub csrf: String,
    pub app: String,
    pub address: String,
    #[serde(default)]
    pub params: String,
}

/// The request a test send of `code` (on `channel`) as `app` by operator `by` publishes,
/// validated as the gateway validates a request.
pub fn test_request(
    f: &TestSend,
    app: &str,
    code: &str,
    channel: Channel,
    by: &str,
    limits: &herald_domain::validate::Limits,
    now: i64,
) -> Result<SendRequested, String> {
    let params = sample(&f.params)?;
    let req = SendRequested {
        request_id: herald_core::util::random_id(),
        app_id: app.to_owned(),
        idempotency_key: None,
        channel,
        template: Some(code.to_owned()),
        params,
        recipients: vec![Recipient {
            address: f.address.trim().to_owned(),
            params: Default::default(),
            timezone: None,
        }],
        content: None,
        send_at: None,
        priority: Priority::High,
        expires_at: None,
        metadata: [("console_test_send".to_owned(), by.to_owned())].into(),
        requested_at: now,
    };
    herald_domain::validate::all(&req, limits, now)
        .map_err(|p| format!("{}: {}", p.code, p.message))?;
    Ok(req)
}

/// An opt-out added or removed.
#[derive(Deserialize)]
pub struct OptOutChange {
    pub csrf: String,
    pub app: String,
    pub channel: String,
    pub address: String,
    /// "add" or "remove".
    pub action: String,
}

/// What an opt-out change is about: (channel, address as opt-outs key it, opted out), checked
/// as the API checks one (a configured app, a channel, an address of that channel, an action).
/// Opting back in clears the address's [`herald_domain::destination::spellings`] too.
pub fn opt_out(
    f: &OptOutChange,
    apps: &[&str],
    region: herald_domain::destination::Region,
) -> Result<(Channel, String, bool), String> {
    if !apps.contains(&f.app.as_str()) {
        return Err("unknown app".into());
    }
    let channel = channel(&f.channel).ok_or("unknown channel")?;
    let out = match f.action.as_str() {
        "add" => true,
        "remove" => false,
        _ => return Err("the action is add or remove".into()),
    };
    let address =
        herald_domain::opt_out::address(channel, &f.address, region).map_err(|p| p.message)?;
    Ok((channel, address, out))
}

/// The forms [`check`] knows.
pub const FORMS: [&str; 4] = ["login", "edit", "test_send", "opt_out"];

/// Parses `body` as the handler of `form` receives it (`application/x-www-form-urlencoded`,
/// as axum's `Form` does) and runs that form's checks; a short description of what was
/// accepted, or why not. For `scripts/fuzz`.
pub fn check(form: &str, code: &str, body: &[u8]) -> Result<String, String> {
    let bounds = TemplateStoreConfig::default();
    let region = herald_domain::destination::Region::parse("CN").ok_or("no region")?;
    let parse_err = |e: serde_urlencoded::de::Error| e.to_string();
    match form {
        "login" => {
            let f: crate::auth::LoginForm =
                serde_urlencoded::from_bytes(body).map_err(parse_err)?;
            Ok(format!("login {}", f.name.len()))
        }
        "edit" => {
            let e: Edit = serde_urlencoded::from_bytes(body).map_err(parse_err)?;
            let (t, m) = preview_input(code, &e, &bounds)?;
            Ok(format!("{} {}", t.code, m.params.len()))
        }
        "test_send" => {
            let f: TestSend = serde_urlencoded::from_bytes(body).map_err(parse_err)?;
            let limits = herald_domain::validate::Limits::from_config(&Default::default());
            let r = test_request(&f, "demo", code, Channel::Email, "fuzz", &limits, 0)?;
            Ok(r.recipients[0].address.clone())
        }
        "opt_out" => {
            let f: OptOutChange = serde_urlencoded::from_bytes(body).map_err(parse_err)?;
            let (c, a, out) = opt_out(&f, &["demo"], region)?;
            Ok(format!("{} {a} {out}", c.as_str()))
        }
        other => Err(format!("no form {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(channel: &str, text: &str, params: &str) -> Edit {
        Edit {
            csrf: String::new(),
            app: String::new(),
            channel: channel.into(),
            subject: "Hi {{ name }}".into(),
            text: text.into(),
            html: String::new(),
            markdown: String::new(),
            params: params.into(),
        }
    }

    #[test]
    fn a_preview_renders_the_edited_template_with_the_sample_parameters() {
        // Rendering itself runs in the render child: tests/tests/hostile_surface.rs previews
        // through a running Herald.
        let b = TemplateStoreConfig::default();
        let e = edit("email", "<p>{{ name }}</p>", r#"{"name": "<b>Ann</b>"}"#);
        let (t, m) = preview_input("t", &e, &b).unwrap();
        assert_eq!(t.code, "t");
        assert_eq!(m.template.as_deref(), Some("t"));
        assert_eq!(m.params["name"], "<b>Ann</b>");
        assert!(preview_input("t", &edit("EMAIL", "x", "not json"), &b).is_err());
    }

    #[test]
    fn an_edit_is_checked_as_the_api_checks_a_template() {
        let b = TemplateStoreConfig {
            max_bytes: 100,
            ..Default::default()
        };
        assert!(edited("ok", &edit("EMAIL", "x", ""), &b).is_ok());
        for (code, e, why) in [
            ("bad code!", edit("EMAIL", "x", ""), "template codes"),
            ("t", edit("EMAIL", "a\0b", ""), "NUL"),
            (
                "t",
                edit("EMAIL", &"x".repeat(200), ""),
                "over the store's limit",
            ),
            ("t", edit("EMAIL", "{% if %}", ""), ""),
            ("t", edit("PIGEON", "x", ""), "unknown channel"),
        ] {
            let err = edited(code, &e, &b).unwrap_err();
            assert!(err.contains(why), "{code}: {err}");
        }
    }

    #[test]
    fn forms_refuse_what_the_api_refuses() {
        let ok = |form, body: &str| check(form, "welcome", body.as_bytes());
        assert!(ok("edit", "channel=EMAIL&text=hi").is_ok());
        assert!(ok("edit", "channel=EMAIL&text=%00").is_err());
        assert!(ok("test_send", "csrf=x&app=demo&address=a%40example.com").is_ok());
        assert!(ok("test_send", "csrf=x&app=demo&address=not-an-address").is_err());
        assert_eq!(
            ok(
                "opt_out",
                "csrf=x&app=demo&channel=sms&address=13800138000&action=add"
            ),
            Ok("sms +8613800138000 true".to_owned())
        );
        assert!(
            ok(
                "opt_out",
                "csrf=x&app=demo&channel=sms&address=1&action=add"
            )
            .is_err()
        );
        assert!(
            ok(
                "opt_out",
                "csrf=x&app=other&channel=sms&address=13800138000&action=add"
            )
            .is_err()
        );
        assert!(
            ok(
                "opt_out",
                "csrf=x&app=demo&channel=sms&address=13800138000&action=drop"
            )
            .is_err()
        );
        assert!(ok("login", "name=a").is_err());
        assert!(ok("login", "name=a&password=b").is_ok());
    }
}
