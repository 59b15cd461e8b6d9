//! Pure render logic: templates compiled once, strict about missing variables.

use std::collections::{BTreeMap, HashMap};

use herald_core::config::TemplateConfig;
use herald_schemas::{Content, MessageAccepted, Reason, RenderedContent};
use minijinja::{Environment, UndefinedBehavior};

/// Compiled templates: the newest version of each (app, code); app "" is shared.
pub struct Templates {
    env: Environment<'static>,
    /// (app, code) → (version, which parts exist)
    index: HashMap<(String, String), TemplateEntry>,
}

/// Instructions one render may spend (minijinja fuel): a hostile template's loops stop here.
pub const RENDER_FUEL: u64 = 1_000_000;
/// Largest rendered part, bytes.
pub const MAX_RENDERED_BYTES: usize = 256 * 1024;

/// A writer that refuses to grow past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct Capped {
    buf: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + buf.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered output too large"));
        }
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct TemplateEntry {
    version: i32,
    parts: Vec<&'static str>,
    provider_template: Option<String>,
    provider_templates: HashMap<String, String>,
    provider_params: Vec<String>,
}

const PARTS: [&str; 4] = ["subject", "text", "html", "markdown"];

fn name(app: &str, code: &str, version: i32, part: &str) -> String {
    format!("{app}/{code}@{version}/{part}")
}

impl Templates {
    /// Compiles every template; a syntax error is reported with the template's code.
    pub fn compile(configs: &[TemplateConfig]) -> Result<Templates, String> {
        Self::compile_with_fuel(configs, RENDER_FUEL)
    }

    /// [`Templates::compile`] with another fuel budget per render (the fuzzer's is smaller).
    pub fn compile_with_fuel(configs: &[TemplateConfig], fuel: u64) -> Result<Templates, String> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(fuel));
        let mut newest: BTreeMap<(&str, &str), &TemplateConfig> = BTreeMap::new();
        for t in configs {
            let key = (t.app.as_deref().unwrap_or(""), t.code.as_str());
            if newest.get(&key).is_none_or(|n| n.version < t.version) {
                newest.insert(key, t);
            }
        }
        let mut index = HashMap::new();
        for ((app, code), t) in newest {
            let mut parts = Vec::new();
            for (part, src) in PARTS
                .iter()
                .zip([&t.subject, &t.text, &t.html, &t.markdown])
            {
                if let Some(src) = src {
                    // HTML parts auto-escape variables; text parts do not.
                    let file = if *part == "html" {
                        format!("{}.html", name(app, code, t.version, part))
                    } else {
                        name(app, code, t.version, part)
                    };
                    env.add_template_owned(file, src.clone())
                        .map_err(|e| format!("template {code} v{} {part}: {e}", t.version))?;
                    parts.push(*part);
                }
            }
            let mut provider_params = Vec::new();
            for (k, src) in &t.provider_params {
                env.add_template_owned(
                    name(app, code, t.version, &format!("param.{k}")),
                    src.clone(),
                )
                .map_err(|e| format!("template {code} v{} param {k}: {e}", t.version))?;
                provider_params.push(k.clone());
            }
            index.insert(
                (app.to_owned(), code.to_owned()),
                TemplateEntry {
                    version: t.version,
                    parts,
                    provider_template: t.provider_template.clone(),
                    provider_templates: t.provider_templates.clone().into_iter().collect(),
                    provider_params,
                },
            );
        }
        Ok(Templates { env, index })
    }

    fn render_part(&self, file: &str, vars: &HashMap<String, String>) -> Result<String, Reason> {
        let tmpl = self
            .env
            .get_template(file)
            .map_err(|e| Reason::new("template_error", e.to_string()))?;
        let mut missing: Vec<String> = tmpl
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| !vars.contains_key(v) && !self.env.globals().any(|(g, _)| g == v))
            .collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(Reason::new(
                "missing_variable",
                format!("missing variable(s): {}", missing.join(", ")),
            ));
        }
        let mut out = Capped::default();
        let rendered = tmpl.render_captured_to(vars, &mut out);
        if out.overflowed {
            return Err(Reason::new(
                "render_too_large",
                format!("rendered output over {MAX_RENDERED_BYTES} bytes"),
            ));
        }
        rendered.map_err(|e| Reason::new("render_error", e.to_string()))?;
        String::from_utf8(out.buf).map_err(|e| Reason::new("render_error", e.to_string()))
    }

    /// Renders a message: `(template version, content)` or the reason it cannot be rendered.
    /// A message is never half-filled: any failing part fails the whole message.
    pub fn render(&self, m: &MessageAccepted) -> Result<(Option<i32>, RenderedContent), Reason> {
        let Some(code) = &m.template else {
            let c: &Content = m
                .content
                .as_ref()
                .ok_or_else(|| Reason::new("no_content", "no template and no content"))?;
            return Ok((
                None,
                RenderedContent {
                    subject: c.subject.clone(),
                    text: c.text.clone(),
                    html: c.html.clone(),
                    markdown: c.markdown.clone(),
                    ..Default::default()
                },
            ));
        };
        let app = m.header.app_id.as_str();
        let (owner, entry) = [app, ""]
            .into_iter()
            .find_map(|owner| {
                self.index
                    .get(&(owner.to_owned(), code.clone()))
                    .map(|e| (owner, e))
            })
            .ok_or_else(|| {
                Reason::new(
                    "unknown_template",
                    format!("template {code:?} is not defined"),
                )
            })?;
        let mut out = RenderedContent::default();
        for part in &entry.parts {
            let file = if *part == "html" {
                format!("{}.html", name(owner, code, entry.version, part))
            } else {
                name(owner, code, entry.version, part)
            };
            let text = self.render_part(&file, &m.params)?;
            match *part {
                "subject" => out.subject = Some(text),
                "text" => out.text = Some(text),
                "html" => out.html = Some(text),
                _ => out.markdown = Some(text),
            }
        }
        out.provider_template = entry.provider_template.clone();
        out.provider_templates = entry.provider_templates.clone();
        for k in &entry.provider_params {
            let v = self.render_part(
                &name(owner, code, entry.version, &format!("param.{k}")),
                &m.params,
            )?;
            out.provider_params.insert(k.clone(), v);
        }
        Ok((Some(entry.version), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_schemas::{Channel, EventHeader, Priority, Recipient};

    fn tpl(version: i32, text: &str) -> TemplateConfig {
        TemplateConfig {
            app: None,
            code: "welcome".into(),
            channel: Channel::Email,
            version,
            subject: Some("Hi {{ name }}".into()),
            text: Some(text.into()),
            html: Some("<p>{{ name }}</p>".into()),
            markdown: None,
            provider_template: None,
            provider_params: Default::default(),
            provider_templates: Default::default(),
        }
    }

    fn msg(params: &[(&str, &str)]) -> MessageAccepted {
        MessageAccepted {
            header: EventHeader {
                event_id: "e".into(),
                event_time: 0,
                stage: "accept".into(),
                trace_id: "t".into(),
                message_id: "m".into(),
                request_id: "r".into(),
                app_id: "a".into(),
                channel: Channel::Email,
                attempt: 0,
                metadata: Default::default(),
            },
            recipient: Recipient {
                address: "a@x.io".into(),
                params: Default::default(),
                timezone: None,
            },
            recipient_index: 0,
            template: Some("welcome".into()),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            content: None,
            send_at: None,
            priority: Priority::Normal,
            expires_at: None,
            requested_at: 0,
        }
    }

    #[test]
    fn renders_the_newest_version_and_escapes_html_only() {
        let t = Templates::compile(&[tpl(1, "old"), tpl(2, "Hello {{ name }}, code {{ code }}")])
            .unwrap();
        let (v, c) = t
            .render(&msg(&[("name", "<Ada>"), ("code", "42")]))
            .unwrap();
        assert_eq!(v, Some(2));
        assert_eq!(c.subject.as_deref(), Some("Hi <Ada>"));
        assert_eq!(c.text.as_deref(), Some("Hello <Ada>, code 42"));
        assert_eq!(c.html.as_deref(), Some("<p>&lt;Ada&gt;</p>"));
    }

    #[test]
    fn a_missing_variable_names_the_variable_and_renders_nothing() {
        let t = Templates::compile(&[tpl(1, "code {{ code }} for {{ name }}")]).unwrap();
        let err = t.render(&msg(&[("name", "Ada")])).unwrap_err();
        assert_eq!(err.code, "missing_variable");
        assert!(err.message.contains("code"), "{}", err.message);
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        assert!(Templates::compile(&[tpl(1, "{{ broken ")]).is_err());
    }

    #[test]
    fn hostile_templates_stop_at_their_bounds() {
        let mut endless = tpl(
            1,
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        );
        endless.html = None;
        let t = Templates::compile(&[endless]).unwrap();
        let err = t.render(&msg(&[("name", "Ada")])).unwrap_err();
        assert!(
            matches!(err.code.as_str(), "render_error" | "render_too_large"),
            "{err:?}"
        );

        let mut wide = tpl(1, "{% for i in range(1000) %}{{ blob }}{% endfor %}");
        wide.html = None;
        let t = Templates::compile(&[wide]).unwrap();
        let blob = "x".repeat(10_000);
        let err = t
            .render(&msg(&[("name", "Ada"), ("blob", &blob)]))
            .unwrap_err();
        assert_eq!(err.code, "render_too_large");
    }

    #[test]
    fn an_apps_own_template_shadows_the_shared_one_and_no_other_app_sees_it() {
        let shared = tpl(1, "shared {{ name }}");
        let mut own = tpl(2, "own {{ name }}");
        own.app = Some("a".into());
        let mut other = tpl(3, "other {{ name }}");
        other.app = Some("b".into());
        let t = Templates::compile(&[shared, own, other]).unwrap();
        let (v, c) = t.render(&msg(&[("name", "Ada")])).unwrap();
        assert_eq!((v, c.text.as_deref()), (Some(2), Some("own Ada")));
        let mut m = msg(&[("name", "Ada")]);
        m.header.app_id = "c".into();
        let (v, c) = t.render(&m).unwrap();
        assert_eq!((v, c.text.as_deref()), (Some(1), Some("shared Ada")));
    }
}
