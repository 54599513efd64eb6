//! `--tls-cert`, `--tls-key`, `--tls-ca`: a daemon's TLS identity, the same on hosts and
//! on the center.

use std::path::PathBuf;

use clap::Args;

/// A daemon's TLS certificate, key and cluster CA (all three, or none).
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// This daemon's TLS certificate (PEM): serves its API (and the center's dashboard)
    /// over HTTPS, so it must name the addresses clients use as IP or DNS SANs. On a host
    /// it also turns on mutual TLS for migrations, with the SAN `ferry-host`, and every
    /// host must then have TLS on. Needs --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM) that must have signed every peer's certificate.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS configuration the flags give, or `None` without them.
    pub fn config(&self) -> anyhow::Result<Option<ferry_migrate::TlsConfig>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                let config = ferry_migrate::TlsConfig::from_pem_files(cert, key, ca)?;
                ferry_migrate::auth::warn_if_everyone_reads(key, "pose as this daemon");
                Ok(Some(config))
            }
            _ => Ok(None),
        }
    }
}
