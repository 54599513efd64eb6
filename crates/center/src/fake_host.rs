//! A host's API for the center's tests: a listener that answers its connections in turn
//! as scripted, and gives back the requests it got.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the fake host answers one connection.
pub(crate) enum Reply {
    /// With this status line and JSON body.
    Json(&'static str, String),
    /// As [`Reply::Json`], after a pause (a VM booting, a slow host).
    Late(Duration, &'static str, String),
    /// Not at all: it reads the request and closes (an answer lost on the way).
    Nothing,
    /// As [`Reply::Json`], once the request is in and this has run (a client leaving
    /// while its request is under way).
    After(Box<dyn FnOnce() + Send>, &'static str, String),
}

impl From<(&'static str, String)> for Reply {
    fn from((status, body): (&'static str, String)) -> Self {
        Reply::Json(status, body)
    }
}

/// A host API at the address returned, answering one connection with each of `replies`
/// in turn; the requests it got (it waits up to 10 s for each connection).
pub(crate) fn fake_host<R: Into<Reply> + Send + 'static>(
    replies: Vec<R>,
) -> (SocketAddr, JoinHandle<Vec<String>>) {
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = host.local_addr().unwrap();
    host.set_nonblocking(true).unwrap();
    let requests = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for reply in replies {
            let waiting = Instant::now();
            let mut stream = loop {
                match host.accept() {
                    Ok((stream, _)) => break stream,
                    Err(_) if waiting.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => return seen,
                }
            };
            stream.set_nonblocking(false).unwrap();
            seen.push(read_request(&mut stream));
            let (status, body) = match reply.into() {
                Reply::Json(status, body) => (status, body),
                Reply::Late(pause, status, body) => {
                    std::thread::sleep(pause);
                    (status, body)
                }
                Reply::Nothing => continue,
                Reply::After(then, status, body) => {
                    then();
                    (status, body)
                }
            };
            write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            // What the client still sends is read before closing: unread, it would make
            // the close a reset, which may cut a large answer short.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
        }
        seen
    });
    (addr, requests)
}

/// Reads one HTTP request (headers and a `Content-Length` body) off `stream`.
pub(crate) fn read_request(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length || n == 0 {
                return text;
            }
        }
        if n == 0 {
            return String::from_utf8_lossy(&got).to_string();
        }
    }
}
