//! MQTT sink (interface placeholder; the publisher lands separately).

use tokio_util::sync::CancellationToken;

/// Publisher settings.
pub struct PublisherConfig;

impl PublisherConfig {
    /// `None` without `[mqtt]`.
    pub fn from_config(_cfg: &crate::config::Config) -> Option<PublisherConfig> {
        None
    }
}

/// Handle to the publisher task.
#[derive(Clone)]
pub struct MqttHandle;

impl MqttHandle {
    /// SKUs changed in Redis.
    pub fn changed(&self, _skus: impl IntoIterator<Item = String>) {}
    /// Republish every SKU.
    pub fn republish_all(&self) {}
    /// Connected to the broker.
    pub fn is_connected(&self) -> bool {
        false
    }
}

/// Publisher errors.
#[derive(Debug, thiserror::Error)]
#[error("mqtt: {0}")]
pub struct MqttError(pub String);

/// Start the publisher.
pub async fn spawn(
    _cfg: PublisherConfig,
    _redis: redis::aio::ConnectionManager,
    _shutdown: CancellationToken,
) -> Result<(MqttHandle, tokio::task::JoinHandle<Result<(), MqttError>>), MqttError> {
    Err(MqttError("not built".into()))
}
