//! rustls client configurations with libpq's `sslmode` semantics.
//!
//! `prefer` and `require` encrypt without verifying (as libpq does), `verify-ca` checks
//! the chain against `sslrootcert` but not the host name, `verify-full` checks both.

use super::connstr::{PgConnectConfig, RootCert, SslMode};
use super::error::PgError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::path::Path;
use std::sync::Arc;

/// The crypto provider skusync uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Load a PEM bundle or the system trust store into a root store.
pub fn root_store(source: &RootCert, what: &str) -> Result<RootCertStore, PgError> {
    let mut roots = RootCertStore::empty();
    match source {
        RootCert::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    PgError::Config(format!(
                        "{what}: cannot read CA file {}: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(PgError::Config(format!(
                    "{what}: no certificates in {}",
                    path.display()
                )));
            }
            for c in certs {
                roots.add(c).map_err(|e| {
                    PgError::Config(format!(
                        "{what}: bad CA certificate in {}: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(PgError::Config(format!(
                    "{what}: the system trust store has no usable certificates"
                )));
            }
        }
    }
    Ok(roots)
}

/// The rustls config for a PostgreSQL connection, or `None` for `sslmode=disable`.
pub fn client_config(cfg: &PgConnectConfig) -> Result<Option<Arc<ClientConfig>>, PgError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Config(format!("TLS setup: {e}")))?;
    let config = match cfg.sslmode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let source = match &cfg.sslrootcert {
                Some(s) => s.clone(),
                None => {
                    // libpq's default location.
                    let default = std::env::var("HOME")
                        .map(|h| Path::new(&h).join(".postgresql/root.crt"))
                        .ok()
                        .filter(|p| p.exists());
                    match default {
                        Some(p) => RootCert::File(p),
                        None => {
                            return Err(PgError::Config(
                                "postgres.url: sslmode=verify-ca/verify-full needs a CA: add \
                                 sslrootcert=/path/to/ca.pem (or sslrootcert=system)"
                                    .into(),
                            ));
                        }
                    }
                }
            };
            let roots = Arc::new(root_store(&source, "postgres.url sslrootcert")?);
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .build()
            .map_err(|e| PgError::Config(format!("TLS setup: {e}")))?;
            if cfg.sslmode == SslMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(Some(Arc::new(config)))
}

/// The name rustls verifies (and sends as SNI for DNS names).
pub fn server_name(host: &str) -> Result<ServerName<'static>, PgError> {
    ServerName::try_from(host.to_string()).map_err(|_| {
        PgError::Config(format!(
            "postgres.url: {host:?} is not a valid TLS server name"
        ))
    })
}

/// `prefer`/`require`: encrypt, accept any certificate, still check handshake signatures.
#[derive(Debug)]
struct NoVerify(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the full webpki check, except that a host name mismatch is accepted.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name, so a name error means the chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
