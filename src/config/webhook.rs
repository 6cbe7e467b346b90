//! `[[webhook]]`: where alerts are POSTed (by the webhook sink).

use super::ConfigError;
use serde::Deserialize;
use std::time::Duration;

/// `[[webhook]]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the webhook's cursor in Redis and its metrics: 1-64 of `a-z 0-9 _ -`.
    pub name: String,
    /// `https://...` (or `http://`, for a gateway on the same host or network).
    pub url: String,
    /// File holding the HMAC-SHA256 key that signs each request (at least 32 characters).
    pub secret_file: std::path::PathBuf,
    /// Time for one attempt (connect, request, response), in ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts per alert before it is dropped (the retry budget).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First retry delay in ms; doubles per attempt up to `max_backoff_ms`.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Longest retry delay, in ms.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_timeout_ms() -> u64 {
    5_000
}
fn default_attempts() -> u32 {
    10
}
fn default_backoff_ms() -> u64 {
    1_000
}
fn default_max_backoff_ms() -> u64 {
    60_000
}
fn default_concurrency() -> usize {
    4
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the URL may carry a token of the push gateway
        let url = url::Url::parse(&self.url)
            .map(|u| format!("{}://{}", u.scheme(), u.host_str().unwrap_or("")))
            .unwrap_or_else(|_| "<invalid>".into());
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &url)
            .field("secret_file", &self.secret_file)
            .field("timeout_ms", &self.timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_ms", &self.backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl WebhookConfig {
    /// Checks the values (`at` names the entry in errors, e.g. `webhook[0]`).
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(format!("{at}.{m}")));
        if !(1..=64).contains(&self.name.len())
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return err("name: must be 1-64 characters of a-z 0-9 _ -".into());
        }
        match url::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            _ => return err("url: must be an http:// or https:// URL".into()),
        }
        if self.timeout_ms == 0 || self.max_attempts == 0 || self.concurrency == 0 {
            return err("timeout_ms, max_attempts, concurrency: must be at least 1".into());
        }
        if self.backoff_ms == 0 || self.max_backoff_ms < self.backoff_ms {
            return err("backoff_ms: must be at least 1 and at most max_backoff_ms".into());
        }
        Ok(())
    }

    /// Delay before attempt `n + 1` after `n` failed attempts (`n >= 1`).
    pub fn backoff(&self, failed: u32) -> Duration {
        let exp = self
            .backoff_ms
            .saturating_mul(1u64 << failed.saturating_sub(1).min(20));
        Duration::from_millis(exp.min(self.max_backoff_ms))
    }
}
