//! The cluster secret and the keys derived from it, and mutual authentication of every
//! migration connection: each side proves it knows the migration key with an
//! HMAC-SHA256 over both sides' fresh random challenges, so nothing replayable or secret
//! crosses the wire. The connection role (control or data stream of a session) is bound
//! into the proof.
//!
//! The secret itself is never used as a key, never sent, and cannot be read back: each
//! use has its own key, HKDF-SHA256 of the secret with a label of its own ([`Purpose`]),
//! so a key seen in one place (a heartbeat's bearer token, say) opens nothing else.

use std::io::{Read, Write};
use std::path::Path;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::{
    peer_reason, FrameStream, Message, StreamRole, MAX_HANDSHAKE_FRAME, PROTOCOL_VERSION,
};
use crate::MigrationError;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;

/// What a key derived from the cluster secret is for. The keys are not interchangeable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Authenticating migration connections between hosts.
    Migration,
    /// Hosts' heartbeats and other requests to the center.
    Heartbeat,
    /// The cluster's own calls to a host's API (the center's, and an administrator's
    /// holding the secret); operators may have tokens of their own instead.
    HostApi,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Migration => b"ferry migration key v1",
            Self::Heartbeat => b"ferry heartbeat key v1",
            Self::HostApi => b"ferry host api key v1",
        }
    }
}

/// Why a secret was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Shorter than [`MIN_SECRET_BYTES`].
    #[error("the shared secret must be at least {MIN_SECRET_BYTES} bytes (got {got})")]
    TooShort {
        /// Its length.
        got: usize,
    },
    /// Its file could not be read.
    #[error("cannot read the secret file {}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its file holds one too short.
    #[error("the secret file {}", path.display())]
    InFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<SecretError>,
    },
}

/// The secret shared by the hosts of one cluster.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret from its bytes; at least [`MIN_SECRET_BYTES`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, SecretError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort { got: bytes.len() });
        }
        Ok(Self(bytes))
    }

    /// A secret read from a file (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let text = read_credential_file(path, MAX_SECRET_FILE_BYTES).map_err(|source| {
            SecretError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        Self::new(text.trim_ascii().to_vec()).map_err(|e| SecretError::InFile {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// A fresh random secret, hex encoded (for `ferry host serve` without one).
    pub fn generate_hex() -> String {
        nonce().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key for `purpose`: HKDF-SHA256 of the secret, with the purpose's label.
    pub fn derive(&self, purpose: Purpose) -> [u8; 32] {
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(None, &self.0)
            .expand(purpose.label(), &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        key
    }

    /// The key for `purpose` as a bearer token (lowercase hex).
    pub fn token(&self, purpose: Purpose) -> String {
        self.derive(purpose)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Largest secret file read: a file named by mistake (a log, `/dev/zero`) is refused.
const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;

/// The bytes of a credential file (a secret, a token) of at most `most` bytes; a pipe
/// (what `--secret-file <(pass show ferry)` names) is read too.
pub fn read_credential_file(path: &Path, most: u64) -> std::io::Result<Vec<u8>> {
    read_at_most(std::fs::File::open(path)?, most)
}

/// [`read_credential_file`] of a file that must be a regular one (a token file read
/// again whenever it changes): one named by mistake that is not (a FIFO nobody writes, a
/// terminal) is refused, not waited on; and so is one that every user may write, who
/// could add a credential of their own.
pub fn read_regular_credential_file(path: &Path, most: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "it is not a regular file",
        ));
    }
    if meta.permissions().mode() & 0o002 != 0 {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            "every user may write it (and so add a token): chmod o-w it",
        ));
    }
    read_at_most(file, most)
}

/// The mode of the credential file at `path` if every user may read it (a regular file
/// with `o+r`, in folders every user may enter): any of them could then act with what it
/// holds, so the daemons and the CLI warn. A pipe, a file only its owner or group reads
/// or reaches (a `0644` file in a `0700` home), or a path not there: `None`.
pub fn readable_by_everyone(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&path).ok()?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_file() || mode & 0o004 == 0 {
        return None;
    }
    let enterable =
        |dir: &Path| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0);
    path.ancestors().skip(1).all(enterable).then_some(mode)
}

/// Logs a warning when every user may read the credential file at `path`
/// ([`readable_by_everyone`]), with which they could `act` ("use its tokens").
pub fn warn_if_everyone_reads(path: &Path, act: &str) {
    if let Some(mode) = readable_by_everyone(path) {
        tracing::warn!(
            "every user of this machine may read {} (mode {mode:04o}) and {act}: chmod o-r it",
            path.display()
        );
    }
}

/// Everything `file` holds, refused past `most` bytes (nothing more is read).
fn read_at_most(file: std::fs::File, most: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(most.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > most {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it is larger than {} KiB", most >> 10),
        ));
    }
    Ok(bytes)
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("the OS random source");
    n
}

/// The side of a handshake that proves it knows the secret.
#[derive(Debug, Clone, Copy)]
enum Side {
    Listener,
    Connector,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Listener => b"ferry-migrate-v1 listener",
            Self::Connector => b"ferry-migrate-v1 connector",
        }
    }
}

/// What the proofs of a handshake cover: both sides' fresh nonces and the role the
/// connection claims.
struct Handshake {
    connector: [u8; 32],
    listener: [u8; 32],
    role: StreamRole,
}

impl Handshake {
    /// The HMAC with which `side` proves it knows `secret`: over the side's label, the
    /// other side's nonce (its challenge), its own nonce and the role.
    fn mac(&self, secret: &Secret, side: Side) -> HmacSha256 {
        let (challenge, own) = match side {
            Side::Listener => (&self.connector, &self.listener),
            Side::Connector => (&self.listener, &self.connector),
        };
        let mut mac = HmacSha256::new_from_slice(&secret.derive(Purpose::Migration))
            .expect("HMAC takes any key length");
        mac.update(side.label());
        mac.update(challenge);
        mac.update(own);
        mac.update(&postcard::to_stdvec(&self.role).expect("role encodes"));
        mac
    }

    /// The proof `side` sends.
    fn proof(&self, secret: &Secret, side: Side) -> [u8; 32] {
        self.mac(secret, side).finalize().into_bytes().into()
    }

    /// Constant-time check of `proof`, the one `side` sent.
    fn verify(&self, secret: &Secret, side: Side, proof: &[u8; 32]) -> bool {
        self.mac(secret, side).verify_slice(proof).is_ok()
    }
}

/// The connecting side: proves the secret and checks the listener's proof.
pub fn authenticate_stream_connector<S: Read + Write>(
    stream: &mut FrameStream<S>,
    secret: &Secret,
    role: StreamRole,
) -> Result<(), MigrationError> {
    // The listener has not proven who it is either until its challenge checks out.
    stream.limit_frames(MAX_HANDSHAKE_FRAME);
    connector(stream, secret, role)?;
    stream.unlimit_frames();
    Ok(())
}

/// The listening side: answers the challenge, checks the connector's proof, and returns
/// the role the connection claims. A failure is answered with a refusal before the error
/// returns.
pub fn authenticate_stream_listener<S: Read + Write>(
    stream: &mut FrameStream<S>,
    secret: &Secret,
) -> Result<StreamRole, MigrationError> {
    // An unauthenticated peer gets handshake-sized frames only.
    stream.limit_frames(MAX_HANDSHAKE_FRAME);
    let role = listener(stream, secret)?;
    stream.unlimit_frames();
    Ok(role)
}

fn connector(
    conn: &mut FrameStream<impl Read + Write>,
    secret: &Secret,
    role: StreamRole,
) -> Result<(), MigrationError> {
    let ours = nonce();
    conn.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        role,
        nonce: ours,
    })?;
    let handshake = match conn.expect_control("a challenge")? {
        Message::Challenge { nonce, proof } => {
            let handshake = Handshake {
                connector: ours,
                listener: nonce,
                role,
            };
            if !handshake.verify(secret, Side::Listener, &proof) {
                return Err(MigrationError::Auth(
                    "the destination does not know the shared secret".into(),
                ));
            }
            handshake
        }
        Message::Refuse { reason } => return Err(MigrationError::Refused(peer_reason(&reason))),
        Message::Busy { reason } => return Err(MigrationError::Busy(peer_reason(&reason))),
        other => return Err(MigrationError::unexpected("a challenge", &other)),
    };
    conn.send(&Message::Proof {
        proof: handshake.proof(secret, Side::Connector),
    })?;
    match conn.expect_control("the authentication result")? {
        Message::AuthOk => Ok(()),
        Message::Refuse { reason } => Err(MigrationError::Auth(reason)),
        other => Err(MigrationError::unexpected(
            "the authentication result",
            &other,
        )),
    }
}

fn listener(
    conn: &mut FrameStream<impl Read + Write>,
    secret: &Secret,
) -> Result<StreamRole, MigrationError> {
    let (theirs, role) = match conn.expect_control("a hello")? {
        Message::Hello {
            version,
            role,
            nonce,
        } => {
            if version != PROTOCOL_VERSION {
                let reason = format!(
                    "protocol version {version}; this host speaks version {PROTOCOL_VERSION}"
                );
                let _ = conn.send(&Message::Refuse {
                    reason: reason.clone(),
                });
                return Err(MigrationError::Refused(reason));
            }
            (nonce, role)
        }
        other => return Err(MigrationError::unexpected("a hello", &other)),
    };
    let handshake = Handshake {
        connector: theirs,
        listener: nonce(),
        role,
    };
    conn.send(&Message::Challenge {
        nonce: handshake.listener,
        proof: handshake.proof(secret, Side::Listener),
    })?;
    match conn.expect_control("a proof")? {
        Message::Proof { proof } if handshake.verify(secret, Side::Connector, &proof) => {
            conn.send(&Message::AuthOk)?;
            Ok(role)
        }
        Message::Proof { .. } => {
            let _ = conn.send(&Message::Refuse {
                reason: "wrong shared secret".into(),
            });
            Err(MigrationError::Auth(
                "the peer does not know the shared secret".into(),
            ))
        }
        other => Err(MigrationError::unexpected("a proof", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_secret_file_is_read_up_to_a_bound_and_may_be_a_pipe() {
        let e = crate::vm::error_chain(&Secret::from_file(Path::new("/dev/zero")).unwrap_err());
        assert_eq!(
            e,
            "cannot read the secret file /dev/zero: it is larger than 64 KiB"
        );
        // A pipe, as a shell's process substitution gives.
        let dir = ferry_testdata::scratch_dir("secret-pipe");
        let fifo = dir.join("secret");
        ferry_testdata::make_fifo(&fifo);
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, "0123456789abcdef0123\n").unwrap())
        };
        let secret = Secret::from_file(&fifo).unwrap();
        writer.join().unwrap();
        assert_eq!(
            secret.derive(Purpose::HostApi),
            Secret::new("0123456789abcdef0123")
                .unwrap()
                .derive(Purpose::HostApi)
        );
    }

    #[test]
    fn a_credential_file_every_user_may_read_is_told_apart() {
        use std::os::unix::fs::PermissionsExt;
        let dir = ferry_testdata::scratch_dir("secret-mode");
        let file = dir.join("secret");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        let chmod = |mode| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode));
        chmod(0o644).unwrap();
        assert_eq!(readable_by_everyone(&file), Some(0o644));
        chmod(0o604).unwrap();
        assert_eq!(readable_by_everyone(&file), Some(0o604));
        for private in [0o600, 0o640, 0o400] {
            chmod(private).unwrap();
            assert_eq!(readable_by_everyone(&file), None, "{private:o}");
        }
        // In a folder only its owner may enter, nobody else reaches it.
        chmod(0o644).unwrap();
        let folder = |mode| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode));
        folder(0o700).unwrap();
        assert_eq!(readable_by_everyone(&file), None);
        folder(0o755).unwrap();
        assert_eq!(readable_by_everyone(&file), Some(0o644));
        // A pipe (process substitution) is nobody else's, and a missing path is no file.
        let fifo = dir.join("fifo");
        ferry_testdata::make_fifo(&fifo);
        std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(readable_by_everyone(&fifo), None);
        assert_eq!(readable_by_everyone(&dir.join("missing")), None);
    }

    fn run(
        listener_secret: &str,
        connector_secret: &str,
    ) -> (
        Result<(), MigrationError>,
        Result<StreamRole, MigrationError>,
    ) {
        let (a, b) = UnixStream::pair().unwrap();
        let ls = Secret::new(listener_secret.as_bytes()).unwrap();
        let cs = Secret::new(connector_secret.as_bytes()).unwrap();
        let listener = std::thread::spawn(move || {
            authenticate_stream_listener(&mut FrameStream::new(b, false), &ls)
        });
        let mut conn = FrameStream::new(a, false);
        let role = StreamRole::Data {
            session: 7,
            index: 1,
        };
        let c = authenticate_stream_connector(&mut conn, &cs, role);
        drop(conn);
        (c, listener.join().unwrap())
    }

    #[test]
    fn each_purpose_has_its_own_key_and_none_is_the_secret() {
        let secret = Secret::new(b"a-cluster-secret-of-some-length".to_vec()).unwrap();
        let keys =
            [Purpose::Migration, Purpose::Heartbeat, Purpose::HostApi].map(|p| secret.derive(p));
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[1], keys[2]);
        assert_ne!(keys[0], keys[2]);
        for key in &keys {
            assert!(!key.windows(16).any(|w| w == &secret.0[..16]));
        }
        // Derivation is a function of the secret alone (both ends agree).
        let again = Secret::new(b"a-cluster-secret-of-some-length".to_vec()).unwrap();
        assert_eq!(
            again.token(Purpose::HostApi),
            secret.token(Purpose::HostApi)
        );
        assert_eq!(secret.token(Purpose::HostApi).len(), 64);
        let other = Secret::new(b"another-cluster-secret-entirely".to_vec()).unwrap();
        assert_ne!(other.derive(Purpose::Migration), keys[0]);
    }

    #[test]
    fn same_secret_passes_both_ways() {
        let (c, l) = run(
            "correct horse battery staple",
            "correct horse battery staple",
        );
        c.unwrap();
        assert_eq!(
            l.unwrap(),
            StreamRole::Data {
                session: 7,
                index: 1
            }
        );
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let (c, l) = run(
            "correct horse battery staple",
            "wrong horse battery staple!!",
        );
        // The connector sees the listener fail its proof first.
        assert!(matches!(c, Err(MigrationError::Auth(_))), "{c:?}");
        assert!(l.is_err());
    }

    #[test]
    fn streams_authenticate_like_split_connections() {
        for (listener_secret, connector_secret, ok) in [
            (
                "correct horse battery staple",
                "correct horse battery staple",
                true,
            ),
            (
                "correct horse battery staple",
                "wrong horse battery staple!!",
                false,
            ),
        ] {
            let (a, b) = UnixStream::pair().unwrap();
            let ls = Secret::new(listener_secret.as_bytes()).unwrap();
            let cs = Secret::new(connector_secret.as_bytes()).unwrap();
            let listener = std::thread::spawn(move || {
                authenticate_stream_listener(&mut FrameStream::new(b, false), &ls)
            });
            let c = authenticate_stream_connector(
                &mut FrameStream::new(a, false),
                &cs,
                StreamRole::Control,
            );
            let l = listener.join().unwrap();
            assert_eq!(c.is_ok(), ok, "{c:?}");
            assert_eq!(l.ok(), ok.then_some(StreamRole::Control));
        }
    }

    #[test]
    fn short_secrets_are_rejected() {
        assert!(Secret::new("short").is_err());
    }
}
