//! Sending policies applied before a provider is chosen (CONTRACT.md §4 "policies"):
//! opt-out, quiet hours (hold until the window ends, or drop), content dedup within a window,
//! and per-recipient frequency caps. Quiet hours are pure time arithmetic; the others keep their
//! state in PostgreSQL so they hold with several route workers and across restarts: each batch
//! takes a transaction-scoped advisory lock per (channel, recipient) — in sorted order, so
//! workers never deadlock — counts that recipient's hits in the window, and records a hit per
//! message it lets through, keyed by message id, so a redelivered batch re-decides the same way.

use std::collections::{BTreeSet, HashMap};

use herald_core::config::{PolicyConfig, QuietHours, QuietMode};
use herald_domain::destination::Region;
use herald_schemas::{MessageRendered, Priority};
use jiff::Timestamp;
use jiff::civil::Time;
use jiff::tz::TimeZone;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// What the policies say about one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Send,
    /// Hold until this time (ms), then route again.
    Hold {
        until_ms: i64,
    },
    /// Suppressed by `policy` with a reason code and text.
    Suppress {
        policy: &'static str,
        code: &'static str,
        message: String,
    },
}

fn parse_time(s: &str) -> Option<Time> {
    let parts: Vec<&str> = s.split(':').collect();
    let n = |i: usize| parts.get(i).map_or(Some(0), |p| p.parse::<i8>().ok());
    if !(2..=3).contains(&parts.len()) {
        return None;
    }
    Time::new(n(0)?, n(1)?, n(2)?, 0).ok()
}

/// Quiet hours: `None` when the message may go now, else the verdict.
pub fn quiet(
    q: &QuietHours,
    recipient_tz: Option<&str>,
    priority: Priority,
    now_ms: i64,
) -> Option<Verdict> {
    if q.exempt_priorities.contains(&priority) {
        return None;
    }
    let (Some(start), Some(end)) = (parse_time(&q.start), parse_time(&q.end)) else {
        return None;
    };
    let tz = recipient_tz
        .or(q.timezone.as_deref())
        .and_then(|z| TimeZone::get(z).ok())
        .unwrap_or(TimeZone::UTC);
    let now = Timestamp::from_millisecond(now_ms)
        .ok()?
        .to_zoned(tz.clone());
    let t = now.time();
    let inside = if start <= end {
        t >= start && t < end
    } else {
        t >= start || t < end
    };
    if !inside {
        return None;
    }
    Some(match q.mode {
        QuietMode::Drop => Verdict::Suppress {
            policy: "quiet_hours",
            code: "quiet_hours",
            message: format!(
                "quiet hours {}–{} in {}",
                q.start,
                q.end,
                tz.iana_name().unwrap_or("UTC")
            ),
        },
        QuietMode::Hold => {
            let mut date = now.date();
            if t >= end {
                date = date.tomorrow().ok()?;
            }
            let until = date
                .to_datetime(end)
                .to_zoned(tz)
                .ok()?
                .timestamp()
                .as_millisecond();
            Verdict::Hold { until_ms: until }
        }
    })
}

/// The content fingerprint content dedup compares.
pub fn content_hash(m: &MessageRendered) -> String {
    let c = &m.content;
    let mut h = Sha256::new();
    for part in [
        &c.subject,
        &c.text,
        &c.html,
        &c.markdown,
        &c.provider_template,
    ] {
        h.update(part.as_deref().unwrap_or("").as_bytes());
        h.update([0]);
    }
    let params: std::collections::BTreeMap<_, _> = c.provider_params.iter().collect();
    for (k, v) in params {
        h.update(k.as_bytes());
        h.update([1]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

/// The address every per-recipient policy keys on: the normalised form
/// ([`herald_domain::opt_out::address`]), so `13800138000` and `+8613800138000` share one
/// frequency cap and one opt-out; an address that does not normalise keys as written.
fn normal(m: &MessageRendered, region: Region) -> String {
    herald_domain::opt_out::address(m.header.channel, &m.recipient.address, region)
        .unwrap_or_else(|_| m.recipient.address.trim().to_owned())
}

fn scope(m: &MessageRendered, normal: &str) -> String {
    format!("{}:{}:{normal}", m.header.app_id, m.header.channel.as_str())
}

/// Applies opt-out, dedup and frequency caps to `msgs` (those quiet hours let through), in one
/// transaction. Answers a verdict per message, in order.
pub async fn stateful(
    db: &mut Client,
    msgs: &[&MessageRendered],
    policies: &HashMap<herald_schemas::Channel, PolicyConfig>,
    region: Region,
) -> Result<Vec<Verdict>, tokio_postgres::Error> {
    let mut verdicts = vec![Verdict::Send; msgs.len()];
    let normals: Vec<String> = msgs.iter().map(|m| normal(m, region)).collect();
    // Opt-outs apply to every channel unless its policy turns them off; dead device tokens to
    // mobile push.
    let relevant: Vec<usize> = (0..msgs.len())
        .filter(|i| {
            msgs[*i].header.channel == herald_schemas::Channel::Push
                || policies
                    .get(&msgs[*i].header.channel)
                    .is_none_or(|p| p.opt_out)
        })
        .collect();
    if relevant.is_empty() {
        return Ok(verdicts);
    }
    let tx = db.transaction().await?;
    // Opt-outs.
    let keys: Vec<(&str, &str, &str)> = relevant
        .iter()
        .map(|i| {
            let m = msgs[*i];
            (
                m.header.app_id.as_str(),
                m.header.channel.as_str(),
                m.recipient.address.as_str(),
            )
        })
        .collect();
    // Each address in its normalised form, as written, and in every spelling of it (opt-outs
    // stored before normalisation hold the address as it was written then).
    let spelled: Vec<Vec<String>> = relevant
        .iter()
        .map(|i| {
            herald_domain::destination::spellings(msgs[*i].header.channel, &normals[*i], region)
        })
        .collect();
    let lookups: Vec<(&str, &str, &str)> = relevant
        .iter()
        .zip(&spelled)
        .flat_map(|(i, spellings)| {
            let m = msgs[*i];
            spellings.iter().map(move |s| {
                (
                    m.header.app_id.as_str(),
                    m.header.channel.as_str(),
                    s.as_str(),
                )
            })
        })
        .chain(keys.iter().copied())
        .collect();
    let opted = herald_domain::opt_out::opted_out(&tx, &lookups).await?;
    // Which messages one of those rows names.
    let opted_out_at: std::collections::HashSet<usize> = relevant
        .iter()
        .zip(&spelled)
        .filter(|(i, spellings)| {
            let m = msgs[**i];
            spellings
                .iter()
                .map(String::as_str)
                .chain([m.recipient.address.as_str()])
                .any(|s| {
                    opted.contains(&(
                        m.header.app_id.clone(),
                        m.header.channel.as_str().to_owned(),
                        s.to_owned(),
                    ))
                })
        })
        .map(|(i, _)| *i)
        .collect();
    let push: Vec<(&str, &str, &str)> = keys
        .iter()
        .filter(|k| k.1 == herald_schemas::Channel::Push.as_str())
        .map(|(a, c, t)| (*a, *c, t.trim()))
        .collect();
    let dead = herald_domain::device_tokens::dead(&tx, &push).await?;

    // Lock every (app, channel, recipient) scope of the batch that has a cap or dedup, sorted.
    let counted: Vec<usize> = (0..msgs.len())
        .filter(|i| {
            policies
                .get(&msgs[*i].header.channel)
                .is_some_and(|p| p.frequency_cap.is_some() || p.dedup_window_secs.is_some())
        })
        .collect();
    let scopes: BTreeSet<String> = counted
        .iter()
        .map(|i| scope(msgs[*i], &normals[*i]))
        .collect();
    for s in &scopes {
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))",
            &[s],
        )
        .await?;
    }
    // Hits in the longest window any policy needs, per scope (excluding this batch's own
    // messages, which are re-decided below).
    let longest = policies
        .values()
        .flat_map(|p| [p.frequency_cap.map(|c| c.window_secs), p.dedup_window_secs])
        .flatten()
        .max()
        .unwrap_or(0) as f64;
    let scope_list: Vec<&String> = scopes.iter().collect();
    let ids: Vec<&str> = msgs.iter().map(|m| m.header.message_id.as_str()).collect();
    let rows = if scope_list.is_empty() {
        Vec::new()
    } else {
        tx.query(
            "SELECT scope, content_hash, extract(epoch from now() - at)::float8 FROM policy_hits
             WHERE scope = ANY($1) AND at > now() - make_interval(secs => $2)
               AND NOT (message_id = ANY($3))",
            &[&scope_list, &longest, &ids],
        )
        .await?
    };
    let mut hits: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    for r in rows {
        hits.entry(r.get(0)).or_default().push((r.get(1), r.get(2)));
    }
    let mut insert_scopes = Vec::new();
    let mut insert_ids = Vec::new();
    let mut insert_hashes = Vec::new();
    // The same message twice in one batch (a redelivery beside its first delivery) is one
    // message: its copies get the first one's verdict, never "duplicate of itself".
    let mut first_of: HashMap<&str, usize> = HashMap::new();
    for i in 0..msgs.len() {
        let m = msgs[i];
        if let Some(&j) = first_of.get(m.header.message_id.as_str()) {
            verdicts[i] = verdicts[j].clone();
            continue;
        }
        first_of.insert(m.header.message_id.as_str(), i);
        let policy = policies.get(&m.header.channel);
        if m.header.channel == herald_schemas::Channel::Push
            && dead.contains(&(
                m.header.app_id.clone(),
                m.header.channel.as_str().to_owned(),
                m.recipient.address.trim().to_owned(),
            ))
        {
            verdicts[i] = Verdict::Suppress {
                policy: "dead_token",
                code: "device_token_dead",
                message: "the provider said this device token is gone (unregistered)".into(),
            };
            continue;
        }
        if policy.is_none_or(|p| p.opt_out) && opted_out_at.contains(&i) {
            verdicts[i] = Verdict::Suppress {
                policy: "opt_out",
                code: "opted_out",
                message: "the recipient opted out of this channel".into(),
            };
            continue;
        }
        let Some(p) = policy.filter(|p| p.frequency_cap.is_some() || p.dedup_window_secs.is_some())
        else {
            continue;
        };
        let sc = scope(m, &normals[i]);
        let hash = content_hash(m);
        let seen = hits.entry(sc.clone()).or_default();
        if let Some(w) = p.dedup_window_secs
            && seen.iter().any(|(h, age)| *h == hash && *age < w as f64)
        {
            verdicts[i] = Verdict::Suppress {
                policy: "dedup",
                code: "duplicate_content",
                message: format!("the same content went to this recipient within {w} s"),
            };
            continue;
        }
        if let Some(cap) = p.frequency_cap {
            let n = seen
                .iter()
                .filter(|(_, age)| *age < cap.window_secs as f64)
                .count();
            if n >= cap.max as usize {
                verdicts[i] = Verdict::Suppress {
                    policy: "frequency_cap",
                    code: "frequency_cap",
                    message: format!(
                        "at most {} per {} s to this recipient",
                        cap.max, cap.window_secs
                    ),
                };
                continue;
            }
        }
        seen.push((hash.clone(), 0.0));
        insert_scopes.push(sc);
        insert_ids.push(m.header.message_id.clone());
        insert_hashes.push(hash);
    }
    if !insert_ids.is_empty() {
        tx.execute(
            "INSERT INTO policy_hits (scope, message_id, content_hash)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING",
            &[&insert_scopes, &insert_ids, &insert_hashes],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(verdicts)
}

/// Retention (`[retention]`): hits older than the longest dedup window or cap.
pub const PURGE: herald_domain::retention::Purge = herald_domain::retention::Purge {
    table: "policy_hits",
    third: herald_domain::retention::Third::None,
    days: |r| r.policy_hits_days,
    sql: "DELETE FROM policy_hits WHERE ctid IN (
            SELECT ctid FROM policy_hits
            WHERE at < now() - make_interval(days => $2)
            LIMIT $1)",
};

#[cfg(test)]
mod tests {
    use super::*;

    fn q(start: &str, end: &str, mode: QuietMode, tz: Option<&str>) -> QuietHours {
        QuietHours {
            start: start.into(),
            end: end.into(),
            mode,
            timezone: tz.map(str::to_owned),
            exempt_priorities: vec![Priority::High],
        }
    }

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn quiet_hours_across_midnight_in_the_recipients_zone() {
        let night = q("22:00", "08:00", QuietMode::Hold, Some("Asia/Shanghai"));
        // 23:30 in Shanghai = 15:30 UTC: held until 08:00 Shanghai next day = 00:00 UTC.
        assert_eq!(
            quiet(&night, None, Priority::Normal, ms("2026-03-01T15:30:00Z")),
            Some(Verdict::Hold {
                until_ms: ms("2026-03-02T00:00:00Z")
            })
        );
        // 07:00 Shanghai: held until 08:00 the same day.
        assert_eq!(
            quiet(&night, None, Priority::Low, ms("2026-03-01T23:00:00Z")),
            Some(Verdict::Hold {
                until_ms: ms("2026-03-02T00:00:00Z")
            })
        );
        // 12:00 Shanghai: free.
        assert_eq!(
            quiet(&night, None, Priority::Normal, ms("2026-03-01T04:00:00Z")),
            None
        );
        // HIGH (a one-time code) is exempt.
        assert_eq!(
            quiet(&night, None, Priority::High, ms("2026-03-01T15:30:00Z")),
            None
        );
        // The recipient's own zone wins: 15:30 UTC is 10:30 in New York.
        assert_eq!(
            quiet(
                &night,
                Some("America/New_York"),
                Priority::Normal,
                ms("2026-03-01T15:30:00Z")
            ),
            None
        );
        let drop = q("00:00", "23:59:59", QuietMode::Drop, None);
        assert!(matches!(
            quiet(&drop, None, Priority::Normal, ms("2026-03-01T10:00:00Z")),
            Some(Verdict::Suppress {
                policy: "quiet_hours",
                ..
            })
        ));
        assert_eq!(parse_time("25:00"), None);
        assert_eq!(parse_time("7"), None);
    }
}
