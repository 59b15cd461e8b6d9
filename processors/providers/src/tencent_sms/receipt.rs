//! Tencent SMS status callback (PROVIDERS.md §2.5): a JSON array, unsigned (the callback path
//! carries a secret token instead). `sid` is the per-number `SerialNo` the send recorded.
//!
//! The callback echoes neither `SessionContext` nor anything else Herald chose, so a receipt
//! matches only an attempt whose answer (with its `SerialNo`) was recorded. When the answer was
//! lost (a timeout after the request left: the outcome is unknown), no receipt can find the
//! attempt: under `hold_for_receipt` it ends `unknown` at its receipt deadline, and the receipt
//! is answered 503 (unmatched) until Tencent stops pushing it.

use serde::Deserialize;

use crate::Report;

#[derive(Deserialize)]
struct TencentReport {
    report_status: String,
    #[serde(default)]
    errmsg: String,
    #[serde(default)]
    description: String,
    sid: String,
}

pub fn parse(body: &[u8]) -> Result<Vec<Report>, String> {
    let v: Vec<TencentReport> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    v.into_iter()
        .map(|r| {
            let delivered = match r.report_status.as_str() {
                "SUCCESS" => true,
                "FAIL" => false,
                other => return Err(format!("report_status {other:?}")),
            };
            Ok(Report {
                message_id: None,
                provider_message_id: Some(r.sid),
                delivered,
                code: r.errmsg,
                message: r.description,
            })
        })
        .collect()
}

pub fn ack() -> serde_json::Value {
    serde_json::json!({"result": 0, "errmsg": "OK"})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_format() {
        let t = parse(
            r#"[{"user_receive_time":"2015-10-17 08:03:04","nationcode":"86","mobile":"13xxxxxxxxx","report_status":"FAIL","errmsg":"UNDELIV","description":"用户短信未送达","sid":"2433:1"}]"#.as_bytes(),
        )
        .unwrap();
        assert_eq!(t[0].provider_message_id.as_deref(), Some("2433:1"));
        assert!(!t[0].delivered);
        assert_eq!(t[0].code, "UNDELIV");
        assert!(parse(br#"[{"report_status":"MAYBE","sid":"1"}]"#).is_err());
    }
}
