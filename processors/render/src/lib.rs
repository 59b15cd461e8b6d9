//! Render stage. Consumes `MessageAccepted` from `herald.accepted`; emits `MessageRendered` to
//! `herald.rendered` (recording the template version used), or `MessageFailed` to
//! `herald.status` when a template is unknown or a variable is missing (promise 5: the message
//! fails with the variable's name, the stage moves on). Exactly-once between topics.
//!
//! - Reads: `herald.accepted`.
//! - Writes: `herald.rendered`, `herald.status` (`MessageFailed`), `herald.dead-letters.v1`.
//! - Tables (through `herald_domain::templates`): `templates` (read, seeded). Owns none.
//! - Promise: a hostile template costs one message (memory-limited child, fuel), never the stage.

/// The render child (moved to the domain, where the console's previews use it too).
pub use herald_domain::templates::sandbox;

use futures::future::BoxFuture;
use herald_core::runtime::Deps;
use herald_core::transport::{InRecord, OutRecord};
use herald_core::util::{event_id, now_ms};
use herald_core::worker::{
    BatchHandler, StageError, decode_or_dead_letter, record, run_worker, trace_id,
};
use herald_schemas::{MessageAccepted, MessageFailed, MessageRendered, topics};
use tokio_util::sync::CancellationToken;

use sandbox::Sandbox;

pub const STAGE: &str = "render";

struct Render {
    deps: Deps,
    /// Renders run in a memory-limited child process (see [`sandbox`]).
    sandbox: Sandbox,
    watch: herald_domain::templates::Watch,
}

impl BatchHandler for Render {
    fn codec(&self) -> &herald_core::codec::Codec {
        &self.deps.codec
    }

    fn fails_messages(&self) -> bool {
        true
    }

    fn healthy(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(self.watch.reachable())
    }

    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            // Templates added through the API reach every render worker within a second.
            match self.watch.changed().await {
                Ok(Some(all)) => match self.sandbox.load(all).await {
                    Ok(()) => {}
                    Err(e @ sandbox::SandboxError::Compile(_)) => {
                        tracing::error!(error = %e, "stored templates do not compile; keeping the previous set")
                    }
                    Err(e) => return Err(StageError::Transient(e.to_string())),
                },
                Ok(None) => {}
                Err(e) => {
                    return Err(StageError::Transient(format!("templates: {e}")));
                }
            }
            let codec = &self.deps.codec;
            let mut out = Vec::with_capacity(batch.len());
            let mut decoded = Vec::with_capacity(batch.len());
            for input in batch {
                if let Some(m) =
                    decode_or_dead_letter::<MessageAccepted>(codec, STAGE, input, &mut out).await?
                {
                    decoded.push((trace_id(input), m));
                }
            }
            let messages: Vec<&MessageAccepted> = decoded.iter().map(|(_, m)| m).collect();
            let rendered = self
                .sandbox
                .render(&messages)
                .await
                .map_err(|e| StageError::Transient(e.to_string()))?;
            for ((trace, m), result) in decoded.into_iter().zip(rendered) {
                let now = now_ms();
                let mid = m.header.message_id.clone();
                match result {
                    Ok((version, content)) => {
                        let ev = MessageRendered {
                            header: m.header.follow(STAGE, event_id(&mid, "rendered", 0), now),
                            recipient: m.recipient,
                            priority: m.priority,
                            expires_at: m.expires_at,
                            template: m.template,
                            template_version: version,
                            content,
                            due_at: Some(
                                m.send_at
                                    .map_or(m.requested_at, |at| at.max(m.requested_at)),
                            ),
                        };
                        out.push(
                            record(codec, topics::RENDERED, &ev.recipient.address, &trace, &ev)
                                .await?,
                        );
                    }
                    Err(reason) => {
                        let ev = MessageFailed {
                            header: m.header.follow(STAGE, event_id(&mid, "failed", 0), now),
                            provider: None,
                            reason,
                        };
                        out.push(record(codec, topics::STATUS, &mid, &trace, &ev).await?);
                    }
                }
            }
            Ok(out)
        })
    }
}

/// Runs the render stage until `shutdown`.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let sandbox = Sandbox::start(
        Sandbox::current_exe().map_err(|e| StageError::Fatal(e.to_string()))?,
        sandbox::Limits::default(),
        deps.config.templates.clone(),
    )
    .await
    .map_err(|e| StageError::Fatal(e.to_string()))?;
    let db = herald_domain::templates::seeded(&deps).await?;
    let watch = herald_domain::templates::Watch::new(db);
    let spec = deps.spec(STAGE, vec![topics::ACCEPTED.into()], true);
    let transport = deps.transport.clone();
    run_worker(
        STAGE,
        transport,
        spec,
        Render {
            deps,
            sandbox,
            watch,
        },
        shutdown,
    )
    .await
}
