//! Opt-outs (`opt_outs`): a recipient who gets nothing more on a channel from an app. Set and
//! cleared through the API (`PUT`/`DELETE /v1/opt-outs/{channel}/{address}`) and the console,
//! read by the route stage's policies (the message is `suppressed`, policy `opt_out`). This
//! module owns the table.
//!
//! Addresses are kept in their normalised form ([`address`]): an opt-out of `13800138000`
//! holds for `+8613800138000`, one of `Ann@Example.com` for `ann@example.com`. Rows written
//! before normalisation hold the address as written, so a lookup asks for both forms.

use std::collections::HashSet;

use tokio_postgres::GenericClient;

/// The form an opt-out of `raw` on `channel` is kept and looked up in: its normalised form
/// ([`crate::destination::normalise`]), or as written (trimmed) when it has none — an address
/// the gateway takes can always be opted out. Refused only when it is no address of the
/// channel at all ([`crate::validate::address`]).
pub fn address(
    channel: herald_schemas::Channel,
    raw: &str,
    region: crate::destination::Region,
) -> Result<String, crate::validate::Problem> {
    crate::validate::address(channel, raw).map_err(|p| crate::validate::Problem {
        field: "address".into(),
        ..p
    })?;
    Ok(
        crate::destination::normalise(channel, raw, region, "address")
            .unwrap_or_else(|_| raw.trim().to_owned()),
    )
}

/// Opts `address` (in the form [`address`] gives) out of `channel` for `app` (`opted_out`), or
/// back in. Opting back in clears every row that means this address: each of its `spellings`
/// ([`crate::destination::spellings`]), and for e-mail any case of it — rows stored before
/// normalisation included.
pub async fn set(
    db: &impl GenericClient,
    app: &str,
    channel: &str,
    address: &str,
    spellings: &[String],
    opted_out: bool,
) -> Result<(), tokio_postgres::Error> {
    if opted_out {
        db.execute(
            "INSERT INTO opt_outs (app_id, channel, address) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&app, &channel, &address],
        )
        .await?;
    } else {
        let email = (channel == herald_schemas::Channel::Email.as_str()).then_some(address);
        db.execute(
            "DELETE FROM opt_outs WHERE app_id = $1 AND channel = $2
               AND (address = $3 OR address = ANY($4) OR lower(address) = $5)",
            &[&app, &channel, &address, &spellings, &email],
        )
        .await?;
    }
    Ok(())
}

/// Which of these (app, channel, address) are opted out, in one statement.
pub async fn opted_out(
    db: &impl GenericClient,
    keys: &[(&str, &str, &str)],
) -> Result<HashSet<(String, String, String)>, tokio_postgres::Error> {
    let (apps, chans, addrs): (Vec<&str>, Vec<&str>, Vec<&str>) =
        keys.iter()
            .fold((vec![], vec![], vec![]), |mut acc, (a, c, d)| {
                acc.0.push(*a);
                acc.1.push(*c);
                acc.2.push(*d);
                acc
            });
    Ok(db
        .query(
            "SELECT o.app_id, o.channel, o.address FROM opt_outs o
             JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS q(a, c, d)
               ON o.app_id = q.a AND o.channel = q.c AND o.address = q.d",
            &[&apps, &chans, &addrs],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}
