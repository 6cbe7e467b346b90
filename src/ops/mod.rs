//! Operator commands: `check` (preflight), `setup` (publications), `status` (slot and
//! Redis progress for monitoring), `verify` (Redis and MQTT against SQL) and `drop-slot`
//! (clean uninstall).
//!
//! They share the daemon's configuration and connection code, print for a human (or one
//! JSON object for scripts), and never print passwords or row values.

pub mod check;
pub mod drop_slot;
pub mod filters;
pub mod setup;
pub mod status;
pub mod verify;

use crate::config::Config;
use crate::pg::PgConnectConfig;
use crate::pg::meta;
use std::time::Duration;
use tokio_postgres::Client;

/// The comment `setup` puts on the publications it creates; `drop-slot` drops only those.
pub const SETUP_COMMENT: &str = "created by skusync setup";

/// Publish actions a stock table needs (absolute rows: every change matters).
pub const STOCK_PUBLISH: &str = "insert, update, delete, truncate";

/// How long a connection attempt may take before the command gives up on that server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Open the ordinary SQL connection, with errors that name the config key.
pub async fn pg_client(cfg: &Config) -> Result<(Client, PgConnectConfig), String> {
    pg_client_or_why(cfg).await.map_err(|f| f.message)
}

/// Why the SQL connection could not be opened, for the advice `check` and `setup --print`
/// give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailureKind {
    /// The configured role does not exist (as the server says under trust or peer
    /// authentication).
    MissingRole,
    /// The server refused the password (under a password method it says the same for a
    /// role that does not exist).
    PasswordRefused,
    /// Any other refused login: `pg_hba.conf`, TLS, channel binding, `require_auth`.
    Auth,
    /// Unreachable, timed out, or a bad connection setting.
    Other,
}

/// A failed [`pg_client`]: the message (naming `postgres.url`) and its kind.
#[derive(Debug, Clone)]
pub struct ConnectFailure {
    /// One line for the operator, naming the config key; never a password.
    pub message: String,
    /// What kind of failure it was.
    pub kind: ConnectFailureKind,
}

/// [`pg_client`], telling a missing role and a refused login from other failures.
pub async fn pg_client_or_why(cfg: &Config) -> Result<(Client, PgConnectConfig), ConnectFailure> {
    let other = |message: String| ConnectFailure {
        message,
        kind: ConnectFailureKind::Other,
    };
    let pgc = cfg.pg_connect().map_err(|e| other(e.to_string()))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, meta::connect(&pgc)).await {
        Ok(Ok(c)) => Ok((c, pgc)),
        Ok(Err(e)) => {
            let kind = if e.is_missing_role() {
                ConnectFailureKind::MissingRole
            } else if e.is_password_refused() {
                ConnectFailureKind::PasswordRefused
            } else if matches!(e, crate::pg::PgError::Auth { .. }) {
                ConnectFailureKind::Auth
            } else {
                ConnectFailureKind::Other
            };
            Err(ConnectFailure {
                message: format!("postgres.url: {}", explain(&pgc, e).await),
                kind,
            })
        }
        Err(_) => Err(other(format!(
            "postgres.url: no connection to {} within {} s",
            pgc.addr(),
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// Every mapped table (`schema.table`): stock tables, the tables lookups read, activity
/// logs; each once, in config order. The role skusync logs in as must read them all.
pub fn mapped_tables(cfg: &Config) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let all = cfg
        .inventory
        .iter()
        .map(|m| m.table.clone())
        .chain(cfg.lookup_tables())
        .chain(cfg.activity.iter().map(|a| a.table.clone()));
    for t in all {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// The least-privilege role for skusync as SQL: `CREATE ROLE ... LOGIN REPLICATION`
/// (unless `exists`), schema `USAGE` and `SELECT` on every mapped table. One statement a
/// line, the password left for the DBA to fill in.
pub fn role_sql(cfg: &Config, role: &str, exists: bool) -> Vec<String> {
    let tables = mapped_tables(cfg);
    let mut schemas: Vec<&str> = tables.iter().map(|t| schema_of(t)).collect();
    schemas.sort_unstable();
    schemas.dedup();
    let mut out = Vec::new();
    if !exists {
        out.push(format!(
            "CREATE ROLE {} LOGIN REPLICATION PASSWORD '...';",
            ident(role)
        ));
    }
    for s in schemas {
        out.push(format!(
            "GRANT USAGE ON SCHEMA {} TO {};",
            ident(s),
            ident(role)
        ));
    }
    if !tables.is_empty() {
        out.push(format!(
            "GRANT SELECT ON {} TO {};",
            tables
                .iter()
                .map(|t| table_ident(t))
                .collect::<Vec<_>>()
                .join(", "),
            ident(role)
        ));
    }
    out
}

/// tokio-postgres reports a refused or unresolvable server as a bare "error connecting to
/// server"; probing the address once names the actual cause for the operator.
async fn explain(pgc: &PgConnectConfig, e: crate::pg::PgError) -> String {
    if !matches!(e, crate::pg::PgError::Sql(_)) {
        return e.to_string();
    }
    let probe = if pgc.is_unix_socket() {
        tokio::net::UnixStream::connect(pgc.socket_path())
            .await
            .map(|_| ())
    } else {
        tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect((pgc.host.as_str(), pgc.port)),
        )
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        .map(|_| ())
    };
    match probe {
        Err(io) => format!("cannot reach {}: {io}", pgc.addr()),
        Ok(()) => e.to_string(),
    }
}

/// Which publication `setup` puts each mapped table in, and with which actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubPlan {
    /// Publication name.
    pub name: String,
    /// Tables (`schema.table`) it should contain.
    pub tables: Vec<String>,
    /// `publish` option: all actions for stock tables, `insert` for activity logs.
    pub publish: &'static str,
}

/// The publications for the mapped tables: the first configured name gets the stock
/// tables; activity logs go into the second with inserts only, so the application's own
/// UPDATE/DELETE on them (retention jobs, often without a primary key) keep working.
pub fn plan_publications(cfg: &Config) -> Result<Vec<PubPlan>, String> {
    let names = cfg.postgres.publication.names();
    let mut plans = vec![PubPlan {
        name: names[0].clone(),
        // tables read by lookups are followed in every change, like stock tables
        tables: cfg
            .inventory
            .iter()
            .map(|m| m.table.clone())
            .chain(cfg.lookup_tables())
            .collect(),
        publish: STOCK_PUBLISH,
    }];
    match names.get(1) {
        Some(second) => plans.push(PubPlan {
            name: second.clone(),
            tables: cfg.activity.iter().map(|a| a.table.clone()).collect(),
            publish: "insert",
        }),
        None if !cfg.activity.is_empty() => {
            return Err(format!(
                "postgres.publication: activity tables need their own insert-only publication; \
                 add a second name, e.g. publication = [{:?}, \"{}_activity\"]",
                names[0], names[0]
            ));
        }
        None => {}
    }
    Ok(plans)
}

/// The `CREATE PUBLICATION` statement for a plan (with its marking comment).
pub fn create_publication_sql(p: &PubPlan) -> String {
    let tables = if p.tables.is_empty() {
        String::new()
    } else {
        format!(
            " FOR TABLE {}",
            p.tables
                .iter()
                .map(|t| table_ident(t))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "CREATE PUBLICATION {name}{tables} WITH (publish = '{publish}');\n\
         COMMENT ON PUBLICATION {name} IS '{SETUP_COMMENT}';",
        name = ident(&p.name),
        publish = p.publish,
    )
}

/// An identifier as SQL (the crate's one quoting rule, see [`crate::pg::ident`]).
pub use crate::pg::ident::quote_ident as ident;
/// A configured `schema.table` as SQL.
pub use crate::pg::ident::quote_table as table_ident;

/// The schema of a configured `schema.table`.
pub fn schema_of(t: &str) -> &str {
    t.split_once('.').map(|(s, _)| s).unwrap_or("public")
}

/// Unix milliseconds as RFC 3339 UTC (e.g. `2026-11-25T08:00:00.123Z`).
pub fn unix_ms_to_rfc3339(ms: i64) -> Option<String> {
    let micros = ms.checked_mul(1000)?.checked_sub(946_684_800_000_000)?;
    Some(crate::txn::value::pg_timestamp_to_rfc3339_millis(micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pubs: &str, activity: bool) -> Config {
        let mut t = format!(
            "[postgres]\nurl = \"postgresql://u@h/d\"\npublication = {pubs}\n\
             [[inventory]]\ntable = \"public.inventory\"\nsku = \"sku\"\non_hand = \"qty\"\n"
        );
        if activity {
            t.push_str(
                "[[activity]]\ntable = \"Shop.Log\"\nsku = \"sku\"\nkind = \"kind\"\n\
                 [activity.counters]\nview = \"views\"\n",
            );
        }
        Config::parse(&t).unwrap()
    }

    #[test]
    fn stock_and_activity_tables_go_into_separate_publications() {
        let p = plan_publications(&cfg("[\"a\", \"b\"]", true)).unwrap();
        assert_eq!(p[0].tables, vec!["public.inventory"]);
        assert_eq!(p[1].tables, vec!["Shop.Log"]);
        assert_eq!(
            create_publication_sql(&p[1]),
            "CREATE PUBLICATION b FOR TABLE \"Shop\".\"Log\" WITH (publish = 'insert');\n\
             COMMENT ON PUBLICATION b IS 'created by skusync setup';"
        );
    }

    #[test]
    fn activity_tables_need_a_second_publication() {
        let e = plan_publications(&cfg("\"a\"", true)).unwrap_err();
        assert!(e.contains("publication = [\"a\", \"a_activity\"]"), "{e}");
        assert_eq!(plan_publications(&cfg("\"a\"", false)).unwrap().len(), 1);
    }

    #[test]
    fn identifiers_are_quoted_only_when_needed() {
        assert_eq!(table_ident("public.inventory"), "public.inventory");
        assert_eq!(table_ident("public.order"), "public.\"order\"");
        assert_eq!(table_ident("union.case"), "\"union\".\"case\"");
        assert_eq!(
            create_publication_sql(&PubPlan {
                name: "desc".into(),
                tables: vec!["union.case".into()],
                publish: "insert",
            }),
            "CREATE PUBLICATION \"desc\" FOR TABLE \"union\".\"case\" WITH (publish = 'insert');\n\
             COMMENT ON PUBLICATION \"desc\" IS 'created by skusync setup';"
        );
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn unix_ms_formats_as_rfc3339() {
        assert_eq!(
            unix_ms_to_rfc3339(1_764_057_600_123).as_deref(),
            Some("2025-11-25T08:00:00.123Z")
        );
    }
}
