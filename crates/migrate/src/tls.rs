//! Optional mutual TLS on every migration connection (control and data), with rustls.
//!
//! Each host has a certificate and key, and trusts one CA (or a few, during a rotation):
//! the listener requires a client certificate signed by that CA, and the connecting host
//! checks the listener's certificate against it. The shared-secret authentication of
//! [`crate::auth`] still runs, inside the TLS session.
//!
//! Names: the connecting host does not check the listener's certificate against the
//! address it dialled (hosts move, and are often reached by IP address) but against the
//! fixed name [`TLS_SERVER_NAME`], `ferry-host`. Every host certificate must therefore
//! carry the DNS subject alternative name `ferry-host`; which hosts may migrate to
//! each other is decided by which CA signed their certificates, not by their names. Each
//! certificate is used both ways (as server and as client), so if it has an extended key
//! usage it must allow both `serverAuth` and `clientAuth`.
//!
//! Only TLS 1.3 is spoken, with the `ring` crypto provider; no session is resumed, so
//! every connection verifies the peer's certificate afresh.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    AlertDescription, ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig,
    ServerConnection, StreamOwned,
};

use crate::MigrationError;

/// The name every host certificate must carry as a DNS subject alternative name: the
/// connecting host checks the listener's certificate against it, whatever the address.
pub const TLS_SERVER_NAME: &str = "ferry-host";

/// How long a failed handshake waits for the peer to read the alert saying why.
const LINGER: Duration = Duration::from_secs(1);

/// This host's TLS identity and the CA its peers must be signed by, for both directions:
/// [`crate::serve_with_tls`] and [`crate::MigrationOptions::tls`]. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// The same identity for the HTTPS API (clients need no certificate there).
    https: Arc<ServerConfig>,
    /// The CA certificates, for API clients verifying servers of the cluster.
    ca: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig(TLS 1.3, mutual, server name ")?;
        f.write_str(TLS_SERVER_NAME)?;
        f.write_str(")")
    }
}

/// One PEM input and where it came from, for messages.
struct Pem<'a> {
    bytes: &'a [u8],
    origin: String,
}

/// Why [`TlsConfig::from_pem_files`] (or [`TlsConfig::from_pem`]) refused a host's TLS
/// identity. Each names the input at fault ("the TLS certificate /etc/ferry/a.crt").
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A file could not be read.
    #[error("cannot read {origin}")]
    Read {
        /// The input, and its path.
        origin: String,
        /// The error reading it.
        #[source]
        source: io::Error,
    },
    /// An input is not well-formed PEM.
    #[error("{origin} is not well-formed PEM")]
    Pem {
        /// The input.
        origin: String,
        /// What is wrong with it.
        #[source]
        source: pem::Error,
    },
    /// An input meant to hold certificates holds none.
    #[error("{origin} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate {
        /// The input.
        origin: String,
    },
    /// The key input holds no private key.
    #[error("{origin} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoPrivateKey {
        /// The input.
        origin: String,
    },
    /// A certificate of the CA input cannot be trusted as a CA.
    #[error("{origin} is not a usable CA certificate")]
    Ca {
        /// The input.
        origin: String,
        /// Why not.
        #[source]
        source: Box<rustls::Error>,
    },
    /// No verifier of peers could be made of the CA input.
    #[error("{origin} cannot verify peers")]
    Verifier {
        /// The CA input.
        origin: String,
        /// Why not.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The host's certificate would not pass its peers' checks, as a server or as a
    /// client.
    #[error(
        "{cert} is not usable by a Ferry host as a TLS {role} (it must be signed by a CA in \
         {ca}, carry the DNS subject alternative name '{TLS_SERVER_NAME}', be valid now, and \
         allow both serverAuth and clientAuth)"
    )]
    Unusable {
        /// The certificate input.
        cert: String,
        /// The CA input.
        ca: String,
        /// "server" or "client".
        role: &'static str,
        /// The check that failed.
        #[source]
        source: Box<rustls::Error>,
    },
    /// The private key is not the certificate's.
    #[error("{key} is not the key of {cert}")]
    KeyMismatch {
        /// The key input.
        key: String,
        /// The certificate input.
        cert: String,
        /// The mismatch, as rustls saw it.
        #[source]
        source: Box<rustls::Error>,
    },
    /// The private key cannot be used (an unsupported algorithm, say).
    #[error("{origin} cannot be used")]
    Key {
        /// The key input.
        origin: String,
        /// Why not.
        #[source]
        source: Box<rustls::Error>,
    },
    /// TLS 1.3 with the crypto provider is not available (a build without them).
    #[error("TLS 1.3 is not available")]
    Protocol(#[source] Box<rustls::Error>),
}

impl TlsConfig {
    /// Loads this host's certificate chain (`cert`: PEM, the host certificate first, then
    /// any intermediates), its private key (`key`: PEM, PKCS#8, PKCS#1 or SEC1) and the CA
    /// certificate(s) that must have signed the peers' certificates (`ca`: PEM, one or
    /// more).
    ///
    /// The certificate must carry the DNS subject alternative name [`TLS_SERVER_NAME`]
    /// (`ferry-host`), be valid now, allow use as both TLS server and client, and chain to
    /// a CA in `ca`, as the peers will check: this is verified here, so a mistake shows
    /// when the host starts rather than at its first migration.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsConfigError> {
        let (cert_origin, key_origin, ca_origin) = (
            format!("the TLS certificate {}", cert.display()),
            format!("the TLS private key {}", key.display()),
            format!("the TLS CA certificate {}", ca.display()),
        );
        let read = |path: &Path, origin: &String| {
            std::fs::read(path).map_err(|source| TlsConfigError::Read {
                origin: origin.clone(),
                source,
            })
        };
        let (cert_pem, key_pem, ca_pem) = (
            read(cert, &cert_origin)?,
            read(key, &key_origin)?,
            read(ca, &ca_origin)?,
        );
        Self::build(
            Pem {
                bytes: &cert_pem,
                origin: cert_origin,
            },
            Pem {
                bytes: &key_pem,
                origin: key_origin,
            },
            Pem {
                bytes: &ca_pem,
                origin: ca_origin,
            },
        )
    }

    /// [`TlsConfig::from_pem_files`] with the PEM texts themselves.
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Self, TlsConfigError> {
        Self::build(
            Pem {
                bytes: cert,
                origin: "the TLS certificate".into(),
            },
            Pem {
                bytes: key,
                origin: "the TLS private key".into(),
            },
            Pem {
                bytes: ca,
                origin: "the TLS CA certificate".into(),
            },
        )
    }

    fn build(cert: Pem<'_>, key: Pem<'_>, ca: Pem<'_>) -> Result<Self, TlsConfigError> {
        let chain = certificates(&cert)?;
        let private_key = PrivateKeyDer::from_pem_slice(key.bytes).map_err(|e| match e {
            pem::Error::NoItemsFound => TlsConfigError::NoPrivateKey {
                origin: key.origin.clone(),
            },
            source => TlsConfigError::Pem {
                origin: key.origin.clone(),
                source,
            },
        })?;
        let mut roots = RootCertStore::empty();
        let ca_certs = certificates(&ca)?;
        for ca_cert in &ca_certs {
            roots
                .add(ca_cert.clone())
                .map_err(|source| TlsConfigError::Ca {
                    origin: ca.origin.clone(),
                    source: Box::new(source),
                })?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = &[&rustls::version::TLS13];

        let verifier_error = |source| TlsConfigError::Verifier {
            origin: ca.origin.clone(),
            source,
        };
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(verifier_error)?;
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(verifier_error)?;
        check_own_certificate(&chain, &*server_verifier, &*client_verifier).map_err(
            |(role, source)| TlsConfigError::Unusable {
                cert: cert.origin.clone(),
                ca: ca.origin.clone(),
                role,
                source: Box::new(source),
            },
        )?;
        let key_error = |source: rustls::Error| match source {
            rustls::Error::InconsistentKeys(_) => TlsConfigError::KeyMismatch {
                key: key.origin.clone(),
                cert: cert.origin.clone(),
                source: Box::new(source),
            },
            source => TlsConfigError::Key {
                origin: key.origin.clone(),
                source: Box::new(source),
            },
        };
        let protocol_error = |source| TlsConfigError::Protocol(Box::new(source));

        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(protocol_error)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), private_key.clone_key())
            .map_err(key_error)?;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});

        let mut https = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(protocol_error)?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), private_key.clone_key())
            .map_err(key_error)?;
        https.alpn_protocols = vec![b"http/1.1".to_vec()];

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(protocol_error)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private_key)
            .map_err(key_error)?;
        client.resumption = Resumption::disabled();

        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            https: Arc::new(https),
            ca: ca_certs,
        })
    }

    /// This identity as an HTTPS server (the host's and the center's APIs): TLS 1.3,
    /// no client certificate (API clients authenticate with tokens). Clients check the
    /// certificate against the address they use, so for the API it must also name that
    /// address (an IP or DNS subject alternative name).
    pub fn https_server(&self) -> Arc<ServerConfig> {
        self.https.clone()
    }

    /// The CA certificates (DER), for API clients that verify the cluster's servers.
    pub fn ca_certificates(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    /// The connecting side's handshake on `socket`: the listener must present a
    /// certificate for [`TLS_SERVER_NAME`] signed by our CA, and gets ours.
    pub(crate) fn connect(&self, socket: TcpStream) -> Result<TlsStream, HandshakeFailure> {
        let name = ServerName::try_from(TLS_SERVER_NAME).expect("a valid DNS name");
        let conn = ClientConnection::new(self.client.clone(), name)
            .map_err(|e| HandshakeFailure::said(e.to_string()))?;
        handshake(Connection::Client(conn), socket)
    }

    /// The listening side's handshake on `socket`: the peer must present a certificate
    /// signed by our CA.
    pub(crate) fn accept(&self, socket: TcpStream) -> Result<TlsStream, HandshakeFailure> {
        let conn = ServerConnection::new(self.server.clone())
            .map_err(|e| HandshakeFailure::said(e.to_string()))?;
        handshake(Connection::Server(conn), socket)
    }
}

fn certificates(pem: &Pem<'_>) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem.bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsConfigError::Pem {
            origin: pem.origin.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate {
            origin: pem.origin.clone(),
        });
    }
    Ok(certs)
}

/// Checks our own certificate as the peers will: as a server for [`TLS_SERVER_NAME`], and
/// as a client; a failure names the role it failed in.
fn check_own_certificate(
    chain: &[CertificateDer<'static>],
    server_verifier: &dyn ServerCertVerifier,
    client_verifier: &dyn ClientCertVerifier,
) -> Result<(), (&'static str, rustls::Error)> {
    let (end_entity, intermediates) = chain.split_first().expect("at least one certificate");
    let now = UnixTime::now();
    let name = ServerName::try_from(TLS_SERVER_NAME).expect("a valid DNS name");
    server_verifier
        .verify_server_cert(end_entity, intermediates, &name, &[], now)
        .map_err(|e| ("server", e))?;
    client_verifier
        .verify_client_cert(end_entity, intermediates, now)
        .map_err(|e| ("client", e))?;
    Ok(())
}

/// An established TLS session over TCP, either side.
pub(crate) enum TlsStream {
    /// We connected.
    Client(StreamOwned<ClientConnection, TcpStream>),
    /// We accepted.
    Server(StreamOwned<ServerConnection, TcpStream>),
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Client(s) => s.read(buf),
            Self::Server(s) => s.read(buf),
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Client(s) => s.write(buf),
            Self::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Client(s) => s.flush(),
            Self::Server(s) => s.flush(),
        }
    }
}

/// A failed TLS handshake.
#[derive(Debug)]
pub(crate) struct HandshakeFailure {
    /// Why, for a person.
    pub(crate) why: String,
    /// The peer closed the connection before it sent a byte: it may not speak TLS, or
    /// may be a listener at its limit of connections authenticating at once (it closes
    /// those unread, without a word: it cannot send a TLS peer a plain refusal).
    pub(crate) unheard: bool,
}

impl HandshakeFailure {
    fn said(why: String) -> Self {
        Self {
            why,
            unheard: false,
        }
    }
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Completes the handshake of `conn` on `socket` (under the socket's timeouts), or says
/// why it failed.
fn handshake(mut conn: Connection, mut socket: TcpStream) -> Result<TlsStream, HandshakeFailure> {
    let mut heard = 0;
    let mut run = || -> io::Result<()> {
        while conn.is_handshaking() {
            let (read, written) = conn.complete_io(&mut socket)?;
            heard += read;
            if read == 0 && written == 0 && conn.is_handshaking() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        // Our last handshake message, if still queued.
        while conn.wants_write() {
            conn.write_tls(&mut socket)?;
        }
        socket.flush()
    };
    if let Err(e) = run() {
        linger(&socket);
        let closed = matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        );
        // Bytes a last call read before it failed are in no count: the peer's version
        // known means it answered.
        let answered = heard > 0 || conn.protocol_version().is_some();
        return Err(HandshakeFailure {
            why: describe(&e),
            unheard: closed && !answered,
        });
    }
    Ok(match conn {
        Connection::Client(c) => TlsStream::Client(StreamOwned::new(c, socket)),
        Connection::Server(s) => TlsStream::Server(StreamOwned::new(s, socket)),
    })
}

/// After a failed handshake: stop sending and read what the peer still sends until it
/// closes (briefly), so the alert saying why reaches it instead of being lost to a reset
/// (closing a socket with unread data resets the connection). This matters most for a
/// rejected client certificate: in TLS 1.3 the client learns of it only on its first
/// read, after it has sent its first message.
fn linger(socket: &TcpStream) {
    let _ = socket.shutdown(Shutdown::Write);
    if socket.set_read_timeout(Some(LINGER)).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut left = 1usize << 20;
    let mut reader = socket;
    while left > 0 {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// The rustls error inside an I/O error, if any.
fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Why a TLS handshake failed, for a person.
fn describe(e: &io::Error) -> String {
    if let Some(tls) = tls_error(e) {
        return match tls {
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => format!(
                "the peer refused the TLS session ({tls}): it requires a certificate from this \
                 host"
            ),
            rustls::Error::AlertReceived(
                AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::UnsupportedCertificate,
            ) => format!(
                "the peer refused the TLS session ({tls}): it does not accept this host's \
                 certificate (signed by a CA it does not trust?); see its log"
            ),
            rustls::Error::AlertReceived(_) => {
                format!("the peer refused the TLS session ({tls}); see its log")
            }
            rustls::Error::NoCertificatesPresented => format!(
                "the peer presented no certificate ({tls}): it must have TLS configured \
                 with a certificate and key"
            ),
            rustls::Error::InvalidCertificate(_) => format!(
                "the peer's certificate is not acceptable ({tls}): it must be signed by \
                 this host's CA and carry the DNS name '{TLS_SERVER_NAME}'"
            ),
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                format!(
                    "the peer does not speak TLS ({tls}): enable TLS on both hosts or on neither"
                )
            }
            other => other.to_string(),
        };
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => format!(
            "the peer closed the connection during the handshake ({e}): it may have TLS \
             off, or not accept this host's certificate; see its log"
        ),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "the peer did not complete the handshake in time".to_string()
        }
        _ => e.to_string(),
    }
}

/// The connecting side's view of an error during the first exchange after its handshake:
/// in TLS 1.3 a listener that rejects our certificate says so only then, with an alert,
/// which becomes an authentication error naming the TLS handshake.
pub(crate) fn refused_after_handshake(error: MigrationError, addr: &str) -> MigrationError {
    match error {
        MigrationError::Io { source, .. } if tls_error(&source).is_some() => MigrationError::Auth(
            format!("TLS handshake with {addr} failed: {}", describe(&source)),
        ),
        other => other,
    }
}

#[cfg(test)]
#[path = "../tests/pki/mod.rs"]
mod test_pki;

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::thread::JoinHandle;

    use rcgen::ExtendedKeyUsagePurpose;

    use super::test_pki::{self, Ca, Identity};
    use super::*;
    use crate::auth::{authenticate_stream_connector, authenticate_stream_listener, Secret};
    use crate::link::Link;
    use crate::wire::{Frame, FrameStream, Message, StreamRole};

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn secret() -> Secret {
        Secret::new("correct horse battery staple").unwrap()
    }

    fn config(id: &Identity, ca: &str) -> TlsConfig {
        TlsConfig::from_pem(id.cert.as_bytes(), id.key.as_bytes(), ca.as_bytes()).unwrap()
    }

    /// Listens on loopback for one connection, handshakes (with `tls`) and authenticates
    /// it as the destination does, then takes one RAM frame and answers with the number
    /// of pages it held.
    fn serve_one(
        tls: Option<TlsConfig>,
    ) -> (String, JoinHandle<Result<StreamRole, MigrationError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            let link = match tls {
                Some(tls) => Link::tls(
                    tls.accept(stream).map_err(|why| {
                        MigrationError::Auth(format!("TLS handshake failed: {why}"))
                    })?,
                    8 << 10,
                ),
                None => Link::plain(stream, 1 << 20, 8 << 10).unwrap(),
            };
            let mut conn = FrameStream::new(link, false);
            let role = authenticate_stream_listener(&mut conn, &secret())?;
            let pages = match conn.read()? {
                Frame::Ram {
                    pages,
                    data: Some(data),
                    ..
                } => {
                    assert!(data.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
                    pages
                }
                other => panic!("expected RAM, got {other:?}"),
            };
            conn.send(&Message::RoundApplied {
                round: pages as u32,
            })?;
            Ok(role)
        });
        (addr, server)
    }

    /// Connects to `addr` as the source does (with `tls`) and authenticates.
    fn dial(addr: &str, tls: Option<&TlsConfig>) -> Result<FrameStream<Link>, MigrationError> {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        let link = match tls {
            Some(tls) => Link::tls(
                tls.connect(stream).map_err(|why| {
                    MigrationError::Auth(format!("TLS handshake with {addr} failed: {why}"))
                })?,
                1 << 20,
            ),
            None => Link::plain(stream, 8 << 10, 1 << 20).unwrap(),
        };
        let mut conn = FrameStream::new(link, false);
        authenticate_stream_connector(&mut conn, &secret(), StreamRole::Control)
            .map_err(|e| refused_after_handshake(e, addr))?;
        Ok(conn)
    }

    fn auth_error<T>(result: Result<T, MigrationError>) -> String {
        match result {
            Err(MigrationError::Auth(why)) => why,
            Err(e) => panic!("expected an authentication error, got {e:?}"),
            Ok(_) => panic!("expected an authentication error, got success"),
        }
    }

    /// Dials a listener set up with `server` TLS settings using `client` ones, where
    /// authentication must fail; returns why, as the dialling side and the listener say.
    fn refusal(server: Option<TlsConfig>, client: Option<&TlsConfig>) -> (String, String) {
        let (addr, listener) = serve_one(server);
        let why = auth_error(dial(&addr, client));
        (why, auth_error(listener.join().unwrap()))
    }

    #[test]
    fn handshake_and_authentication_round_trip_over_tls() {
        let ca = Ca::new("Ferry test CA");
        let [a, b] = test_pki::load_hosts("round-trip", &ca, ["a", "b"], TlsConfig::from_pem_files);
        assert!(format!("{a:?}").contains("ferry-host"));

        let (addr, server) = serve_one(Some(b));
        let mut conn = dial(&addr, Some(&a)).unwrap();
        let data: Vec<u8> = (0..256 * 4096).map(|i| (i % 251) as u8).collect();
        conn.writer.send_ram(0, 256, Some(&data)).unwrap();
        conn.writer.flush().unwrap();
        assert!(matches!(
            conn.expect_control("the answer").unwrap(),
            Message::RoundApplied { round: 256 }
        ));
        assert_eq!(server.join().unwrap().unwrap(), StreamRole::Control);
    }

    #[test]
    fn a_client_certificate_from_another_ca_is_refused() {
        let ca = Ca::new("Ferry test CA");
        let rogue_ca = Ca::new("Another CA");
        // The rogue host trusts our CA (so it accepts our certificate) and its own.
        let rogue = config(&rogue_ca.host(), &format!("{}{}", rogue_ca.cert, ca.cert));
        let (why, server_why) = refusal(Some(config(&ca.host(), &ca.cert)), Some(&rogue));
        assert!(
            why.contains("TLS handshake") && why.contains("refused"),
            "{why}"
        );
        assert!(
            server_why.contains("TLS handshake failed") && server_why.contains("UnknownIssuer"),
            "{server_why}"
        );
    }

    #[test]
    fn a_server_certificate_from_another_ca_is_refused() {
        let ca = Ca::new("Ferry test CA");
        let rogue_ca = Ca::new("Another CA");
        let rogue = config(&rogue_ca.host(), &format!("{}{}", rogue_ca.cert, ca.cert));
        let (why, server_why) = refusal(Some(rogue), Some(&config(&ca.host(), &ca.cert)));
        assert!(
            why.contains("TLS handshake") && why.contains("UnknownIssuer"),
            "{why}"
        );
        assert!(server_why.contains("TLS handshake failed"), "{server_why}");
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let ca = Ca::new("Ferry test CA");
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.cert.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let client =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let anonymous = TlsConfig {
            client: Arc::new(client),
            ..config(&ca.host(), &ca.cert)
        };
        let (why, server_why) = refusal(Some(config(&ca.host(), &ca.cert)), Some(&anonymous));
        assert!(
            why.contains("TLS handshake") && why.contains("requires a certificate"),
            "{why}"
        );
        assert!(server_why.contains("no certificate"), "{server_why}");
    }

    #[test]
    fn plain_tcp_to_a_tls_listener_is_refused() {
        let ca = Ca::new("Ferry test CA");
        let (why, server_why) = refusal(Some(config(&ca.host(), &ca.cert)), None);
        assert!(
            why.contains("speaks TLS") && why.contains("TLS off"),
            "{why}"
        );
        assert!(server_why.contains("does not speak TLS"), "{server_why}");
    }

    #[test]
    fn tls_to_a_plain_listener_is_refused() {
        let ca = Ca::new("Ferry test CA");
        let (why, server_why) = refusal(None, Some(&config(&ca.host(), &ca.cert)));
        assert!(
            why.contains("TLS handshake with") && why.contains("closed"),
            "{why}"
        );
        assert!(
            server_why.contains("speaks TLS") && server_why.contains("TLS off"),
            "{server_why}"
        );
    }

    fn config_error(id: &Identity, ca: &str) -> String {
        load_error(TlsConfig::from_pem(
            id.cert.as_bytes(),
            id.key.as_bytes(),
            ca.as_bytes(),
        ))
    }

    /// The whole message of a refused configuration.
    fn load_error(loaded: Result<TlsConfig, TlsConfigError>) -> String {
        crate::error_chain(&loaded.expect_err("a bad configuration"))
    }

    #[test]
    fn unusable_certificates_are_explained_at_load() {
        let ca = Ca::new("Ferry test CA");
        let other = Ca::new("Another CA");
        // Not for ferry-host.
        let why = config_error(&ca.issue(&["host-a.example"], Vec::new()), &ca.cert);
        assert!(why.contains("not valid for name \"ferry-host\""), "{why}");
        // Signed by a CA this host does not trust.
        let why = config_error(&other.host(), &ca.cert);
        assert!(why.contains("UnknownIssuer"), "{why}");
        // A server-only certificate cannot serve as a client one.
        let server_only = ca.issue(&["ferry-host"], vec![ExtendedKeyUsagePurpose::ServerAuth]);
        let why = config_error(&server_only, &ca.cert);
        assert!(why.contains("as a TLS client"), "{why}");
        // Without an extended key usage it can serve as both.
        config(&ca.issue(&["ferry-host"], Vec::new()), &ca.cert);
        // A key that is not the certificate's.
        let mismatched = Identity {
            key: ca.host().key,
            ..ca.host()
        };
        let why = config_error(&mismatched, &ca.cert);
        assert!(why.contains("is not the key of"), "{why}");
        // Empty or missing files.
        let host = ca.host();
        let why = load_error(TlsConfig::from_pem(
            b"",
            host.key.as_bytes(),
            ca.cert.as_bytes(),
        ));
        assert!(why.contains("no PEM certificate"), "{why}");
        let why = load_error(TlsConfig::from_pem(
            host.cert.as_bytes(),
            b"",
            ca.cert.as_bytes(),
        ));
        assert!(why.contains("no PEM private key"), "{why}");
        let why = load_error(TlsConfig::from_pem(
            host.cert.as_bytes(),
            host.key.as_bytes(),
            b"",
        ));
        assert_eq!(
            why,
            "the TLS CA certificate holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        );
        let missing = Path::new("/nonexistent/ferry.crt");
        let loaded = TlsConfig::from_pem_files(missing, missing, missing);
        assert!(
            matches!(&loaded, Err(TlsConfigError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound),
            "{loaded:?}"
        );
        let why = load_error(loaded);
        assert!(
            why.starts_with("cannot read the TLS certificate /nonexistent/ferry.crt: "),
            "{why}"
        );
    }
}
