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

/// The form an opt-out of `raw` on `channel` is kept and looked up in
/// ([`crate::destination::normalise`]), or why `raw` is no address of that channel.
pub fn address(
    channel: herald_schemas::Channel,
    raw: &str,
    region: crate::destination::Region,
) -> Result<String, crate::validate::Problem> {
    crate::destination::normalise(channel, raw, region, "address")
}

/// Opts `address` (in the form [`address`] gives) out of `channel` for `app` (`opted_out`), or
/// back in; clearing also clears the form it was written in before normalisation.
pub async fn set(
    db: &impl GenericClient,
    app: &str,
    channel: &str,
    address: &str,
    as_written: &str,
    opted_out: bool,
) -> Result<(), tokio_postgres::Error> {
    if opted_out {
        db.execute(
            "INSERT INTO opt_outs (app_id, channel, address) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&app, &channel, &address],
        )
        .await?;
    } else {
        db.execute(
            "DELETE FROM opt_outs WHERE app_id = $1 AND channel = $2 AND address IN ($3, $4)",
            &[&app, &channel, &address, &as_written],
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
