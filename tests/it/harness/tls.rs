//! A throwaway certificate authority and server certificates (rcgen).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{chown_tree, run_as};

/// PEM files for a TLS server (and the CA that clients must trust).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// CA certificate (PEM) that signed `cert`.
    pub ca_cert: PathBuf,
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM, PKCS#8), mode 0600.
    pub key: PathBuf,
}

/// A test CA whose files live in a temp dir removed on drop.
///
/// When running as root the directory and all files are owned by the
/// unprivileged server user (so PostgreSQL accepts and can read the key).
pub struct TestCa {
    dir: tempfile::TempDir,
    params: CertificateParams,
    key: KeyPair,
    ca_cert: PathBuf,
    issued: usize,
}

impl TestCa {
    /// Generates a new CA and writes `ca.pem`.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skusync-tls-")
            .tempdir()
            .expect("tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params
            .distinguished_name
            .push(DnType::CommonName, "skusync test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("self-sign ca");
        let ca_cert = dir.path().join("ca.pem");
        fs::write(&ca_cert, cert.pem()).expect("write ca.pem");
        let ca = Self {
            dir,
            params,
            key,
            ca_cert,
            issued: 0,
        };
        ca.fix_owner();
        ca
    }

    /// Path of the CA certificate (PEM).
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }

    /// Issues a server certificate for the given DNS names / IP addresses.
    pub fn issue_server_cert(&mut self, names: &[&str]) -> TlsFiles {
        let (cert, key) = self.issue(names, ExtendedKeyUsagePurpose::ServerAuth, "server");
        TlsFiles {
            ca_cert: self.ca_cert.clone(),
            cert,
            key,
        }
    }

    /// Issues a client certificate with common name `cn`; returns (cert, key).
    pub fn issue_client_cert(&mut self, cn: &str) -> (PathBuf, PathBuf) {
        self.issue(&[cn], ExtendedKeyUsagePurpose::ClientAuth, "client")
    }

    fn issue(
        &mut self,
        names: &[&str],
        eku: ExtendedKeyUsagePurpose,
        kind: &str,
    ) -> (PathBuf, PathBuf) {
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("cert params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        params.extended_key_usages = vec![eku];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        self.issued += 1;
        let n = self.issued;
        let cert_path = self.dir.path().join(format!("{kind}{n}.pem"));
        let key_path = self.dir.path().join(format!("{kind}{n}.key"));
        fs::write(&cert_path, cert.pem()).expect("write cert");
        fs::write(&key_path, key.serialize_pem()).expect("write key");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).expect("chmod key");
        self.fix_owner();
        (cert_path, key_path)
    }

    fn fix_owner(&self) {
        // 0755 dir so unprivileged processes can reach the files; keys stay 0600.
        fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        chown_tree(self.dir.path(), &run_as());
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}
