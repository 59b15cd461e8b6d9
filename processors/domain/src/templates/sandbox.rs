//! Rendering in a child process whose memory is limited.
//!
//! minijinja's fuel bounds the instructions a render runs and [`MAX_RENDERED_BYTES`] its output,
//! but neither bounds the strings a template builds on the way: thirty lines of
//! `{% set b = a ~ a %}` double a value thirty times. No check inside the process sees that
//! coming (and an allocation that fails aborts the process), so templates are rendered in a child
//! — this same executable started with [`CHILD_ARG`] — whose address space is limited. A render
//! that exhausts it kills only the child: the parent starts a new one, splits the batch until the
//! message that kills a child on its own is found (twice, so an unrelated death fails nobody),
//! fails that message with `render_resource_limit`, and renders the rest. Answers are framed JSON
//! on the child's stdin/stdout; the child holds the compiled templates.
//!
//! [`MAX_RENDERED_BYTES`]: super::compile::MAX_RENDERED_BYTES

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use herald_core::config::TemplateConfig;
use herald_schemas::{MessageAccepted, Reason, RenderedContent};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::compile::{RENDER_FUEL, Templates};

/// The argument that makes a Herald executable serve renders on stdin/stdout.
pub const CHILD_ARG: &str = "__render-sandbox";
/// Address space a render child may use. A release `herald` maps ~100 MiB before rendering.
pub const MEMORY_LIMIT_BYTES: u64 = 768 << 20;
/// Longest one exchange may take before the child is killed (fuel bounds a render to well
/// under a second; this catches what fuel does not count, such as one huge filter call).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest frame either side accepts.
const MAX_FRAME_BYTES: usize = 1 << 30;

/// What one message renders to.
pub type Rendered = Result<(Option<i32>, RenderedContent), Reason>;

/// A request, as the parent writes it (borrowed) …
#[derive(Serialize)]
enum Request<'a> {
    Load(&'a [TemplateConfig]),
    Render(&'a [&'a MessageAccepted]),
}

/// … and as the child reads it.
#[derive(Deserialize)]
enum OwnedRequest {
    Load(Vec<TemplateConfig>),
    Render(Vec<MessageAccepted>),
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Loaded(Result<(), String>),
    Rendered(Vec<Rendered>),
}

/// Limits of a render child.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_bytes: u64,
    pub fuel: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: MEMORY_LIMIT_BYTES,
            fuel: RENDER_FUEL,
        }
    }
}

/// Errors of the sandbox itself (not of a template).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start the render child {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("templates do not compile: {0}")]
    Compile(String),
    #[error("the render child died while loading templates")]
    Died,
}

// --- the child -------------------------------------------------------------------------------

/// When this process was started as a render child, serves renders and exits; otherwise
/// returns at once. Call first thing in `main` of every executable that runs the render stage.
pub fn serve_if_child() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(CHILD_ARG)) {
        return;
    }
    let mut number = || {
        args.next()
            .and_then(|a| a.to_str().and_then(|s| s.parse::<u64>().ok()))
    };
    let limits = Limits {
        memory_bytes: number().unwrap_or(MEMORY_LIMIT_BYTES),
        fuel: number().unwrap_or(RENDER_FUEL),
    };
    let code = match serve(limits) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("herald render child: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn serve(limits: Limits) -> std::io::Result<()> {
    limit_address_space(limits.memory_bytes)?;
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let mut templates =
        Templates::compile_with_fuel(&[], limits.fuel).map_err(std::io::Error::other)?;
    while let Some(frame) = read_frame(&mut input)? {
        let request: OwnedRequest = serde_json::from_slice(&frame)?;
        let reply = match request {
            OwnedRequest::Load(configs) => Reply::Loaded(
                Templates::compile_with_fuel(&configs, limits.fuel).map(|t| {
                    templates = t;
                }),
            ),
            OwnedRequest::Render(messages) => {
                Reply::Rendered(messages.iter().map(|m| templates.render(m)).collect())
            }
        };
        let body = serde_json::to_vec(&reply)?;
        let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
        output.write_all(&len.to_be_bytes())?;
        output.write_all(&body)?;
        output.flush()?;
    }
    Ok(())
}

fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        // SAFETY: setrlimit reads the struct we pass and changes only this process's limits.
        if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
    Ok(())
}

fn read_frame(input: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(std::io::Error::other("frame too large"));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    Ok(Some(body))
}

// --- the parent ------------------------------------------------------------------------------

struct Running {
    process: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// The parent's handle: starts the child on first use and again after it dies.
pub struct Sandbox {
    program: PathBuf,
    limits: Limits,
    /// The last set the child compiled; loaded into every new child.
    templates: Vec<TemplateConfig>,
    child: Option<Running>,
}

impl Sandbox {
    /// A sandbox running `program` (an executable that calls [`serve_if_child`]) with
    /// `templates`, which must compile.
    pub async fn start(
        program: PathBuf,
        limits: Limits,
        templates: Vec<TemplateConfig>,
    ) -> Result<Sandbox, SandboxError> {
        let mut sandbox = Sandbox {
            program,
            limits,
            templates: Vec::new(),
            child: None,
        };
        sandbox.load(templates).await?;
        Ok(sandbox)
    }

    /// The running child's process id (none before the first use or after a death).
    pub fn child_id(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.process.id())
    }

    /// This executable as the child.
    pub fn current_exe() -> Result<PathBuf, SandboxError> {
        std::env::current_exe().map_err(|source| SandboxError::Spawn {
            program: "the current executable".into(),
            source,
        })
    }

    /// Replaces the templates; on a compile error the previous set stays.
    pub async fn load(&mut self, templates: Vec<TemplateConfig>) -> Result<(), SandboxError> {
        self.ensure().await?;
        match self.exchange(&Request::Load(&templates)).await {
            Ok(Reply::Loaded(Ok(()))) => {
                self.templates = templates;
                Ok(())
            }
            Ok(Reply::Loaded(Err(e))) => Err(SandboxError::Compile(e)),
            Ok(Reply::Rendered(_)) | Err(_) => {
                self.kill().await;
                Err(SandboxError::Died)
            }
        }
    }

    /// Renders each message, in order. Fails only when no child can be started.
    pub async fn render(
        &mut self,
        messages: &[&MessageAccepted],
    ) -> Result<Vec<Rendered>, SandboxError> {
        let mut out = Vec::with_capacity(messages.len());
        // Ranges still to render, front first; a range whose render kills the child is split.
        let mut pending: VecDeque<(Range<usize>, bool)> = VecDeque::new();
        if !messages.is_empty() {
            pending.push_back((0..messages.len(), false));
        }
        while let Some((range, retried)) = pending.pop_front() {
            self.ensure().await?;
            match self
                .exchange(&Request::Render(&messages[range.clone()]))
                .await
            {
                Ok(Reply::Rendered(results)) if results.len() == range.len() => out.extend(results),
                _ => {
                    self.kill().await;
                    metrics::counter!(herald_core::telemetry::names::RENDER_SANDBOX_DEATHS)
                        .increment(1);
                    if range.len() > 1 {
                        let mid = range.start + range.len() / 2;
                        pending.push_front((mid..range.end, false));
                        pending.push_front((range.start..mid, false));
                    } else if !retried {
                        pending.push_front((range, true));
                    } else {
                        let id = &messages[range.start].header.message_id;
                        tracing::warn!(message_id = %id, "a render exhausted the sandbox twice; failing the message");
                        out.push(Err(Reason::new(
                            "render_resource_limit",
                            format!(
                                "rendering needs more than {} MiB or {} s",
                                self.limits.memory_bytes >> 20,
                                EXCHANGE_TIMEOUT.as_secs()
                            ),
                        )));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn ensure(&mut self) -> Result<(), SandboxError> {
        if self.child.is_some() {
            return Ok(());
        }
        let spawn_error = |source| SandboxError::Spawn {
            program: self.program.display().to_string(),
            source,
        };
        let mut process = Command::new(&self.program)
            .arg(CHILD_ARG)
            .arg(self.limits.memory_bytes.to_string())
            .arg(self.limits.fuel.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // The child renders what apps wrote: it gets none of the parent's environment (the
            // server secret, provider credentials, database URLs), only what it needs. A child
            // killed by its limit says so in one line, without a backtrace.
            .env_clear()
            .env("RUST_BACKTRACE", "0")
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let (Some(stdin), Some(stdout)) = (process.stdin.take(), process.stdout.take()) else {
            return Err(spawn_error(std::io::Error::other("no pipes")));
        };
        self.child = Some(Running {
            process,
            stdin,
            stdout: BufReader::new(stdout),
        });
        if !self.templates.is_empty() {
            let templates = std::mem::take(&mut self.templates);
            let loaded = self.exchange(&Request::Load(&templates)).await;
            self.templates = templates;
            if !matches!(loaded, Ok(Reply::Loaded(Ok(())))) {
                self.kill().await;
                return Err(SandboxError::Died);
            }
        }
        Ok(())
    }

    async fn exchange(&mut self, request: &Request<'_>) -> std::io::Result<Reply> {
        let Some(child) = self.child.as_mut() else {
            return Err(std::io::Error::other("no render child"));
        };
        let body = serde_json::to_vec(request)?;
        let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
        let talk = async {
            child.stdin.write_all(&len.to_be_bytes()).await?;
            child.stdin.write_all(&body).await?;
            child.stdin.flush().await?;
            let len = child.stdout.read_u32().await? as usize;
            if len > MAX_FRAME_BYTES {
                return Err(std::io::Error::other("frame too large"));
            }
            let mut reply = vec![0u8; len];
            child.stdout.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(serde_json::from_slice(&reply)?)
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, talk)
            .await
            .map_err(|_| std::io::Error::other("render child timed out"))?
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.process.kill().await;
        }
    }
}
