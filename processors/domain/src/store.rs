//! What a failed database call means, classified once by its SQLSTATE for every caller: the
//! API answers each class with one error (never the database's own text, which can name
//! tables, columns and values), and the log keeps the whole text.
//!
//! - **Transient**: the database is away, busy or restarting, a statement timed out, a
//!   transaction lost a serialization race or a deadlock — the same call later may succeed.
//! - **Conflict**: the call contradicts what is stored (a unique or foreign key) — the same call
//!   will fail again until the data changes.
//! - **Invalid**: a value the database cannot take (a NUL in text, a number out of range) —
//!   from the caller's input; the same input fails again.
//! - **Permanent**: anything else — a statement the schema does not know, a violated check — a
//!   bug; retrying does not help.

use herald_core::db::PoolFailure;

/// The class of a failed database call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Transient,
    Conflict,
    Invalid,
    Permanent,
}

/// A failed database call and its class. Displays the class only; [`StoreError::detail`] is
/// the database's text, for logs.
#[derive(Debug, thiserror::Error)]
#[error("{}", .class.describe())]
pub struct StoreError {
    pub class: Class,
    source: PoolFailure,
}

impl Class {
    /// The class of a SQLSTATE (`None`: no answer from the server — a connection lost, a pool
    /// that gave up waiting — which is transient).
    pub fn of(sqlstate: Option<&str>) -> Class {
        let Some(code) = sqlstate else {
            return Class::Transient;
        };
        match (code, code.get(..2).unwrap_or("")) {
            // lock not available (NOWAIT)
            ("55P03", _) => Class::Transient,
            // connection, insufficient resources, operator intervention (shutdown, statement
            // timeout), system error, transaction rollback (serialization, deadlock)
            (_, "08" | "53" | "57" | "58" | "40") => Class::Transient,
            // unique and foreign key violations (not-null and check violations are bugs)
            ("23505" | "23503", _) => Class::Conflict,
            // data exception
            (_, "22") => Class::Invalid,
            _ => Class::Permanent,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Class::Transient => "the database is unavailable; try again",
            Class::Conflict => "the change conflicts with what is stored",
            Class::Invalid => "a value in the request cannot be stored or searched for",
            Class::Permanent => "the database refused the request",
        }
    }
}

impl StoreError {
    /// The database's own text (logs only).
    pub fn detail(&self) -> String {
        self.source.to_string()
    }
}

impl From<PoolFailure> for StoreError {
    fn from(source: PoolFailure) -> Self {
        let class = match &source {
            PoolFailure::Postgres(e) => Class::of(e.code().map(|c| c.code())),
            PoolFailure::Pool(_) => Class::Transient,
        };
        StoreError { class, source }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        PoolFailure::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_fall_into_their_class() {
        for (code, class) in [
            (None, Class::Transient),
            (Some("08006"), Class::Transient), // connection failure
            (Some("57P01"), Class::Transient), // admin shutdown
            (Some("57014"), Class::Transient), // statement timeout
            (Some("53300"), Class::Transient), // too many connections
            (Some("40001"), Class::Transient), // serialization failure
            (Some("40P01"), Class::Transient), // deadlock
            (Some("23505"), Class::Conflict),  // unique violation
            (Some("23503"), Class::Conflict),  // foreign key
            (Some("23502"), Class::Permanent), // not null
            (Some("23514"), Class::Permanent), // check
            (Some("55P03"), Class::Transient), // lock not available
            (Some("22021"), Class::Invalid),   // a NUL in text
            (Some("22P02"), Class::Invalid),   // invalid text representation
            (Some("42P01"), Class::Permanent), // undefined table
            (Some(""), Class::Permanent),
        ] {
            assert_eq!(Class::of(code), class, "{code:?}");
        }
    }

    #[test]
    fn the_display_never_carries_the_database_text() {
        let e: StoreError = PoolFailure::Pool("secret table name users_pii".into()).into();
        assert_eq!(e.class, Class::Transient);
        assert!(!e.to_string().contains("users_pii"), "{e}");
        assert!(e.detail().contains("users_pii"));
    }
}
