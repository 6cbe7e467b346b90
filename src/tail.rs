//! `skusync tail`: print each decoded change as one JSON line, for DBAs and mobile
//! developers to see what skusync sees. Reads a temporary slot (nothing retained after
//! exit) or, with `--from-slot`, the configured slot without confirming anything.

use crate::config::Config;
use crate::pgoutput::{Datum, Tuple};
use crate::secret::Secret;
use crate::source::{SlotKind, Source, SourceConfig, SourceError, SourceEvent};
use crate::txn::{Event, TxnBegin, pg_timestamp_to_rfc3339_millis};
use serde_json::{Value as Json, json};
use std::io::Write;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Options of `tail`.
#[derive(Debug, Clone, Default)]
pub struct TailOptions {
    /// Read the configured slot without acknowledging instead of a temporary slot.
    pub from_slot: bool,
    /// Print mapped user columns as they are; by default they show as the HMAC skusync
    /// counts, so a shared terminal or a pasted log carries no user ids.
    pub raw: bool,
}

/// The mapped user column of each activity table with its HMAC key, when one is set:
/// table -> (column, key).
type UserColumns = std::collections::HashMap<String, (String, Option<Secret<Vec<u8>>>)>;

/// What `tail` prints for a user column when no HMAC key is set: never the user id itself.
pub const HIDDEN_USER: &str = "<hidden: no HMAC key set>";

fn user_columns(cfg: &Config) -> Result<UserColumns, SourceError> {
    let mut out = UserColumns::new();
    for (i, a) in cfg.activity.iter().enumerate() {
        let key = cfg
            .user_key_if_set(i)
            .map_err(|e| SourceError::Pg(crate::pg::PgError::Config(e.0)))?;
        if let Some(col) = &a.user {
            if key.is_none() {
                tracing::warn!(
                    "activity[{i}].user: no HMAC key is set, so {}.{col} prints as {HIDDEN_USER:?} \
                     (set SKUSYNC_USER_KEY to see the HMAC skusync counts, or pass --raw)",
                    a.table
                );
            }
            out.insert(a.table.clone(), (col.clone(), key));
        }
    }
    Ok(out)
}

/// Replace the user column of `tuple_json` (a `new` or `old` object) by the HMAC of its
/// text form, as the fold computes it, or by [`HIDDEN_USER`] without a key; NULL and
/// unchanged values stay as they are.
fn hide_user(
    tuple_json: &mut Json,
    tuple: Option<&Tuple>,
    index: usize,
    col: &str,
    key: Option<&[u8]>,
) {
    let Json::Object(m) = tuple_json else {
        return;
    };
    let Some(v) = m.get_mut(col) else {
        return;
    };
    *v = match tuple.and_then(|t| t.get(index)) {
        Some(Datum::Text(_)) | Some(Datum::Binary(_)) if key.is_none() => {
            Json::String(HIDDEN_USER.into())
        }
        Some(Datum::Text(b)) => match (std::str::from_utf8(b), key) {
            (Ok(s), Some(key)) => Json::String(crate::fold::hmac_user(key, s).to_string()),
            _ => Json::String("<not UTF-8>".into()),
        },
        Some(Datum::Binary(_)) => Json::String("<binary>".into()),
        Some(Datum::Null) | Some(Datum::UnchangedToast) | None => return,
    };
}

/// Run `tail` until `shutdown` fires or the stream fails; writes JSON lines to `out`.
pub async fn run(
    cfg: &Config,
    opts: &TailOptions,
    out: &mut (dyn Write + Send),
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    let conn = cfg
        .pg_connect()
        .map_err(|e| SourceError::Pg(crate::pg::PgError::Config(e.0)))?;
    let users = if opts.raw {
        UserColumns::new()
    } else {
        user_columns(cfg)?
    };
    let mut sc = SourceConfig::new(conn, &cfg.postgres.slot, cfg.postgres.publication.names());
    sc.proto_version = cfg.postgres.proto_version;
    sc.status_interval = cfg.status_interval();
    if opts.from_slot {
        sc.confirm = false;
    } else {
        sc.slot_kind = SlotKind::Temporary;
        sc.slot = format!("skusync_tail_{}", std::process::id());
    }
    let source = Source::new(sc);
    let progress = source.progress();
    let (tx, mut rx) = mpsc::channel(16);
    let src_shutdown = shutdown.clone();
    let reader = tokio::spawn(source.run(tx, src_shutdown));
    let mut begin: Option<TxnBegin> = None;
    let mut write_failed = false;
    while let Some(batch) = rx.recv().await {
        for ev in batch {
            match ev {
                SourceEvent::Connected(_) => {}
                SourceEvent::Reset => begin = None,
                SourceEvent::Event(Event::Begin(b)) => begin = Some(b),
                SourceEvent::Event(Event::Change(c)) => {
                    let mut line = json!({
                        "lsn": c.commit_lsn.to_string(),
                        "commit_ts": begin.as_ref().map(|b| pg_timestamp_to_rfc3339_millis(b.commit_ts)),
                        "xid": begin.as_ref().map(|b| b.xid),
                        "op": c.op.as_str(),
                        "table": c.rel.qualified_name(),
                    });
                    match c.to_json() {
                        Ok(Json::Object(m)) => {
                            for (k, v) in m {
                                line[k] = v;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => line["error"] = Json::String(e.to_string()),
                    }
                    if let Some((col, key)) = users.get(&c.rel.qualified_name())
                        && let Some(i) = c.rel.column_index(col)
                    {
                        let key = key.as_ref().map(|k| k.expose().as_slice());
                        hide_user(&mut line["new"], c.new.as_ref(), i, col, key);
                        let old = c.old.as_ref().map(|(_, t)| t);
                        hide_user(&mut line["old"], old, i, col, key);
                    }
                    write_failed |= writeln!(out, "{line}").is_err();
                }
                SourceEvent::Event(Event::Truncate(t)) => {
                    let line = json!({
                        "lsn": t.commit_lsn.to_string(),
                        "commit_ts": begin.as_ref().map(|b| pg_timestamp_to_rfc3339_millis(b.commit_ts)),
                        "xid": begin.as_ref().map(|b| b.xid),
                        "op": "truncate",
                        "tables": t.rels.iter().map(|r| r.qualified_name()).collect::<Vec<_>>(),
                    });
                    write_failed |= writeln!(out, "{line}").is_err();
                }
                SourceEvent::Event(_) => {}
                SourceEvent::Commit(_, ticket) => {
                    begin = None;
                    write_failed |= out.flush().is_err();
                    progress.durable(ticket);
                }
            }
        }
        if write_failed {
            // The reader went away (e.g. `| head`): stop quietly.
            shutdown.cancel();
            break;
        }
    }
    drop(rx);
    match reader.await {
        Ok(r) => r,
        Err(e) => Err(SourceError::Pg(crate::pg::PgError::Protocol(format!(
            "reader task: {e}"
        )))),
    }
}
