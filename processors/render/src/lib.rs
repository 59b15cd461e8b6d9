//! Render stage. Consumes `MessageAccepted` from `herald.accepted`; emits `MessageRendered` to
//! `herald.rendered` (recording the template version used), or `MessageFailed` to
//! `herald.status` when a template is unknown or a variable is missing (promise 5: the message
//! fails with the variable's name, the stage moves on). Exactly-once between topics.

pub mod handler;

use futures::future::BoxFuture;
use herald_core::runtime::Deps;
use herald_core::transport::{InRecord, OutRecord};
use herald_core::util::{event_id, now_ms};
use herald_core::worker::{
    BatchHandler, StageError, decode_or_dead_letter, record, run_worker, trace_id,
};
use herald_schemas::{MessageAccepted, MessageFailed, MessageRendered, topics};
use tokio_util::sync::CancellationToken;

use handler::Templates;

pub const STAGE: &str = "render";

struct Render {
    deps: Deps,
    templates: Templates,
    watch: herald_core::templates::Watch,
}

impl BatchHandler for Render {
    fn codec(&self) -> &herald_core::codec::Codec {
        &self.deps.codec
    }

    fn fails_messages(&self) -> bool {
        true
    }

    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            // Templates added through the API reach every render worker within a second.
            match self.watch.changed().await {
                Ok(Some(all)) => match Templates::compile(&all) {
                    Ok(t) => self.templates = t,
                    Err(e) => {
                        tracing::error!(error = %e, "stored templates do not compile; keeping the previous set")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    return Err(StageError::Transient(format!(
                        "templates: {}",
                        herald_core::runtime::pg_error(e)
                    )));
                }
            }
            let codec = &self.deps.codec;
            let mut out = Vec::with_capacity(batch.len());
            for input in batch {
                let Some(m) =
                    decode_or_dead_letter::<MessageAccepted>(codec, STAGE, input, &mut out).await?
                else {
                    continue;
                };
                let trace = trace_id(input);
                let now = now_ms();
                let mid = m.header.message_id.clone();
                match self.templates.render(&m) {
                    Ok((version, content)) => {
                        let ev = MessageRendered {
                            header: m.header.follow(STAGE, event_id(&mid, "rendered", 0), now),
                            recipient: m.recipient,
                            priority: m.priority,
                            expires_at: m.expires_at,
                            template: m.template,
                            template_version: version,
                            content,
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
    let templates = Templates::compile(&deps.config.templates).map_err(StageError::Fatal)?;
    let db = deps
        .postgres_migrated(herald_core::templates::SCHEMA)
        .await?;
    herald_core::templates::seed(&db, &deps.config.templates)
        .await
        .map_err(|e| {
            StageError::Fatal(format!("templates: {}", herald_core::runtime::pg_error(e)))
        })?;
    let watch = herald_core::templates::Watch::new(db);
    let spec = deps.spec(STAGE, vec![topics::ACCEPTED.into()], true);
    let transport = deps.transport.clone();
    run_worker(
        STAGE,
        transport,
        spec,
        Render {
            deps,
            templates,
            watch,
        },
        shutdown,
    )
    .await
}
