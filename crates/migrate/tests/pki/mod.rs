//! Test certificates, made with rcgen at test time: a cluster CA, host certificates
//! signed by it (DNS name `ferry-host`, usable as TLS server and client), and whatever
//! variations the negative tests need. Shared by the unit tests of `src/tls.rs` and the
//! integration tests of `tests/tls.rs`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub cert: String,
}

/// A host's certificate and key, PEM.
#[derive(Clone)]
pub struct Identity {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8).
    pub key: String,
}

impl Ca {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("a CA certificate").pem();
        Self {
            issuer: Issuer::new(params, key),
            cert,
        }
    }

    /// A host certificate for `ferry-host`, as a Ferry host needs it.
    pub fn host(&self) -> Identity {
        self.issue(
            &["ferry-host"],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A certificate for `names` with extended key usages `usages`.
    pub fn issue(&self, names: &[&str], usages: Vec<ExtendedKeyUsagePurpose>) -> Identity {
        let key = KeyPair::generate().expect("a host key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("host params");
        params
            .distinguished_name
            .push(DnType::CommonName, "a Ferry test host");
        params.extended_key_usages = usages;
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a host certificate")
            .pem();
        Identity {
            cert,
            key: key.serialize_pem(),
        }
    }
}

/// A fresh, empty directory for one test's files.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ferry-tls-{test}-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

/// Writes `identity` and the CA certificate(s) `ca` as `NAME.crt`, `NAME.key` and
/// `NAME-ca.crt` in `dir`; returns the three paths.
pub fn write(dir: &Path, name: &str, identity: &Identity, ca: &str) -> [PathBuf; 3] {
    let paths = [
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}-ca.crt")),
    ];
    std::fs::write(&paths[0], &identity.cert).expect("write the certificate");
    std::fs::write(&paths[1], &identity.key).expect("write the key");
    std::fs::write(&paths[2], ca).expect("write the CA certificate");
    paths
}

/// Host certificates of `ca`, one per name in `names`, written by [`write`] to a fresh
/// directory and read back by `load` (e.g. `TlsConfig::from_pem_files`, given the
/// certificate, key and CA paths); the directory is removed afterwards.
pub fn load_hosts<T, E: std::fmt::Debug, const N: usize>(
    test: &str,
    ca: &Ca,
    names: [&str; N],
    load: impl Fn(&Path, &Path, &Path) -> Result<T, E>,
) -> [T; N] {
    let dir = temp_dir(test);
    let loaded = names.map(|name| {
        let [cert, key, ca_file] = write(&dir, name, &ca.host(), &ca.cert);
        load(&cert, &key, &ca_file).expect("load the written files")
    });
    let _ = std::fs::remove_dir_all(&dir);
    loaded
}
