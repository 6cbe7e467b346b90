//! Broker URL, credentials and TLS -> rumqttc options.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::MqttOptions;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::{TlsConfiguration, Transport};

use super::MqttError;
use crate::config::MqttConfig;

/// Environment variable that supplies the password when the URL has none.
pub const PASSWORD_ENV: &str = "SKUSYNC_MQTT_PASSWORD";

/// Keep-alive interval.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// A parsed broker address.
#[derive(Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address (verified against the certificate with TLS).
    pub host: String,
    /// Port (1883 / 8883 by default).
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
    /// User name, percent-decoded.
    pub user: Option<String>,
    /// Password, percent-decoded. Never logged.
    pub password: Option<String>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // no credentials in logs
        f.debug_struct("Broker")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

fn decode(s: &str) -> Result<String, MqttError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| MqttError::Config("mqtt.url: credentials are not valid UTF-8".into()))
}

/// Parses `mqtt://[user[:password]@]host[:port]` or `mqtts://...`; `env_password` is
/// used when the URL carries no password.
pub fn parse_url(url: &str, env_password: Option<String>) -> Result<Broker, MqttError> {
    // the error must not echo the URL: it may hold a password
    let u = url::Url::parse(url)
        .map_err(|e| MqttError::Config(format!("mqtt.url: not a URL ({e})")))?;
    let tls = match u.scheme() {
        "mqtt" => false,
        "mqtts" => true,
        s => {
            return Err(MqttError::Config(format!(
                "mqtt.url: scheme {s:?} is not mqtt:// or mqtts://"
            )));
        }
    };
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| MqttError::Config("mqtt.url: no host".into()))?;
    // url keeps IPv6 brackets in host_str
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if !matches!(u.path(), "" | "/") || u.query().is_some() {
        return Err(MqttError::Config(
            "mqtt.url: no path or query expected (mqtt://host:port)".into(),
        ));
    }
    let user = match u.username() {
        "" => None,
        s => Some(decode(s)?),
    };
    let password = match u.password() {
        Some(p) => Some(decode(p)?),
        None => env_password.filter(|p| !p.is_empty()),
    };
    Ok(Broker {
        host,
        port: u.port().unwrap_or(if tls { 8883 } else { 1883 }),
        tls,
        user,
        password,
    })
}

/// A rustls client config (ring) trusting `ca_file` (PEM) or else the system roots.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, MqttError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| MqttError::Config(format!("mqtt.ca_file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(MqttError::Config(format!(
                    "mqtt.ca_file {}: no certificates",
                    path.display()
                )));
            }
            for c in certs {
                roots.add(c).map_err(|e| {
                    MqttError::Config(format!("mqtt.ca_file {}: {e}", path.display()))
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for c in native.certs {
                // one unusable system certificate should not disable TLS
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(MqttError::Config(
                    "mqtts: no system root certificates found; set mqtt.ca_file".into(),
                ));
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Config(format!("mqtts: {e}")))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// rumqttc options: clean start, keep-alive, LWT, packet size, credentials, TLS.
pub fn options(cfg: &MqttConfig, broker: &Broker) -> Result<MqttOptions, MqttError> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), broker.host.clone(), broker.port);
    o.set_keep_alive(KEEP_ALIVE);
    // Redis is the outbox; a broker-side session would only duplicate it
    o.set_clean_start(true);
    // Small state messages must not wait for Nagle's algorithm (it added ~10 ms at
    // 1k tx/s in the latency benchmark).
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    o.set_network_options(net);
    let max = u32::try_from(cfg.max_packet_bytes)
        .map_err(|_| MqttError::Config("mqtt.max_packet_bytes too large".into()))?;
    if max < 1024 {
        return Err(MqttError::Config(
            "mqtt.max_packet_bytes: at least 1024".into(),
        ));
    }
    o.set_max_packet_size(Some(max));
    // rumqttc preallocates one slot per possible packet id up to this limit (65535 by
    // default: ~10 MiB). The publisher never has more than a few hundred in flight.
    o.set_outgoing_inflight_upper_limit(512);
    o.set_last_will(LastWill::new(
        super::status_topic(&cfg.topic_prefix),
        "offline",
        QoS::AtLeastOnce,
        true,
        Some(rumqttc::v5::mqttbytes::v5::LastWillProperties {
            delay_interval: None,
            payload_format_indicator: Some(1),
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    ));
    if let Some(u) = &broker.user {
        o.set_credentials(u.clone(), broker.password.clone().unwrap_or_default());
    }
    if broker.tls {
        let tls = tls_config(cfg.ca_file.as_deref())?;
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(tls))));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let b = parse_url("mqtt://127.0.0.1:1884", None).unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("127.0.0.1", 1884, false));
        assert_eq!(b.user, None);
        let b = parse_url("mqtts://u%40x:p%3Aw@broker.example", None).unwrap();
        assert_eq!((b.port, b.tls), (8883, true));
        assert_eq!(b.user.as_deref(), Some("u@x"));
        assert_eq!(b.password.as_deref(), Some("p:w"));
        let b = parse_url("mqtt://u@h", Some("envpw".into())).unwrap();
        assert_eq!(b.password.as_deref(), Some("envpw"));
        assert_eq!(b.port, 1883);
        let b = parse_url("mqtt://[::1]:1", None).unwrap();
        assert_eq!(b.host, "::1");
        assert!(!format!("{b:?}").contains("envpw"));
    }

    #[test]
    fn rejects_bad_urls_without_echoing_secrets() {
        for u in [
            "http://h",
            "mqtt://",
            "mqtt://h/x",
            "mqtt://h?x=1",
            "nonsense",
        ] {
            assert!(parse_url(u, None).is_err(), "{u}");
        }
        let e = parse_url("ws://user:secret@h", None)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"));
    }
}
