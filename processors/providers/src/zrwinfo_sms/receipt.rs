//! 掌榕网 delivery reports (PROVIDERS-MORE.md §3.6): a form push (urlencoded; one report per
//! push) with `smUuid`, `mobile`, `batchId` (token sends), `deliverResult` (`DELIVRD` is
//! delivered, anything else is the operator's failure code) and `deliverTime`. Unsigned: the
//! callback path carries a secret token.

use std::collections::HashMap;

use crate::Report;

pub fn parse(body: &[u8]) -> Result<Vec<Report>, String> {
    let fields: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let get = |k: &str| fields.get(k).filter(|v| !v.is_empty()).cloned();
    // A token send is known by its batchId, a single send by its smUuid.
    let id = get("batchId")
        .or_else(|| get("smUuid"))
        .ok_or("smUuid is missing")?;
    let result = get("deliverResult").ok_or("deliverResult is missing")?;
    Ok(vec![Report {
        message_id: None,
        provider_message_id: Some(id),
        delivered: result == "DELIVRD",
        message: get("deliverTime")
            .map(|t| format!("reported at {t} (Beijing time)"))
            .unwrap_or_default(),
        code: result,
    }])
}

/// The acknowledgement the reference client answers with (the platform documents none).
pub fn ack() -> serde_json::Value {
    serde_json::json!({"code": "0", "msg": "SUCCESS"})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_read_from_the_form() {
        let ok = parse("smUuid=10000_1_0_13700000000_1_NKWkEcS_1&mobile=13700000000&deliverResult=DELIVRD&deliverTime=2025-11-26+10%3A00%3A00".as_bytes()).unwrap();
        assert!(ok[0].delivered);
        assert_eq!(
            ok[0].provider_message_id.as_deref(),
            Some("10000_1_0_13700000000_1_NKWkEcS_1")
        );
        let failed = parse(b"smUuid=u1&batchId=b1&mobile=1&deliverResult=MK:0001").unwrap();
        assert!(!failed[0].delivered);
        assert_eq!(
            (
                failed[0].code.as_str(),
                failed[0].provider_message_id.as_deref()
            ),
            ("MK:0001", Some("b1"))
        );
        assert!(parse(b"mobile=1&deliverResult=DELIVRD").is_err());
        assert!(parse(b"smUuid=u1").is_err());
    }
}
