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

/// The `tls-server-end-point` channel binding data (RFC 5929 §4.1) for the server's
/// end-entity certificate: its hash with the certificate's signature hash, except that
/// MD5 and SHA-1 are replaced by SHA-256. `None` when the signature algorithm names no
/// single hash (Ed25519, RSA-PSS) or the certificate does not parse: SCRAM then runs
/// without channel binding, and `channel_binding=require` refuses.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_cert::der::Decode;
    use x509_cert::der::oid::db::rfc5912 as oid;
    let cert = x509_cert::Certificate::from_der(cert_der).ok()?;
    let alg = cert.signature_algorithm.oid;
    if [
        oid::MD_5_WITH_RSA_ENCRYPTION,
        oid::SHA_1_WITH_RSA_ENCRYPTION,
        oid::DSA_WITH_SHA_1,
        oid::SHA_256_WITH_RSA_ENCRYPTION,
        oid::DSA_WITH_SHA_256,
        oid::ECDSA_WITH_SHA_256,
    ]
    .contains(&alg)
    {
        Some(sha2::Sha256::digest(cert_der).to_vec())
    } else if [
        oid::SHA_224_WITH_RSA_ENCRYPTION,
        oid::DSA_WITH_SHA_224,
        oid::ECDSA_WITH_SHA_224,
    ]
    .contains(&alg)
    {
        Some(sha2::Sha224::digest(cert_der).to_vec())
    } else if [oid::SHA_384_WITH_RSA_ENCRYPTION, oid::ECDSA_WITH_SHA_384].contains(&alg) {
        Some(sha2::Sha384::digest(cert_der).to_vec())
    } else if [oid::SHA_512_WITH_RSA_ENCRYPTION, oid::ECDSA_WITH_SHA_512].contains(&alg) {
        Some(sha2::Sha512::digest(cert_der).to_vec())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn cert_with(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        rcgen::CertificateParams::new(vec!["db.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn end_point_hash_follows_the_certificate_signature_hash() {
        let p256 = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            tls_server_end_point(&p256).unwrap(),
            sha2::Sha256::digest(&p256).to_vec()
        );
        let p384 = cert_with(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            tls_server_end_point(&p384).unwrap(),
            sha2::Sha384::digest(&p384).to_vec()
        );
        // Ed25519 names no hash: no binding rather than a guessed one.
        assert_eq!(tls_server_end_point(&cert_with(&rcgen::PKCS_ED25519)), None);
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }
}
