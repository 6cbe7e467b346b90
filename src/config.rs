//! The TOML configuration. Every key is documented here and in the README; unknown keys
//! are errors, and every error names the key.

use crate::pg::connstr::PgConnectConfig;
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

/// A configuration error, already phrased for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[postgres]`: the source database.
    pub postgres: PostgresConfig,
}

/// `[postgres]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgresql://user[:password]@host[:port]/db?sslmode=...`. The password may instead
    /// come from `SKUSYNC_PG_PASSWORD`, `PGPASSWORD` or a passfile.
    pub url: String,
    /// Logical replication slot name (`[a-z0-9_]`, at most 63 characters).
    #[serde(default = "default_name")]
    pub slot: String,
    /// Publication name, or a list of them.
    #[serde(default = "default_publications")]
    pub publication: Publications,
    /// pgoutput protocol version to request (1-4). 1 works on every supported server.
    #[serde(default = "default_proto")]
    pub proto_version: u32,
    /// How often to send a standby status update (confirmed LSN) to the server.
    #[serde(default = "default_status_ms")]
    pub status_interval_ms: u64,
}

/// One publication or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Publications {
    One(String),
    Many(Vec<String>),
}

impl Publications {
    /// As a list.
    pub fn names(&self) -> Vec<String> {
        match self {
            Publications::One(s) => vec![s.clone()],
            Publications::Many(v) => v.clone(),
        }
    }
}

fn default_name() -> String {
    "skusync".into()
}
fn default_publications() -> Publications {
    Publications::One("skusync".into())
}
fn default_proto() -> u32 {
    1
}
fn default_status_ms() -> u64 {
    1000
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        Self::parse(&text)
            .map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.0)))
    }

    /// Parse and validate config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError(e.to_string().trim_end().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.postgres;
        self.pg_connect()?;
        if p.slot.is_empty()
            || p.slot.len() > 63
            || !p
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(ConfigError(format!(
                "postgres.slot: {:?} is not a valid slot name (lower-case letters, digits and _, at most 63)",
                p.slot
            )));
        }
        let pubs = p.publication.names();
        if pubs.is_empty() || pubs.iter().any(|s| s.is_empty() || s.len() > 63) {
            return Err(ConfigError(
                "postgres.publication: give one or more publication names (at most 63 bytes each)"
                    .into(),
            ));
        }
        if !(1..=4).contains(&p.proto_version) {
            return Err(ConfigError(format!(
                "postgres.proto_version: {} is not a pgoutput protocol version (1-4)",
                p.proto_version
            )));
        }
        if !(100..=60_000).contains(&p.status_interval_ms) {
            return Err(ConfigError(
                "postgres.status_interval_ms: must be between 100 and 60000".into(),
            ));
        }
        Ok(())
    }

    /// Connection settings for the source database. `SKUSYNC_PG_PASSWORD` fills in a
    /// password missing from the URL.
    pub fn pg_connect(&self) -> Result<PgConnectConfig, ConfigError> {
        let mut c = PgConnectConfig::from_url(&self.postgres.url)
            .map_err(|e| ConfigError(e.to_string()))?;
        if let Ok(pw) = std::env::var("SKUSYNC_PG_PASSWORD")
            && url_has_no_password(&self.postgres.url)
        {
            c.password = Some(crate::pg::connstr::Password::new(pw));
        }
        Ok(c)
    }

    /// The status update interval.
    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.postgres.status_interval_ms)
    }
}

fn url_has_no_password(url: &str) -> bool {
    url::Url::parse(url)
        .map(|u| u.password().is_none())
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse("[postgres]\nurl = \"postgresql://u@127.0.0.1/ims\"\n").unwrap();
        assert_eq!(c.postgres.slot, "skusync");
        assert_eq!(c.postgres.publication.names(), vec!["skusync"]);
        assert_eq!(c.postgres.proto_version, 1);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "[postgres]\nurl = \"postgresql://u@h/d\"\nslott = \"x\"\n",
                "slott",
            ),
            (
                "[postgres]\nurl = \"postgresql://u@h/d\"\nslot = \"Bad-Name\"\n",
                "postgres.slot",
            ),
            ("[postgres]\nurl = \"mysql://u@h/d\"\n", "postgres.url"),
            (
                "[postgres]\nurl = \"postgresql://u@h/d\"\nproto_version = 9\n",
                "postgres.proto_version",
            ),
            ("[postgres]\n", "url"),
            (
                "[postgres]\nurl = \"postgresql://u@h/d\"\n[bogus]\n",
                "bogus",
            ),
        ];
        for (text, key) in cases {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn publication_may_be_a_list() {
        let c = Config::parse(
            "[postgres]\nurl = \"postgresql://u@h/d\"\npublication = [\"a\", \"b\"]\n",
        )
        .unwrap();
        assert_eq!(c.postgres.publication.names(), vec!["a", "b"]);
    }
}
