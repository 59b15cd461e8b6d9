//! Trace context across the stages and span export.
//!
//! Every record carries a W3C `traceparent` header. The gateway takes the caller's (or starts a
//! trace); each stage reads its input's, and the records it writes carry the same trace with
//! the stage's span as parent. When an OTLP endpoint is configured ([`install`]), each stage's
//! handling of a record, the gateway's request and the provider call are exported as spans
//! (OTLP/HTTP, protobuf), so one message can be followed from the request to its delivery
//! event. Without one, context still travels (the parent's span id is passed on unchanged) and
//! nothing is recorded.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider, Span,
};

use crate::config::TracingConfig;
use crate::transport::InRecord;
use herald_schemas::headers;

pub use opentelemetry::KeyValue as Attr;

static TRACER: OnceLock<(SdkTracer, f64)> = OnceLock::new();

/// Exporting spans; dropping it flushes what is queued (bounded) and stops the exporter.
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Drop for Exporting {
    fn drop(&mut self) {
        let _ = self.provider.shutdown_with_timeout(Duration::from_secs(5));
    }
}

/// Starts span export when `cfg.otlp_endpoint` is set (once per process; later calls return
/// `None`). Must run inside the Tokio runtime: the exporter's HTTP calls run on it.
pub fn install(cfg: &TracingConfig) -> Result<Option<Exporting>, String> {
    let Some(endpoint) = &cfg.otlp_endpoint else {
        return Ok(None);
    };
    if TRACER.get().is_some() {
        return Ok(None);
    }
    let client = OnRuntime {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("OTLP client: {e}"))?,
        runtime: tokio::runtime::Handle::try_current()
            .map_err(|e| format!("OTLP exporter outside the runtime: {e}"))?,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    let _ = TRACER.set((provider.tracer("herald"), cfg.sample_ratio));
    tracing::info!(endpoint = %endpoint, "exporting spans over OTLP");
    Ok(Some(Exporting { provider }))
}

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get().map(|(t, _)| t)
}

/// The exporter's HTTP client: reqwest on Herald's runtime (the batch exporter calls it from
/// its own thread).
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        self.runtime
            .spawn(async move {
                let resp = client.execute(request).await?;
                let mut out = Response::builder().status(resp.status());
                for (k, v) in resp.headers() {
                    out = out.header(k, v);
                }
                let body = resp.bytes().await?;
                Ok::<_, HttpError>(out.body(body)?)
            })
            .await?
    }
}

/// Parses a `traceparent` value (W3C Trace Context; version `00`, and later versions read as
/// the spec says). `None` if it is malformed or its ids are all zeros.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    struct One<'a>(&'a str);
    impl Extractor for One<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == headers::TRACEPARENT).then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec![headers::TRACEPARENT]
        }
    }
    // The field lengths are fixed (the propagator alone takes shorter ids); a later version
    // may append fields after a dash.
    let b = traceparent.as_bytes();
    let shaped = b.len() >= 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && (b.len() == 55 || (&b[..2] != b"00" && b[55] == b'-'));
    if !shaped {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&One(traceparent));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The `traceparent` value of `sc`.
pub fn format(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// A new trace: random ids, sampled by the configured ratio (always, when not exporting: the
/// decision is then for whoever receives it).
pub fn new_root() -> String {
    let ids = RandomIdGenerator::default();
    let trace_id = ids.new_trace_id();
    let ratio = TRACER.get().map_or(1.0, |(_, r)| *r);
    // The same rule as the SDK's ratio sampler: the low 8 bytes of the id against the ratio.
    let low = u64::from_be_bytes(trace_id.to_bytes()[8..].try_into().unwrap_or([0; 8])) >> 1;
    let sampled = ratio >= 1.0 || (low as f64) < ratio * (u64::MAX >> 1) as f64;
    format(&SpanContext::new(
        trace_id,
        ids.new_span_id(),
        if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        },
        false,
        TraceState::default(),
    ))
}

/// The 32-hex trace id of a `traceparent` (for logs and event headers), or the value as it is.
pub fn trace_id_of(traceparent: &str) -> String {
    parse(traceparent).map_or_else(|| traceparent.to_owned(), |sc| sc.trace_id().to_string())
}

/// The trace context an input record carries: its `traceparent`, else the older
/// `herald-trace-id` header if that holds one.
pub fn of_record(input: &InRecord) -> Option<SpanContext> {
    [headers::TRACEPARENT, headers::TRACE_ID]
        .into_iter()
        .filter_map(|h| input.header(h))
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find_map(parse)
}

fn start(
    name: String,
    kind: SpanKind,
    parent: Option<&SpanContext>,
    attrs: Vec<KeyValue>,
) -> Option<Span> {
    let tracer = tracer()?;
    let cx = match parent {
        Some(sc) => Context::new().with_remote_span_context(sc.clone()),
        None => Context::new(),
    };
    Some(
        tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(SystemTime::now())
            .with_attributes(attrs)
            .start_with_context(tracer, &cx),
    )
}

/// The spans of one batch in one stage: one per input record, ended when the batch is
/// committed (or dropped with it).
pub struct StageSpans(Vec<Span>);

/// Gives every record of a polled batch a trace context for what the stage writes from it: a
/// new span of `stage` under the record's (when exporting), or the record's own (when not), or
/// a new trace (a record that came without one). Written into the record's `traceparent`
/// header, which [`crate::worker::trace_id`] reads.
pub fn enter(stage: &'static str, batch: &mut [InRecord]) -> StageSpans {
    let mut spans = Vec::new();
    for r in batch.iter_mut() {
        let parent = of_record(r);
        let span = start(
            stage.to_owned(),
            SpanKind::Consumer,
            parent.as_ref(),
            vec![
                KeyValue::new("herald.stage", stage),
                KeyValue::new("messaging.destination.name", r.topic.clone()),
                KeyValue::new("messaging.kafka.partition", i64::from(r.partition)),
                KeyValue::new("messaging.kafka.offset", r.offset),
            ],
        );
        let value = match (&span, parent) {
            (Some(s), _) => format(s.span_context()),
            (None, Some(p)) => {
                if r.header(headers::TRACEPARENT).is_some() {
                    continue;
                }
                format(&p)
            }
            (None, None) => new_root(),
        };
        set_header(r, value);
        spans.extend(span);
    }
    StageSpans(spans)
}

fn set_header(r: &mut InRecord, value: String) {
    r.headers.retain(|(k, _)| k != headers::TRACEPARENT);
    r.headers
        .push((headers::TRACEPARENT.to_owned(), value.into_bytes()));
}

impl StageSpans {
    /// Notes a failed attempt at the batch (it will be processed again).
    pub fn failed(&mut self, error: &dyn std::fmt::Display) {
        for s in &mut self.0 {
            s.add_event(
                "batch failed; processed again",
                vec![KeyValue::new("error", error.to_string())],
            );
        }
    }

    /// Ends the spans: the batch is committed.
    pub fn end(self) {
        for mut s in self.0 {
            s.end();
        }
    }
}

/// A span for an outbound call (the provider call, the gateway's request), child of the
/// `traceparent` given; `None` when not exporting.
pub struct Call(Option<Span>);

impl Call {
    pub fn client(traceparent: &str, name: &str, attrs: Vec<KeyValue>) -> Call {
        Call(start(
            name.to_owned(),
            SpanKind::Client,
            parse(traceparent).as_ref(),
            attrs,
        ))
    }

    /// A server span under the caller's `traceparent` (if it is one), and the `traceparent` for
    /// what the request leads to: the span's, the caller's, or a new trace's.
    pub fn server(incoming: Option<&str>, name: &str, attrs: Vec<KeyValue>) -> (Call, String) {
        let parent = incoming.and_then(parse);
        let span = start(name.to_owned(), SpanKind::Server, parent.as_ref(), attrs);
        let tp = match (&span, parent) {
            (Some(s), _) => format(s.span_context()),
            (None, Some(p)) => format(&p),
            (None, None) => new_root(),
        };
        (Call(span), tp)
    }

    pub fn set(&mut self, attr: KeyValue) {
        if let Some(s) = &mut self.0 {
            s.set_attribute(attr);
        }
    }

    /// Ends the span; `error` marks it failed.
    pub fn end(mut self, error: Option<String>) {
        if let Some(s) = &mut self.0 {
            if let Some(e) = error {
                s.set_status(Status::error(e));
            }
            s.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_and_formatted_back() {
        // The example of the W3C Trace Context recommendation, §3.2.
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse(tp).expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled());
        assert_eq!(format(&sc), tp);
        assert_eq!(trace_id_of(tp), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\0",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_new_root_is_a_valid_sampled_traceparent() {
        let a = new_root();
        let b = new_root();
        assert!(parse(&a).expect("valid").is_sampled());
        assert_ne!(trace_id_of(&a), trace_id_of(&b));
    }

    #[test]
    fn without_export_a_record_keeps_its_context_and_one_without_gets_a_trace() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let rec = |headers: Vec<(String, Vec<u8>)>| InRecord {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            entry_id: None,
            key: None,
            payload: None,
            headers,
        };
        let mut batch = vec![
            rec(vec![(headers::TRACEPARENT.into(), tp.into())]),
            rec(vec![(headers::TRACE_ID.into(), tp.into())]),
            rec(vec![(
                headers::TRACE_ID.into(),
                b"not-a-traceparent".to_vec(),
            )]),
            rec(vec![]),
        ];
        enter("test", &mut batch).end();
        let got: Vec<String> = batch
            .iter()
            .map(|r| String::from_utf8(r.header(headers::TRACEPARENT).unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(got[0], tp);
        assert_eq!(got[1], tp);
        assert!(parse(&got[2]).is_some());
        assert!(parse(&got[3]).is_some());
        assert_ne!(trace_id_of(&got[2]), trace_id_of(&got[3]));
    }
}
