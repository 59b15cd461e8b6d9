//! Avro in the Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro datum),
//! behind a [`SchemaResolver`] so the stages never talk to the registry themselves.
//!
//! Performance: schema ids are registered once per (subject, schema) and cached; writer schemas
//! fetched by id are parsed once and cached; encoding serializes straight from the Rust type
//! against the schema (no intermediate `Value`), and so does decoding when the writer's schema is
//! the one this build knows (the common case). Only an evolved writer schema takes the slower
//! resolve-through-`Value` path.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Schema, from_value};
use futures::future::BoxFuture;
use herald_schemas::{Event, EventHeader, topics};
use schema_registry_converter::async_impl::schema_registry::{
    SrSettings, get_schema_by_id, post_schema,
};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Not Confluent-framed Avro (empty, too short, wrong magic byte). Permanent.
    #[error("not Confluent wire format: {0}")]
    NotFramed(String),
    /// The bytes do not decode with the writer schema. Permanent.
    #[error("undecodable with schema {id}: {detail}")]
    Undecodable { id: u32, detail: String },
    /// A valid record of another type than the stage expects. Permanent.
    #[error("expected {expected}, got {got}")]
    WrongType { expected: &'static str, got: String },
    /// The registry, answering normally, said it does not know the id. Permanent.
    #[error("schema id {0} unknown to the registry")]
    UnknownSchema(u32),
    /// The registry could not be reached or answered badly. Transient: retry the batch.
    #[error("schema registry: {0}")]
    Registry(String),
    /// Our own value did not fit our own schema: a bug, never input-derived.
    #[error("encode {0}: {1}")]
    Encode(&'static str, String),
}

impl CodecError {
    /// A transient error must not dead-letter the input: the batch is retried.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::Registry(_))
    }

    /// Machine-readable code for failure events.
    pub fn code(&self) -> &'static str {
        match self {
            CodecError::NotFramed(_) => "not_avro",
            CodecError::Undecodable { .. } => "undecodable",
            CodecError::WrongType { .. } => "unexpected_event_type",
            CodecError::UnknownSchema(_) => "unknown_schema",
            CodecError::Registry(_) => "registry_unavailable",
            CodecError::Encode(..) => "encode_failed",
        }
    }
}

/// Registers schemas and looks them up by id.
pub trait SchemaResolver: Send + Sync {
    /// The id of `schema` under `subject`, registering it if missing.
    fn register<'a>(
        &'a self,
        subject: &'a str,
        full_name: &'a str,
        schema: &'a str,
    ) -> BoxFuture<'a, Result<u32, CodecError>>;
    /// The schema text registered under `id`.
    fn fetch(&self, id: u32) -> BoxFuture<'_, Result<String, CodecError>>;
    /// Whether the registry answers now.
    fn reachable(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

/// A Confluent-compatible registry (Confluent, Apicurio's `/apis/ccompat/v7`, Karapace …).
pub struct RegistryResolver {
    settings: SrSettings,
    url: String,
    http: reqwest::Client,
}

impl RegistryResolver {
    pub fn new(url: &str) -> Result<Self, CodecError> {
        let settings = SrSettings::new_builder(url.to_owned())
            .set_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| CodecError::Registry(e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(3))
            .build()
            .map_err(|e| CodecError::Registry(e.without_url().to_string()))?;
        Ok(RegistryResolver {
            settings,
            url: url.trim_end_matches('/').to_owned(),
            http,
        })
    }
}

impl SchemaResolver for RegistryResolver {
    fn register<'a>(
        &'a self,
        subject: &'a str,
        full_name: &'a str,
        schema: &'a str,
    ) -> BoxFuture<'a, Result<u32, CodecError>> {
        Box::pin(async move {
            let supplied = SuppliedSchema::new(
                Some(full_name.to_owned()),
                SchemaType::Avro,
                schema.to_owned(),
            );
            post_schema(&self.settings, subject.to_owned(), supplied)
                .await
                .map(|r| r.id)
                .map_err(|e| CodecError::Registry(format!("register {subject}: {e}")))
        })
    }

    fn fetch(&self, id: u32) -> BoxFuture<'_, Result<String, CodecError>> {
        Box::pin(async move {
            match get_schema_by_id(id, &self.settings).await {
                Ok(r) => Ok(r.schema),
                // A 404 is believed only from a registry that also answers `GET /subjects`
                // (which reads its store): one whose store is unreachable answers 500 there.
                Err(e) if said_not_found(&e) && self.reachable().await => {
                    Err(CodecError::UnknownSchema(id))
                }
                Err(e) => Err(CodecError::Registry(format!("schema {id}: {e}"))),
            }
        })
    }

    fn reachable(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let r = self.http.get(format!("{}/subjects", self.url)).send().await;
            r.is_ok_and(|r| r.status().is_success())
        })
    }
}

/// Whether the registry itself answered that it has no such schema (HTTP 404). Every other
/// failure — refused or cut connections, a 500 while the registry's database is down (Apicurio
/// with SQL storage does that), a body that does not parse — says nothing about the id, so the
/// record is retried rather than dead-lettered. (The client marks only 502/503 and transport
/// errors retriable.)
fn said_not_found(e: &schema_registry_converter::error::SRCError) -> bool {
    !e.retriable && e.error.contains("status 404")
}

/// An in-process registry for unit and stage tests (no network).
#[derive(Default)]
pub struct MemoryResolver {
    inner: RwLock<MemoryRegistry>,
}

/// (subject, schema) → id, and id → schema.
type MemoryRegistry = (HashMap<(String, String), u32>, HashMap<u32, String>);

impl SchemaResolver for MemoryResolver {
    fn register<'a>(
        &'a self,
        subject: &'a str,
        _full_name: &'a str,
        schema: &'a str,
    ) -> BoxFuture<'a, Result<u32, CodecError>> {
        Box::pin(async move {
            let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
            let key = (subject.to_owned(), schema.to_owned());
            if let Some(id) = g.0.get(&key) {
                return Ok(*id);
            }
            let id = g.1.len() as u32 + 1;
            g.0.insert(key, id);
            g.1.insert(id, schema.to_owned());
            Ok(id)
        })
    }

    fn fetch(&self, id: u32) -> BoxFuture<'_, Result<String, CodecError>> {
        Box::pin(async move {
            let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
            g.1.get(&id).cloned().ok_or(CodecError::UnknownSchema(id))
        })
    }
}

/// A writer schema known by id, with its datum reader built once.
struct WriterEntry {
    schema: &'static Schema,
    full_name: String,
    canonical: String,
    reader: GenericDatumReader<'static>,
}

/// Subject for a topic and record, per the contract: public topics use `<topic>-value`
/// (one type per topic); internal topics may carry several event types, so they use
/// `<topic>-<full name>` (TopicRecordNameStrategy).
pub fn subject_for(topic: &str, full_name: &str) -> String {
    let public = [
        topics::REQUESTS,
        topics::DELIVERIES,
        topics::RECEIPTS,
        topics::DEAD_LETTERS,
    ];
    if public.contains(&topic) {
        format!("{topic}-value")
    } else {
        format!("{topic}-{full_name}")
    }
}

type SharedReader = Arc<GenericDatumReader<'static>>;

/// Largest allocation one decode may make, bytes.
pub const MAX_DECODE_ALLOCATION: usize = 8 << 20;

/// The codec shared by all stages of a process.
pub struct Codec {
    resolver: Arc<dyn SchemaResolver>,
    /// type → topic → registered id.
    ids: RwLock<HashMap<&'static str, HashMap<String, u32>>>,
    writers: RwLock<HashMap<u32, Arc<WriterEntry>>>,
    /// Datum writers of our own event types, built once.
    encoders: RwLock<HashMap<&'static str, Arc<GenericDatumWriter<'static>>>>,
    /// (writer id, our type) → a resolving reader when the writer's schema differs from ours;
    /// `None` when they are the same and the fast path applies.
    resolvers: RwLock<HashMap<(u32, &'static str), Option<SharedReader>>>,
}

impl Codec {
    pub fn new(resolver: Arc<dyn SchemaResolver>) -> Self {
        // A hostile record can claim a string or array of any length: no single decode may
        // allocate more than a record could carry (Kafka's 1 MB, with room).
        apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION);
        Codec {
            resolver,
            ids: RwLock::default(),
            writers: RwLock::default(),
            encoders: RwLock::default(),
            resolvers: RwLock::default(),
        }
    }

    /// Whether the schema registry answers now (a stage's transient failure is not its
    /// record's fault while it does not).
    pub async fn registry_reachable(&self) -> bool {
        self.resolver.reachable().await
    }

    /// Registers `T` for `topic` (idempotent) and returns its id.
    pub async fn schema_id<T: Event>(&self, topic: &str) -> Result<u32, CodecError> {
        if let Some(id) = read(&self.ids).get(T::FULL_NAME).and_then(|t| t.get(topic)) {
            return Ok(*id);
        }
        let subject = subject_for(topic, T::FULL_NAME);
        let id = self
            .resolver
            .register(&subject, T::FULL_NAME, T::schema_text())
            .await?;
        write(&self.ids)
            .entry(T::FULL_NAME)
            .or_default()
            .insert(topic.to_owned(), id);
        Ok(id)
    }

    /// Confluent-framed Avro bytes of `event` for `topic`.
    pub async fn encode<T: Event>(&self, topic: &str, event: &T) -> Result<Vec<u8>, CodecError> {
        let id = self.schema_id::<T>(topic).await?;
        let mut buf = Vec::with_capacity(256);
        buf.push(0u8);
        buf.extend_from_slice(&id.to_be_bytes());
        self.encoder::<T>()?
            .as_ref()
            .write_ser(&mut buf, event)
            .map_err(|e| CodecError::Encode(T::FULL_NAME, e.to_string()))?;
        Ok(buf)
    }

    fn encoder<T: Event>(&self) -> Result<Arc<GenericDatumWriter<'static>>, CodecError> {
        if let Some(w) = read(&self.encoders).get(T::FULL_NAME) {
            return Ok(w.clone());
        }
        let w = Arc::new(
            GenericDatumWriter::builder(T::schema())
                .build()
                .map_err(|e| CodecError::Encode(T::FULL_NAME, e.to_string()))?,
        );
        write(&self.encoders).insert(T::FULL_NAME, w.clone());
        Ok(w)
    }

    fn frame(bytes: &[u8]) -> Result<(u32, &[u8]), CodecError> {
        match bytes {
            [0, a, b, c, d, rest @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
            [] => Err(CodecError::NotFramed("empty payload".into())),
            [m, ..] if *m != 0 => Err(CodecError::NotFramed(format!("magic byte {m}, want 0"))),
            _ => Err(CodecError::NotFramed(format!(
                "{} bytes, too short",
                bytes.len()
            ))),
        }
    }

    async fn writer(&self, id: u32) -> Result<Arc<WriterEntry>, CodecError> {
        if let Some(w) = read(&self.writers).get(&id) {
            return Ok(w.clone());
        }
        let text = self.resolver.fetch(id).await?;
        let schema = Schema::parse_str(&text).map_err(|e| CodecError::Undecodable {
            id,
            detail: format!("registry schema does not parse: {e}"),
        })?;
        let full_name = schema
            .name()
            .map(|n| n.fullname(None))
            .unwrap_or_else(|| "<unnamed>".into());
        let canonical = schema.canonical_form();
        // Bounded: one entry per schema id this process ever sees.
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let reader =
            GenericDatumReader::builder(schema)
                .build()
                .map_err(|e| CodecError::Undecodable {
                    id,
                    detail: e.to_string(),
                })?;
        let entry = Arc::new(WriterEntry {
            schema,
            full_name,
            canonical,
            reader,
        });
        write(&self.writers).insert(id, entry.clone());
        Ok(entry)
    }

    /// The full record name of a framed payload (to dispatch topics carrying several types).
    pub async fn event_name(&self, bytes: &[u8]) -> Result<String, CodecError> {
        let (id, _) = Self::frame(bytes)?;
        Ok(self.writer(id).await?.full_name.clone())
    }

    /// The `header` of a framed event of any internal type (`None` for types without one, such
    /// as `SendRequested`): what a stage needs to fail a message whose record it cannot process.
    pub async fn header(&self, bytes: &[u8]) -> Result<Option<EventHeader>, CodecError> {
        let (id, mut body) = Self::frame(bytes)?;
        let writer = self.writer(id).await?;
        let undecodable = |e: apache_avro::Error| CodecError::Undecodable {
            id,
            detail: e.to_string(),
        };
        let value = writer.reader.read_value(&mut body).map_err(undecodable)?;
        let apache_avro::types::Value::Record(fields) = value else {
            return Ok(None);
        };
        match fields.into_iter().find(|(name, _)| name == "header") {
            Some((_, h)) => Ok(from_value::<EventHeader>(&h).ok()),
            None => Ok(None),
        }
    }

    /// A framed payload of any type as JSON, with its record name (for operators' views).
    pub async fn to_json(&self, bytes: &[u8]) -> Result<(String, serde_json::Value), CodecError> {
        let (id, mut body) = Self::frame(bytes)?;
        let writer = self.writer(id).await?;
        let undecodable = |detail: String| CodecError::Undecodable { id, detail };
        let value = writer
            .reader
            .read_value(&mut body)
            .map_err(|e| undecodable(e.to_string()))?;
        let json = serde_json::Value::try_from(value).map_err(|e| undecodable(e.to_string()))?;
        Ok((writer.full_name.clone(), json))
    }

    /// `None` when `writer` is our own schema for `T` (no resolution needed).
    fn resolver_for<T: Event>(
        &self,
        id: u32,
        writer: &WriterEntry,
    ) -> Result<Option<Arc<GenericDatumReader<'static>>>, CodecError> {
        if let Some(r) = read(&self.resolvers).get(&(id, T::FULL_NAME)) {
            return Ok(r.clone());
        }
        let r = if writer.canonical == T::schema().canonical_form() {
            None
        } else {
            let reader = GenericDatumReader::builder(writer.schema)
                .reader_schema(T::schema())
                .build()
                .map_err(|e| CodecError::Undecodable {
                    id,
                    detail: e.to_string(),
                })?;
            Some(Arc::new(reader))
        };
        write(&self.resolvers).insert((id, T::FULL_NAME), r.clone());
        Ok(r)
    }

    /// Decodes a framed payload as `T`, resolving an evolved writer schema where needed.
    pub async fn decode<T: Event>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let (id, mut body) = Self::frame(bytes)?;
        let writer = self.writer(id).await?;
        if writer.full_name != T::FULL_NAME {
            return Err(CodecError::WrongType {
                expected: T::FULL_NAME,
                got: writer.full_name.clone(),
            });
        }
        let undecodable = |e: apache_avro::Error| CodecError::Undecodable {
            id,
            detail: e.to_string(),
        };
        match self.resolver_for::<T>(id, &writer)? {
            None => writer.reader.read_deser(&mut body).map_err(undecodable),
            Some(resolving) => {
                let value = resolving.read_value(&mut body).map_err(undecodable)?;
                from_value(&value).map_err(undecodable)
            }
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_schemas::{Channel, MessageCanceled, Priority, Recipient, SendRequested};

    fn request() -> SendRequested {
        SendRequested {
            request_id: "r".into(),
            app_id: "a".into(),
            idempotency_key: None,
            channel: Channel::Sms,
            template: None,
            params: Default::default(),
            recipients: vec![Recipient {
                address: "+8613800000000".into(),
                params: Default::default(),
                timezone: None,
            }],
            content: None,
            send_at: None,
            priority: Priority::Low,
            expires_at: Some(5),
            metadata: Default::default(),
            requested_at: 1,
        }
    }

    #[tokio::test]
    async fn round_trips_and_names_the_type() {
        let codec = Codec::new(Arc::new(MemoryResolver::default()));
        let bytes = codec.encode(topics::REQUESTS, &request()).await.unwrap();
        assert_eq!(bytes[0], 0);
        assert_eq!(
            codec.event_name(&bytes).await.unwrap(),
            "io.herald.v1.SendRequested"
        );
        assert_eq!(
            codec.decode::<SendRequested>(&bytes).await.unwrap(),
            request()
        );
        let err = codec.decode::<MessageCanceled>(&bytes).await.unwrap_err();
        assert_eq!(err.code(), "unexpected_event_type");
    }

    #[tokio::test]
    async fn bad_input_is_a_permanent_error_not_a_panic() {
        let codec = Codec::new(Arc::new(MemoryResolver::default()));
        let good = codec.encode(topics::REQUESTS, &request()).await.unwrap();
        for bad in [
            &b""[..],
            b"\x01abcdef",
            b"\x00\x00",
            &good[..good.len() - 3],
            b"\x00\x00\x00\x00\x63zz",
        ] {
            let err = codec.decode::<SendRequested>(bad).await.unwrap_err();
            assert!(!err.is_transient(), "{err}");
        }
    }

    #[test]
    fn only_a_registry_that_answers_404_makes_a_schema_unknown() {
        use schema_registry_converter::error::SRCError;
        let answered = |status: &str| {
            SRCError::non_retryable_with_cause(
                "registry said so",
                &format!("HTTP request to schema registry failed with status {status}"),
            )
        };
        assert!(said_not_found(&answered("404 Not Found")));
        // Apicurio answers 500 while its PostgreSQL is down; a cut body does not parse; a
        // refused connection or a 503 is retriable in the client already.
        assert!(!said_not_found(&answered("500 Internal Server Error")));
        assert!(!said_not_found(&SRCError::non_retryable_with_cause(
            "EOF while parsing",
            "could not parse to RawRegisteredSchema"
        )));
        assert!(!said_not_found(&SRCError::retryable_with_cause(
            "connection refused",
            "http call to schema registry failed"
        )));
    }

    #[tokio::test]
    async fn an_evolved_writer_schema_is_resolved() {
        let resolver = Arc::new(MemoryResolver::default());
        let codec = Codec::new(resolver.clone());
        // A newer producer added an optional field this build does not know.
        let newer = SendRequested::schema_text().replacen(
            "\"fields\": [",
            "\"fields\": [{\"name\": \"tenant\", \"type\": [\"null\", \"string\"], \"default\": null},",
            1,
        );
        let newer_schema = Schema::parse_str(&newer).unwrap();
        let id = resolver
            .register("x", "io.herald.v1.SendRequested", &newer)
            .await
            .unwrap();
        let mut value = apache_avro::to_value(request()).unwrap();
        if let apache_avro::types::Value::Record(fields) = &mut value {
            fields.insert(
                0,
                (
                    "tenant".into(),
                    apache_avro::types::Value::Union(0, Box::new(apache_avro::types::Value::Null)),
                ),
            );
        }
        let value = value.resolve(&newer_schema).unwrap();
        let mut bytes = vec![0];
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend(
            GenericDatumWriter::builder(&newer_schema)
                .build()
                .unwrap()
                .write_value_to_vec(value)
                .unwrap(),
        );
        assert_eq!(
            codec.decode::<SendRequested>(&bytes).await.unwrap(),
            request()
        );
    }
}
