//! Aliyun SmsReport push (PROVIDERS.md §1.7): a JSON array, unsigned (the callback path carries
//! a secret token instead). `out_id` is Herald's message id.

use serde::Deserialize;

use crate::Report;

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

pub fn parse(body: &[u8]) -> Result<Vec<Report>, String> {
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

pub fn ack() -> serde_json::Value {
    serde_json::json!({"code": 0, "msg": "接收成功"})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_format() {
        let a = parse(
            r#"[{"phone_number":"1381111****","send_time":"2017-01-01 00:00:00","report_time":"2017-01-01 00:00:00","success":true,"err_code":"DELIVERED","err_msg":"用户接收成功","sms_size":"1","biz_id":"12345","out_id":"m-1"},
                {"phone_number":"1","success":false,"err_code":"MK:0001","err_msg":"x","biz_id":"9","out_id":""}]"#.as_bytes(),
        )
        .unwrap();
        assert_eq!(a[0].message_id.as_deref(), Some("m-1"));
        assert!(a[0].delivered);
        assert_eq!(a[1].message_id, None);
        assert_eq!(a[1].provider_message_id.as_deref(), Some("9/1"));
        assert!(!a[1].delivered);
        assert!(parse(b"{}").is_err());
    }
}
