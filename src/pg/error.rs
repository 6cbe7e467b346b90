//! Errors of the PostgreSQL side, split into transient (back off, reconnect) and
//! definite (stop and tell the operator).

use std::fmt;

/// A server `ErrorResponse`, with the fields an operator needs. Never contains row data:
/// PostgreSQL's messages for the commands skusync sends do not quote table contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL`, `PANIC`.
    pub severity: String,
    /// Five-character SQLSTATE.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Errors talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Connection refused, reset, closed, timed out.
    #[error("connection to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    /// The TLS handshake or certificate verification failed.
    #[error("TLS with {addr}: {reason}")]
    Tls { addr: String, reason: String },
    /// The server refused the credentials or the auth method is unsupported.
    #[error("authentication as {user:?} failed: {reason}")]
    Auth { user: String, reason: String },
    /// The server sent an ErrorResponse.
    #[error("server error: {0}")]
    Server(ServerError),
    /// The server sent something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A frame larger than the configured cap.
    #[error("server frame of {len} bytes exceeds the {max}-byte cap")]
    FrameTooLarge { len: usize, max: usize },
    /// A connection setting is invalid (names the setting).
    #[error("{0}")]
    Config(String),
    /// A failure from the ordinary (non-replication) SQL connection.
    #[error("SQL connection: {0}")]
    Sql(String),
}

impl PgError {
    /// Whether retrying (after a back-off) can help. Definite errors need the operator.
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Io { .. } | PgError::Protocol(_) => true,
            // The same WAL replays the same message after a reconnect.
            PgError::FrameTooLarge { .. } => false,
            PgError::Tls { .. } | PgError::Auth { .. } | PgError::Config(_) => false,
            PgError::Sql(_) => true,
            PgError::Server(e) => server_error_is_transient(e),
        }
    }

    /// The SQLSTATE, when the server reported one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Server(e) => Some(&e.code),
            _ => None,
        }
    }

    /// True when the server refused the login because the role does not exist. Servers
    /// say so under `trust` and `peer` authentication; under a password method they report
    /// a failed password instead, so as not to reveal which roles exist.
    pub fn is_missing_role(&self) -> bool {
        matches!(self, PgError::Auth { reason, .. }
            if reason.starts_with("role \"") && reason.ends_with("\" does not exist"))
    }

    /// True when the server refused the password. Under a password method a role that
    /// does not exist is refused the same way.
    pub fn is_password_refused(&self) -> bool {
        matches!(self, PgError::Auth { reason, .. }
            if reason.starts_with("password authentication failed"))
    }

    /// True when the slot is being streamed by another connection (SQLSTATE 55006):
    /// a second instance waits as a standby instead of failing.
    pub fn is_slot_in_use(&self) -> bool {
        self.sqlstate() == Some("55006")
    }
}

fn server_error_is_transient(e: &ServerError) -> bool {
    let class = e.code.get(..2).unwrap_or("");
    match e.code.as_str() {
        // object_in_use: slot active for another PID; wait and retry (standby).
        "55006" => true,
        // cannot_connect_now (starting up / shutting down), admin_shutdown, crash_shutdown.
        "57P01" | "57P02" | "57P03" => true,
        // too_many_connections.
        "53300" => true,
        // object_not_in_prerequisite_state: slot invalidated / wal removed: operator.
        "55000" => false,
        _ => matches!(class, "08" | "40" | "53" | "58"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> PgError {
        PgError::Server(ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        })
    }

    #[test]
    fn classifies_server_errors() {
        assert!(server("55006").is_transient());
        assert!(server("55006").is_slot_in_use());
        assert!(server("57P01").is_transient());
        assert!(server("08006").is_transient());
        assert!(!server("42704").is_transient()); // slot or publication missing
        assert!(!server("28P01").is_transient()); // bad password
        assert!(!server("55000").is_transient()); // slot invalidated
        assert!(!server("42501").is_transient()); // permission denied
    }

    #[test]
    fn a_missing_role_is_told_from_a_failed_password() {
        let auth = |reason: &str| PgError::Auth {
            user: "app".into(),
            reason: reason.into(),
        };
        assert!(auth("role \"app\" does not exist").is_missing_role());
        assert!(!auth("password authentication failed for user \"app\"").is_missing_role());
        assert!(auth("password authentication failed for user \"app\"").is_password_refused());
        assert!(!auth("role \"app\" does not exist").is_password_refused());
        assert!(!server("28000").is_missing_role());
    }
}
