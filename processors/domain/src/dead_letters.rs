//! Dead letters for operators: projected from `herald.dead-letters.v1` into `dead_letters` (by
//! the projector), listed, shown decoded, redriven (the original bytes published again to the
//! topic they came from) and resolved — by the console and by `herald dlq`, through the same
//! functions. Every redrive and resolve is written to the audit log ([`audit`]).

use herald_core::transport::{OutRecord, Publisher};
use herald_schemas::{DeadLettered, headers};
use tokio_postgres::GenericClient;

/// One dead letter as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub event_id: String,
    pub at_ms: i64,
    pub stage: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    #[serde(skip)]
    pub key: Option<Vec<u8>>,
    #[serde(skip)]
    pub payload: Option<Vec<u8>>,
    pub size: usize,
    pub reason_code: String,
    pub reason_message: String,
    pub message_id: Option<String>,
    pub request_id: Option<String>,
    pub redriven_at_ms: Option<i64>,
    pub redriven_by: Option<String>,
    pub redrives: i32,
    pub resolved_at_ms: Option<i64>,
    pub resolved_by: Option<String>,
}

const COLUMNS: &str = "event_id, (extract(epoch FROM at) * 1000)::bigint, stage, source_topic, \
    source_partition, source_offset, record_key, payload, reason_code, reason_message, \
    message_id, request_id, (extract(epoch FROM redriven_at) * 1000)::bigint, redriven_by, \
    redrives, (extract(epoch FROM resolved_at) * 1000)::bigint, resolved_by";

fn row(r: &tokio_postgres::Row) -> Row {
    let payload: Option<Vec<u8>> = r.get(7);
    Row {
        event_id: r.get(0),
        at_ms: r.get(1),
        stage: r.get(2),
        source_topic: r.get(3),
        source_partition: r.get(4),
        source_offset: r.get(5),
        key: r.get(6),
        size: payload.as_ref().map_or(0, Vec::len),
        payload,
        reason_code: r.get(8),
        reason_message: r.get(9),
        message_id: r.get(10),
        request_id: r.get(11),
        redriven_at_ms: r.get(12),
        redriven_by: r.get(13),
        redrives: r.get(14),
        resolved_at_ms: r.get(15),
        resolved_by: r.get(16),
    }
}

/// Stores dead letters (a dead letter delivered twice is stored once).
pub async fn record_many(
    db: &impl GenericClient,
    letters: &[DeadLettered],
) -> Result<(), tokio_postgres::Error> {
    let stmt = db
        .prepare(
            "INSERT INTO dead_letters (event_id, at, stage, source_topic, source_partition, \
             source_offset, record_key, payload, reason_code, reason_message, message_id, \
             request_id) VALUES ($1, to_timestamp($2::bigint / 1000.0), $3, $4, $5, $6, $7, $8, \
             $9, $10, $11, $12) ON CONFLICT (event_id) DO NOTHING",
        )
        .await?;
    for d in letters {
        db.execute(
            &stmt,
            &[
                &d.event_id,
                &d.event_time,
                &d.stage,
                &d.source_topic,
                &d.source_partition,
                &d.source_offset,
                &d.key,
                &d.payload,
                &d.reason.code,
                &d.reason.message,
                &d.message_id,
                &d.request_id,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Which dead letters to list.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Filter {
    pub stage: Option<String>,
    pub reason: Option<String>,
    /// Include resolved ones.
    #[serde(default)]
    pub all: bool,
}

/// The newest dead letters matching `f`, at most `limit`.
pub async fn list(
    db: &impl GenericClient,
    f: &Filter,
    limit: i64,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let stage = f.stage.as_deref().filter(|s| !s.is_empty());
    let reason = f.reason.as_deref().filter(|s| !s.is_empty());
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM dead_letters WHERE ($1::text IS NULL OR stage = $1) \
                 AND ($2::text IS NULL OR reason_code = $2) AND ($3 OR resolved_at IS NULL) \
                 ORDER BY at DESC, event_id LIMIT $4"
            ),
            &[&stage, &reason, &f.all, &limit],
        )
        .await?;
    Ok(rows.iter().map(row).collect())
}

pub async fn get(db: &impl GenericClient, id: &str) -> Result<Option<Row>, tokio_postgres::Error> {
    let r = db
        .query_opt(
            &format!("SELECT {COLUMNS} FROM dead_letters WHERE event_id = $1"),
            &[&id],
        )
        .await?;
    Ok(r.as_ref().map(row))
}

/// Why a redrive or resolve did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("no dead letter {0}")]
    NotFound(String),
    #[error("dead letter {0} has no payload to redrive")]
    Empty(String),
    #[error("dead letter {0} came from {1}, not one of Herald's topics")]
    Foreign(String, String),
    #[error("dead letter {0} names {1}, which its stage {2} does not read")]
    NotTheStagesTopic(String, String, String),
    #[error("dead letter {0} carries no message Herald accepted for its app ({1})")]
    NotOwned(String, String),
    #[error("publishing: {0}")]
    Transport(String),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Whether `stage` consumes `topic`: a dead letter goes back only to a topic its stage reads
/// (the projector's, notify's and the callback's are not redriven: they read facts).
pub fn stage_reads(stage: &str, topic: &str) -> bool {
    use herald_schemas::topics;
    match stage {
        "accept" => topic == topics::REQUESTS,
        "render" => topic == topics::ACCEPTED,
        "route" => topic == topics::RENDERED,
        "send" => topic.starts_with(topics::DISPATCH_PREFIX),
        "delay" => topic.starts_with(topics::DELAY_PREFIX),
        _ => false,
    }
}

/// Publishes a dead letter's original key and bytes to the topic they came from (again through
/// every check: a request accept refused is refused again, and a replayed request id is
/// deduplicated there), then records who redrove it. Returns the row as updated.
///
/// The dead-letter topic is public, so a row's `source_topic` and payload are not trusted: the
/// topic must be one the row's stage reads, and a record for a topic past the gateway
/// (everything but the requests topic, which any producer may write) must carry a message
/// Herald accepted, for the app that owns it — else a forged dead letter would put a message
/// past accept's checks, quota and idempotency.
pub async fn redrive(
    db: &impl GenericClient,
    publisher: &dyn Publisher,
    codec: &herald_core::codec::Codec,
    id: &str,
    operator: &str,
) -> Result<Row, Refused> {
    let d = get(db, id)
        .await?
        .ok_or_else(|| Refused::NotFound(id.to_owned()))?;
    let Some(payload) = d.payload.clone() else {
        return Err(Refused::Empty(id.to_owned()));
    };
    if !d.source_topic.starts_with("herald.") {
        return Err(Refused::Foreign(id.to_owned(), d.source_topic));
    }
    if !stage_reads(&d.stage, &d.source_topic) {
        return Err(Refused::NotTheStagesTopic(
            id.to_owned(),
            d.source_topic,
            d.stage,
        ));
    }
    if d.source_topic != herald_schemas::topics::REQUESTS {
        let header = codec
            .header(&payload)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| Refused::NotOwned(id.to_owned(), "undecodable".into()))?;
        let owner: Option<String> = db
            .query_opt(
                "SELECT app_id FROM messages WHERE message_id = $1",
                &[&header.message_id],
            )
            .await?
            .map(|r| r.get(0));
        if owner.as_deref() != Some(header.app_id.as_str()) {
            return Err(Refused::NotOwned(id.to_owned(), header.app_id));
        }
    }
    publisher
        .publish(vec![OutRecord {
            topic: d.source_topic.clone(),
            key: d.key.clone(),
            payload,
            headers: vec![
                (
                    headers::TRACEPARENT.into(),
                    herald_core::trace::new_root().into_bytes(),
                ),
                ("herald-redriven-from".into(), id.as_bytes().to_vec()),
            ],
        }])
        .await
        .map_err(|e| Refused::Transport(e.to_string()))?;
    db.execute(
        "UPDATE dead_letters SET redriven_at = now(), redriven_by = $2, redrives = redrives + 1 \
         WHERE event_id = $1",
        &[&id, &operator],
    )
    .await?;
    audit(
        db,
        operator,
        "dead_letter.redrive",
        id,
        &serde_json::json!({"topic": d.source_topic, "stage": d.stage, "reason": d.reason_code}),
    )
    .await?;
    Ok(get(db, id).await?.unwrap_or(d))
}

/// Marks a dead letter handled (it leaves the default list).
pub async fn resolve(db: &impl GenericClient, id: &str, operator: &str) -> Result<(), Refused> {
    let n = db
        .execute(
            "UPDATE dead_letters SET resolved_at = now(), resolved_by = $2 \
             WHERE event_id = $1 AND resolved_at IS NULL",
            &[&id, &operator],
        )
        .await?;
    if n == 0 && get(db, id).await?.is_none() {
        return Err(Refused::NotFound(id.to_owned()));
    }
    audit(
        db,
        operator,
        "dead_letter.resolve",
        id,
        &serde_json::json!({}),
    )
    .await?;
    Ok(())
}

/// Appends to the operators' audit log.
pub async fn audit(
    db: &impl GenericClient,
    operator: &str,
    action: &str,
    target: &str,
    detail: &serde_json::Value,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "INSERT INTO console_audit (operator, action, target, detail) VALUES ($1, $2, $3, $4)",
        &[
            &operator,
            &action,
            &target,
            &tokio_postgres::types::Json(detail),
        ],
    )
    .await
    .map(drop)
}
