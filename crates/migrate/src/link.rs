//! One migration connection as a single object that both reads and writes: plain TCP,
//! or a TLS session over TCP. Each connection is used by one thread at a time (the
//! control connection request/response, a data connection one way after its
//! authentication), so it needs no lock.

use std::io::{self, BufReader, BufWriter, IoSlice, Read, Write};
use std::net::TcpStream;

use crate::tls::TlsStream;

/// A migration connection.
pub(crate) enum Link {
    /// Plain TCP: a read half and a write half (clones of one socket), each buffered,
    /// exactly as the engine used them before TLS existed.
    Plain {
        input: BufReader<TcpStream>,
        output: BufWriter<TcpStream>,
    },
    /// TLS: the one session (it cannot be split), with writes buffered so a frame's
    /// header and payload share records; rustls buffers what it decrypts.
    Tls(Box<BufWriter<TlsStream>>),
}

impl Link {
    /// Plain TCP over `stream`, with buffers of the given sizes.
    pub(crate) fn plain(
        stream: TcpStream,
        read_buffer: usize,
        write_buffer: usize,
    ) -> io::Result<Self> {
        Ok(Self::Plain {
            input: BufReader::with_capacity(read_buffer, stream.try_clone()?),
            output: BufWriter::with_capacity(write_buffer, stream),
        })
    }

    /// An established TLS session, with a write buffer of `write_buffer` bytes.
    pub(crate) fn tls(stream: TlsStream, write_buffer: usize) -> Self {
        Self::Tls(Box::new(BufWriter::with_capacity(write_buffer, stream)))
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // What was written must leave before waiting for the answer to it.
        match self {
            Self::Plain { input, output } => {
                if !output.buffer().is_empty() {
                    output.flush()?;
                }
                input.read(buf)
            }
            Self::Tls(tls) => {
                if !tls.buffer().is_empty() {
                    tls.flush()?;
                }
                tls.get_mut().read(buf)
            }
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain { output, .. } => output.write(buf),
            Self::Tls(tls) => tls.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Plain { output, .. } => output.write_vectored(bufs),
            Self::Tls(tls) => tls.write_vectored(bufs),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Plain { output, .. } => output.write_all(buf),
            Self::Tls(tls) => tls.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain { output, .. } => output.flush(),
            Self::Tls(tls) => tls.flush(),
        }
    }
}
