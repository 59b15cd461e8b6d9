//! Huawei Cloud SMS status reports (PROVIDERS-MORE.md §4.6): one report per form-encoded push
//! (`smsMsgId`, `status`, `statusDesc`, `extend` …), or the JSON batch variant
//! `{"statusReportList": [...]}`. `DELIVRD` is delivered; `ACCEPTD` is not final and is skipped;
//! anything else is undelivered with Huawei's or the operator's status as the code. Unsigned by
//! default: the callback path carries a secret token.

use std::collections::HashMap;

use crate::Report;

fn report(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Report>, String> {
    let id = get("smsMsgId")
        .filter(|s| !s.is_empty())
        .ok_or("smsMsgId is missing")?;
    let status = get("status")
        .filter(|s| !s.is_empty())
        .ok_or("status is missing")?;
    if status == "ACCEPTD" {
        return Ok(None);
    }
    Ok(Some(Report {
        message_id: get("extend").filter(|s| !s.is_empty()),
        provider_message_id: Some(id),
        delivered: status == "DELIVRD",
        message: get("statusDesc").unwrap_or_default(),
        code: status,
    }))
}

pub fn parse(body: &[u8]) -> Result<Vec<Report>, String> {
    if body.trim_ascii_start().first() == Some(&b'{') {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let list = v["statusReportList"]
            .as_array()
            .ok_or("statusReportList is missing")?;
        let mut out = Vec::new();
        for r in list {
            let get = |k: &str| -> Option<String> {
                r.get(k).and_then(|v| match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
            };
            out.extend(report(&get)?);
        }
        return Ok(out);
    }
    let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
    let fields: HashMap<String, String> = url::form_urlencoded::parse(text.as_bytes())
        .into_owned()
        .collect();
    let get = |k: &str| fields.get(k).cloned();
    Ok(report(&get)?.into_iter().collect())
}

/// Huawei documents no answer body: 200 with an empty JSON object.
pub fn ack() -> serde_json::Value {
    serde_json::json!({})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_formats() {
        // The official demo's body, and its failure variant.
        let ok = parse(b"sequence=1&total=1&updateTime=2018-10-31T08%3A43%3A41Z&source=2&smsMsgId=2ea20735-f856-4376-afbf-570bd70a46ee_11840135&status=DELIVRD").unwrap();
        assert_eq!(ok.len(), 1);
        assert!(ok[0].delivered);
        assert_eq!(
            ok[0].provider_message_id.as_deref(),
            Some("2ea20735-f856-4376-afbf-570bd70a46ee_11840135")
        );
        let failed =
            parse(b"sequence=1&total=1&source=2&smsMsgId=x_1&status=E200027&extend=m-1").unwrap();
        assert!(!failed[0].delivered);
        assert_eq!(failed[0].code, "E200027");
        assert_eq!(failed[0].message_id.as_deref(), Some("m-1"));
        assert!(parse(b"smsMsgId=x_1&status=ACCEPTD").unwrap().is_empty());
        let batch = parse(br#"{"statusReportList":[{"smsMsgId":"a_1","status":"DELIVRD","total":1,"sequence":1},{"smsMsgId":"b_1","status":"UNDELIV","statusDesc":"x"}]}"#).unwrap();
        assert_eq!(batch.len(), 2);
        assert!(batch[0].delivered && !batch[1].delivered);
        assert!(parse(b"status=DELIVRD").is_err());
        assert!(parse(b"{\"nothing\": 1}").is_err());
    }
}
