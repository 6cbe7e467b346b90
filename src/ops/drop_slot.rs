//! `skusync drop-slot`: uninstall from the database, so an abandoned install never retains
//! WAL: drop the slot (terminating a walsender that holds it) and the publications that
//! `skusync setup` created (recognised by their comment). Idempotent.

use super::{SETUP_COMMENT, ident};
use crate::config::Config;
use crate::pg::meta;
use std::io::Write;
use std::time::Duration;

/// How often to try dropping a slot that a (terminating) walsender still holds.
const DROP_ATTEMPTS: usize = 20;

/// Drop the slot and skusync's publications; prints one line per action to `out`.
pub async fn run(cfg: &Config, out: &mut impl Write) -> Result<(), String> {
    let (client, pgc) = super::pg_client(cfg).await?;
    let slot = &cfg.postgres.slot;
    let q = |e: tokio_postgres::Error| meta::classify(e, &pgc);
    for attempt in 0..DROP_ATTEMPTS {
        let Some(state) = meta::slot_state(&client, &pgc, slot)
            .await
            .map_err(|e| e.to_string())?
        else {
            if attempt == 0 {
                let _ = writeln!(
                    out,
                    "replication slot {slot} does not exist: nothing to drop"
                );
            }
            break;
        };
        if let Some(pid) = state.active_pid {
            // the holder gets a moment to exit before the next attempt
            let killed: bool = client
                .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(|e| q(e).to_string())?
                .get(0);
            let _ = writeln!(
                out,
                "{} walsender pid {pid} holding slot {slot}",
                if killed {
                    "terminated"
                } else {
                    "could not terminate"
                }
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
        {
            Ok(_) => {
                let _ = writeln!(out, "dropped replication slot {slot}");
                break;
            }
            Err(e) => {
                let e = q(e);
                match e.sqlstate() {
                    // in use (a walsender still exits, or a standby skusync took it over)
                    Some("55006") if attempt + 1 < DROP_ATTEMPTS => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    // dropped concurrently
                    Some("42704") => {
                        let _ = writeln!(out, "replication slot {slot} is already gone");
                        break;
                    }
                    _ => return Err(format!("dropping replication slot {slot}: {e}")),
                }
            }
        }
    }
    for name in cfg.postgres.publication.names() {
        let row = client
            .query_opt(
                "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
                &[&name],
            )
            .await
            .map_err(|e| q(e).to_string())?;
        match row {
            None => {
                let _ = writeln!(out, "publication {name} does not exist");
            }
            Some(r) if r.get::<_, Option<String>>(0).as_deref() == Some(SETUP_COMMENT) => {
                client
                    .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", ident(&name)))
                    .await
                    .map_err(|e| format!("dropping publication {name}: {}", q(e)))?;
                let _ = writeln!(out, "dropped publication {name} (created by skusync setup)");
            }
            Some(_) => {
                let _ = writeln!(
                    out,
                    "kept publication {name} (not created by skusync setup; drop it yourself if unused)"
                );
            }
        }
    }
    Ok(())
}
