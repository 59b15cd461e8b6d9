//! The Rust types and the `.avsc` files cannot drift, and no schema change may break BACKWARD
//! compatibility with the released copies in `schemas/released/`.

use std::collections::HashMap;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::{AvroSchema, Schema};
use herald_schemas::*;

fn same_shape<T: AvroSchema + Event>() {
    let derived = T::get_schema().canonical_form();
    let file = T::schema().canonical_form();
    assert_eq!(
        derived,
        file,
        "{} drifted from its .avsc file",
        T::FULL_NAME
    );
}

#[test]
fn rust_types_match_schema_files() {
    same_shape::<SendRequested>();
    same_shape::<MessageAccepted>();
    same_shape::<MessageRendered>();
    same_shape::<MessageRouted>();
    same_shape::<DeliveryAttempted>();
    same_shape::<ReceiptReceived>();
    same_shape::<MessageSuppressed>();
    same_shape::<MessageCanceled>();
    same_shape::<MessageFailed>();
    same_shape::<DelayScheduled>();
    same_shape::<DeadLettered>();
}

#[test]
fn every_schema_is_backward_compatible_with_its_released_copy() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/released");
    let mut checked = 0;
    for (name, text) in all_schemas() {
        let file = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                std::fs::read_to_string(p)
                    .map(|t| {
                        t.contains(&format!(
                            "\"name\": \"{}\"",
                            name.rsplit('.').next().unwrap()
                        ))
                    })
                    .unwrap_or(false)
                    && p.extension().is_some_and(|e| e == "avsc")
            })
            .unwrap_or_else(|| panic!("no released copy of {name}"));
        let released = Schema::parse_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let current = Schema::parse_str(text).unwrap();
        if let Err(e) = SchemaCompatibility::can_read(&released, &current) {
            panic!("{name}: current schema cannot read data written with {file:?}: {e}");
        }
        checked += 1;
    }
    assert_eq!(checked, 11);
}

#[test]
fn the_compatibility_check_rejects_a_breaking_change() {
    // A new field without a default is what BACKWARD forbids: the check must say so.
    let released = SendRequested::schema();
    let broken = SendRequested::schema_text().replacen(
        "\"fields\": [",
        "\"fields\": [{\"name\": \"tenant\", \"type\": \"string\"},",
        1,
    );
    let broken = Schema::parse_str(&broken).unwrap();
    assert!(SchemaCompatibility::can_read(released, &broken).is_err());
    // … and an optional field with a default is fine.
    let fine = SendRequested::schema_text().replacen(
        "\"fields\": [",
        "\"fields\": [{\"name\": \"tenant\", \"type\": [\"null\", \"string\"], \"default\": null},",
        1,
    );
    let fine = Schema::parse_str(&fine).unwrap();
    assert!(SchemaCompatibility::can_read(released, &fine).is_ok());
}

#[test]
fn events_round_trip_through_their_schema_files() {
    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::writer::datum::GenericDatumWriter;
    let req = SendRequested {
        request_id: "r-1".into(),
        app_id: "shop".into(),
        idempotency_key: Some("k".into()),
        channel: Channel::Email,
        template: Some("welcome".into()),
        params: HashMap::from([("name".into(), "Ada".into())]),
        recipients: vec![Recipient {
            address: "ada@example.com".into(),
            params: HashMap::new(),
            timezone: Some("Asia/Shanghai".into()),
        }],
        content: Some(Content {
            subject: Some("hi".into()),
            ..Default::default()
        }),
        send_at: Some(1_700_000_000_000),
        priority: Priority::High,
        expires_at: None,
        metadata: HashMap::new(),
        requested_at: 1_700_000_000_000,
    };
    let schema = SendRequested::schema();
    let bytes = GenericDatumWriter::builder(schema)
        .build()
        .unwrap()
        .write_ser_to_vec(&req)
        .unwrap();
    let back: SendRequested = GenericDatumReader::builder(schema)
        .build()
        .unwrap()
        .read_deser(&mut bytes.as_slice())
        .unwrap();
    assert_eq!(back, req);

    let dl = DeadLettered {
        event_id: "e".into(),
        event_time: 1,
        stage: "accept".into(),
        source_topic: "t".into(),
        source_partition: 2,
        source_offset: 3,
        key: Some(b"k".to_vec()),
        payload: Some(vec![0, 1, 2, 255]),
        reason: Reason::new("undecodable", "bad magic byte"),
        message_id: None,
        request_id: None,
    };
    let schema = DeadLettered::schema();
    let bytes = GenericDatumWriter::builder(schema)
        .build()
        .unwrap()
        .write_ser_to_vec(&dl)
        .unwrap();
    let back: DeadLettered = GenericDatumReader::builder(schema)
        .build()
        .unwrap()
        .read_deser(&mut bytes.as_slice())
        .unwrap();
    assert_eq!(back, dl);
}
