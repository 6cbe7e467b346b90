//! The ordinary SQL connection (tokio-postgres) beside the replication connection: slot
//! state, server settings, and later snapshots. Same URL, same TLS rules.

use super::connstr::{PgConnectConfig, SslMode};
use super::error::PgError;
use super::tls;
use crate::lsn::Lsn;
use tokio_postgres::Client;

/// Open an ordinary SQL connection; its driver task runs in the background.
pub async fn connect(cfg: &PgConnectConfig) -> Result<Client, PgError> {
    let pg = cfg.to_tokio_postgres();
    let sql_err = |e: tokio_postgres::Error| classify(e, cfg);
    match tls::client_config(cfg)? {
        Some(tls_config) if cfg.sslmode != SslMode::Disable => {
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_config).clone());
            let (client, conn) = pg.connect(connector).await.map_err(sql_err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        }
        _ => {
            let (client, conn) = pg.connect(tokio_postgres::NoTls).await.map_err(sql_err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        }
    }
}

/// Map a tokio-postgres error, keeping SQLSTATE-based classification.
pub fn classify(e: tokio_postgres::Error, cfg: &PgConnectConfig) -> PgError {
    if let Some(db) = e.as_db_error() {
        let s = super::error::ServerError {
            severity: db.severity().to_string(),
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
        };
        if s.code.starts_with("28") {
            return PgError::Auth {
                user: cfg.user.clone(),
                reason: s.message,
            };
        }
        return PgError::Server(s);
    }
    PgError::Sql(format!("{} ({})", e, cfg.addr()))
}

/// A row of `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub slot_name: String,
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub temporary: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// Look up a slot by name.
pub async fn slot_state(
    client: &Client,
    cfg: &PgConnectConfig,
    slot: &str,
) -> Result<Option<SlotState>, PgError> {
    let row = client
        .query_opt(
            "SELECT slot_name::text, plugin::text, database::text, temporary, active_pid, \
                    confirmed_flush_lsn::text, restart_lsn::text, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| classify(e, cfg))?;
    Ok(row.map(|r| {
        let lsn = |i: usize| r.get::<_, Option<String>>(i).and_then(|s| s.parse().ok());
        SlotState {
            slot_name: r.get(0),
            plugin: r.get(1),
            database: r.get(2),
            temporary: r.get(3),
            active_pid: r.get(4),
            confirmed_flush_lsn: lsn(5),
            restart_lsn: lsn(6),
            wal_status: r.get(7),
        }
    }))
}

/// `wal_sender_timeout` in milliseconds (0 = disabled). Read on the ordinary connection
/// because some managed services refuse SHOW on replication connections.
pub async fn wal_sender_timeout_ms(client: &Client, cfg: &PgConnectConfig) -> Result<u64, PgError> {
    let row = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(|e| classify(e, cfg))?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}
