//! Keeping secrets and untrusted row values out of logs: [`Secret`] never prints its
//! value, [`redact_url`] keeps only a URL's scheme, host and port, [`log_value`] escapes
//! and shortens a row value (a SKU) for a log line or an error message, and
//! [`read_credential`] reads a systemd credential (`LoadCredential=`).

use std::fmt;
use std::path::Path;

/// A value that must never reach a log line: its `Debug` prints `<redacted>`. It has no
/// `Display` and no `Serialize`; use [`Secret::expose`] where the value is really needed.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wrap `value`.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret value itself.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Secret<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Secret)
    }
}

/// `url` with only its scheme, host and port (`redis://10.0.0.5:6379`): no user, password,
/// path or query. `<unparsable URL>` when it is not a URL (the text itself may be a secret).
pub fn redact_url(url: &str) -> String {
    let Ok(u) = url::Url::parse(url) else {
        return "<unparsable URL>".into();
    };
    let mut out = format!("{}://{}", u.scheme(), u.host_str().unwrap_or(""));
    if let Some(p) = u.port() {
        out.push_str(&format!(":{p}"));
    }
    if u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password") {
        out.push_str(" (password redacted)");
    }
    out
}

/// Most characters of a row value in a log line or error message (after escaping).
pub const LOG_VALUE_CHARS: usize = 64;

/// A row value (SKU, location, key) made safe for a log line or an error message: control
/// characters, newlines, quotes and backslashes escaped as in Rust (`\n`, `\u{1b}`, `\"`)
/// so the value cannot start a forged line or send terminal escapes, and cut to
/// [`LOG_VALUE_CHARS`] characters followed by `…`.
pub fn log_value(value: &str) -> LogValue<'_> {
    LogValue(value)
}

/// See [`log_value`].
#[derive(Clone, Copy)]
pub struct LogValue<'a>(&'a str);

impl fmt::Display for LogValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        let mut n = 0;
        for c in self.0.chars() {
            let esc = c.escape_debug();
            let len = esc.len();
            if n + len > LOG_VALUE_CHARS {
                return f.write_char('…');
            }
            n += len;
            for e in esc {
                f.write_char(e)?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for LogValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// File names of the systemd credentials skusync reads from `$CREDENTIALS_DIRECTORY`.
pub mod credential {
    /// Password for `postgres.url` (when the URL has none).
    pub const PG_PASSWORD: &str = "pg-password";
    /// Password for `redis.url` (when the URL has none).
    pub const REDIS_PASSWORD: &str = "redis-password";
    /// Password for `mqtt.url` (when the URL has none).
    pub const MQTT_PASSWORD: &str = "mqtt-password";
    /// HMAC key for mapped user columns (when no `activity.user_key` is set).
    pub const USER_KEY: &str = "user-key";
}

/// The file's mode when others than its owner may read or write it: any access by
/// others, or by the group unless the file is root's and the group may only read (0640,
/// the rule PostgreSQL applies to its server key: root keeps the file, the service's
/// group reads it).
pub fn readable_by_others(meta: &std::fs::Metadata) -> Option<u32> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = meta.permissions().mode() & 0o7777;
    let allowed = if meta.uid() == 0 { 0o040 } else { 0 };
    (mode & 0o077 & !allowed != 0).then_some(mode)
}

/// Read a key file (`what` names its setting in errors): refused when group or others
/// can read it (see [`readable_by_others`]), since a key others can read is no secret
/// (as libpq refuses such a `passfile`). The content is trimmed; errors never include it.
pub fn read_key_file(path: &Path, what: &str) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if let Some(m) = readable_by_others(&meta) {
        return Err(format!(
            "{what} {p}: the file can be read by group or others (mode {m:04o}), so the key in \
             it is not secret; run `chmod 600 {p}` (as the user skusync runs as; 640 when root \
             owns it)",
            p = path.display(),
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    Ok(text.trim().to_string())
}

/// Read credential `name` from `dir` (systemd's `$CREDENTIALS_DIRECTORY`): `None` when the
/// file does not exist. One trailing newline is removed (`echo secret > file` works);
/// an empty or non-UTF-8 file is an error naming the credential, never its content.
pub fn read_credential(dir: &Path, name: &str) -> Result<Option<Secret<String>>, String> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("credential {name} ({}): {e}", path.display())),
    };
    let mut text = String::from_utf8(bytes)
        .map_err(|_| format!("credential {name} ({}): not UTF-8 text", path.display()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(format!("credential {name} ({}): empty", path.display()));
    }
    Ok(Some(Secret(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_others_can_read_is_refused_without_showing_the_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "s3cret-key-0123456789abcdef0123456789\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_key_file(&p, "api.token_key_file").unwrap_err();
        assert!(
            e.contains("api.token_key_file") && e.contains("chmod 600"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_key_file(&p, "api.token_key_file").unwrap(),
            "s3cret-key-0123456789abcdef0123456789"
        );
    }

    #[test]
    fn a_secret_never_shows_in_debug() {
        let s = Secret::new("hunter2".to_string());
        assert_eq!(format!("{s:?}"), "\"<redacted>\"");
        assert_eq!(format!("{:?}", Some(&s)), "Some(\"<redacted>\")");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn a_redacted_url_keeps_scheme_host_and_port_only() {
        assert_eq!(
            redact_url("postgresql://skusync:pw@db.example:5433/inv?sslmode=require"),
            "postgresql://db.example:5433 (password redacted)"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("postgresql://u@h/d?password=pw"),
            "postgresql://h (password redacted)"
        );
        assert_eq!(redact_url("not a url pw"), "<unparsable URL>");
        for u in ["mqtt://u:s3cret@b:1883", "postgresql://h/d?password=s3cret"] {
            assert!(!redact_url(u).contains("s3cret"), "{u}");
        }
    }

    #[test]
    fn a_log_value_escapes_newlines_quotes_and_terminal_escapes() {
        let v = "A\n2026-01-01T00:00:00Z ERROR forged \x1b[2J\"q\"\\\r\u{202e}";
        let s = log_value(v).to_string();
        assert!(!s.chars().any(|c| c.is_control()), "{s}");
        assert_eq!(
            s,
            "A\\n2026-01-01T00:00:00Z ERROR forged \\u{1b}[2J\\\"q\\\"\\\\\\r\\u{202e}"
        );
        assert_eq!(log_value("SKU-1").to_string(), "SKU-1");
        assert_eq!(format!("{:?}", log_value("a\"b")), "\"a\\\"b\"");
    }

    #[test]
    fn a_log_value_is_cut_to_64_characters() {
        let long = "x".repeat(100);
        let s = log_value(&long).to_string();
        assert_eq!(s, format!("{}…", "x".repeat(64)));
        assert_eq!(log_value(&"x".repeat(64)).to_string(), "x".repeat(64));
        // an escape is never cut in half
        let s = log_value(&format!("{}\n", "x".repeat(63))).to_string();
        assert_eq!(s, format!("{}…", "x".repeat(63)));
        let s = log_value(&"\u{0}".repeat(40)).to_string();
        assert!(
            s.chars().count() <= LOG_VALUE_CHARS + 1 && s.ends_with('…'),
            "{s}"
        );
    }

    #[test]
    fn a_credential_loses_one_trailing_newline_and_must_not_be_empty() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "pw\n").unwrap();
        std::fs::write(d.path().join("b"), "pw with spaces \r\n").unwrap();
        std::fs::write(d.path().join("c"), "\n").unwrap();
        std::fs::write(d.path().join("d"), [0xff, 0xfe]).unwrap();
        let read = |n| read_credential(d.path(), n);
        assert_eq!(read("a").unwrap().unwrap().expose(), "pw");
        assert_eq!(read("b").unwrap().unwrap().expose(), "pw with spaces ");
        assert!(read("c").unwrap_err().contains("credential c"));
        assert!(read("d").unwrap_err().contains("not UTF-8"));
        assert!(read("missing").unwrap().is_none());
    }
}
