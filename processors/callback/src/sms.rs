//! SMS delivery receipts (PROVIDERS.md §1.7 Aliyun SmsReport, §2.5 Tencent status callback):
//! JSON arrays, unsigned (the endpoint path carries a secret token instead). Parsing is pure;
//! the stage looks each report's message up in the send ledger by the ids Herald gave the
//! provider (`OutId` = message id for Aliyun, `SerialNo`/`sid` for Tencent).

use serde::Deserialize;

/// One report, provider-neutral.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Herald's message id when the provider echoes it (Aliyun `out_id`).
    pub message_id: Option<String>,
    /// The provider's id for the send (`biz_id`, `sid`).
    pub provider_message_id: Option<String>,
    pub delivered: bool,
    pub code: String,
    pub message: String,
}

#[derive(Deserialize)]
struct AliyunReport {
    #[serde(default)]
    phone_number: String,
    #[serde(default)]
    success: bool,
    #[serde(default)]
    err_code: String,
    #[serde(default)]
    err_msg: String,
    #[serde(default)]
    biz_id: Option<String>,
    #[serde(default)]
    out_id: Option<String>,
}

#[derive(Deserialize)]
struct TencentReport {
    report_status: String,
    #[serde(default)]
    errmsg: String,
    #[serde(default)]
    description: String,
    sid: String,
}

/// The provider's acknowledgement body on success.
pub fn ack(kind: &str) -> serde_json::Value {
    match kind {
        "tencent_sms" => serde_json::json!({"result": 0, "errmsg": "OK"}),
        _ => serde_json::json!({"code": 0, "msg": "接收成功"}),
    }
}

/// Parses a receipt push of a provider kind.
pub fn parse(kind: &str, body: &[u8]) -> Result<Vec<Report>, String> {
    match kind {
        "aliyun_sms" => {
            let v: Vec<AliyunReport> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
            Ok(v.into_iter()
                .map(|r| Report {
                    message_id: r.out_id.filter(|s| !s.is_empty()),
                    // Herald stores `<biz_id>/<phone>`: a batch call shares one BizId.
                    provider_message_id: r
                        .biz_id
                        .filter(|s| !s.is_empty())
                        .map(|b| format!("{b}/{}", r.phone_number)),
                    delivered: r.success,
                    code: r.err_code,
                    message: r.err_msg,
                })
                .collect())
        }
        "tencent_sms" => {
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
        other => Err(format!("{other} has no receipt format")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliyun_and_tencent_formats() {
        let a = parse(
            "aliyun_sms",
            r#"[{"phone_number":"1381111****","send_time":"2017-01-01 00:00:00","report_time":"2017-01-01 00:00:00","success":true,"err_code":"DELIVERED","err_msg":"用户接收成功","sms_size":"1","biz_id":"12345","out_id":"m-1"},
                {"phone_number":"1","success":false,"err_code":"MK:0001","err_msg":"x","biz_id":"9","out_id":""}]"#.as_bytes(),
        )
        .unwrap();
        assert_eq!(a[0].message_id.as_deref(), Some("m-1"));
        assert!(a[0].delivered);
        assert_eq!(a[1].message_id, None);
        assert_eq!(a[1].provider_message_id.as_deref(), Some("9/1"));
        assert!(!a[1].delivered);
        let t = parse(
            "tencent_sms",
            r#"[{"user_receive_time":"2015-10-17 08:03:04","nationcode":"86","mobile":"13xxxxxxxxx","report_status":"FAIL","errmsg":"UNDELIV","description":"用户短信未送达","sid":"2433:1"}]"#.as_bytes(),
        )
        .unwrap();
        assert_eq!(t[0].provider_message_id.as_deref(), Some("2433:1"));
        assert!(!t[0].delivered);
        assert_eq!(t[0].code, "UNDELIV");
        assert!(parse("tencent_sms", br#"[{"report_status":"MAYBE","sid":"1"}]"#).is_err());
        assert!(parse("aliyun_sms", b"{}").is_err());
    }
}
