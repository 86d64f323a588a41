//! Throwaway certificate authorities for TLS tests and local development.
//!
//! Every [`TestPki`] is generated at runtime with a fresh key pair, so nothing secret is checked
//! in and two instances never trust each other: a client configured with one CA fails the
//! handshake against a server presenting the other's certificate, which is exactly the
//! "untrusted certificate" case tests need.

use std::{fs, io, path::Path, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    ClientConfig, RootCertStore, ServerConfig,
};

/// A CA and one server certificate it signed.
pub struct TestPki {
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: PrivatePkcs8KeyDer<'static>,
}

impl TestPki {
    /// Generates a CA and a server certificate for `hosts`.
    ///
    /// Hosts that parse as IP addresses become IP subject alternative names, the rest DNS names:
    /// `&["localhost", "127.0.0.1"]` is valid for both `https://localhost` and
    /// `https://127.0.0.1`.
    ///
    /// # Panics
    ///
    /// If a host is not a valid DNS name or IP address. This is a test fixture; a bad host is a
    /// bug in the test.
    pub fn new(hosts: &[impl AsRef<str>]) -> Self {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "idmatch-mock test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let hosts: Vec<String> = hosts.iter().map(|host| host.as_ref().to_owned()).collect();
        let server_key = KeyPair::generate().expect("generate server key");
        let mut server_params = CertificateParams::new(hosts).expect("valid DNS names or IPs");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "idmatch-mock server");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("sign server certificate");

        Self {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            server_cert: server_cert.der().clone(),
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
        }
    }

    /// A certificate for every name a local client may use for this machine: `localhost`,
    /// `127.0.0.1` and `::1`.
    pub fn localhost() -> Self {
        Self::new(&["localhost", "127.0.0.1", "::1"])
    }

    /// The CA certificate in PEM, as a client's trust store or `--ca-file` expects it.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The CA certificate in DER, for building a [`RootCertStore`] directly.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// Writes [`ca_pem`](Self::ca_pem) to `path`, replacing any existing file.
    pub fn write_ca(&self, path: impl AsRef<Path>) -> io::Result<()> {
        fs::write(path, &self.ca_pem)
    }

    /// A TLS server configuration presenting the server certificate, offering `alpn` in order of
    /// preference (empty: no ALPN).
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![self.server_cert.clone()],
                PrivateKeyDer::Pkcs8(self.server_key.clone_key()),
            )
            .expect("rcgen produces a key matching its certificate");
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Arc::new(config)
    }

    /// A TLS client configuration that trusts this CA and nothing else, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .expect("rcgen produces a parsable CA certificate");
        let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Arc::new(config)
    }
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key stays out of debug output, even a throwaway one.
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}
