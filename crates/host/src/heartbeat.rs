//! Heartbeats to the cluster center: every interval the host posts its capacity, load
//! and VMs to `POST {center}/v1/heartbeat`, authenticated with the heartbeat key derived
//! from the cluster's shared secret: in full first, then only the VMs that changed. The
//! center marks a host down when they stop.

use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use ferry_api::{BeatAnswer, BeatSeries};

use crate::Host;

/// The largest answer to a heartbeat read: a center's answer is a few fields and the
/// IDs of this host's VMs it skipped (tens of thousands fit). The client's usual limit
/// (256 MiB) let a broken center, or whatever answers at its address, make the host
/// read and hold that much on every beat.
const MAX_BEAT_ANSWER_BYTES: u64 = 4 << 20;
/// Time a heartbeat's answer has to come whole: the client's usual minute.
const BEAT_ANSWER_TIME: Duration = Duration::from_secs(60);

/// Where and how often a host reports to its center.
#[derive(Debug, Clone)]
pub struct CenterLink {
    /// The center's API (`http://HOST:PORT`).
    pub center_url: String,
    /// This host's API as the center reaches it.
    pub api_url: String,
    /// This host's migration address as peers reach it.
    pub migration_addr: String,
    /// Time between heartbeats.
    pub interval: Duration,
}

/// The machine's one-minute load average, from `/proc/loadavg`.
pub fn load_average() -> Option<f64> {
    use procfs::Current;
    procfs::LoadAverage::current()
        .ok()
        .map(|l| f64::from(l.one))
}

/// Sends heartbeats from a thread of their own to each center replica in
/// `link.center_url` (comma-separated), until the host shuts down: every replica keeps
/// its own view, and a slow or stopped one delays no other. A center that cannot be
/// reached is logged once per outage, not per beat.
pub fn start(host: Arc<Host>, link: CenterLink) -> std::io::Result<()> {
    host.set_center(&link.center_url);
    for url in link
        .center_url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        let (stop, thread) = beat_to(host.clone(), &link, url)?;
        host.keep_heartbeat(stop, thread);
    }
    Ok(())
}

/// The heartbeat thread for the center at `url`.
fn beat_to(
    host: Arc<Host>,
    link: &CenterLink,
    url: &str,
) -> std::io::Result<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)> {
    let token = host
        .config()
        .secret
        .token(ferry_migrate::Purpose::Heartbeat);
    let roots = crate::cluster_roots(host.config().tls.as_ref());
    let client = ferry_client::ApiClient::with_roots(url, token.as_bytes(), &roots)
        .map_err(std::io::Error::other)?;
    let mut series_name = [0u8; 8];
    getrandom::fill(&mut series_name).map_err(|e| std::io::Error::other(e.to_string()))?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let link = CenterLink {
        center_url: url.to_string(),
        ..link.clone()
    };
    let thread = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let mut reachable = None;
            let mut series = BeatSeries::new(u64::from_le_bytes(series_name));
            // Whether the last beat was already a resend at once: a center refusing
            // every beat must not be answered in a tight loop.
            let mut resent = false;
            loop {
                let (vms, creating) = host.beat_report();
                let mut beat =
                    series.beat(link.api_url.clone(), host.info(&link.migration_addr), vms);
                beat.creating = creating;
                let sent = client.post_within_time::<_, BeatAnswer>(
                    "/v1/heartbeat",
                    &beat,
                    MAX_BEAT_ANSWER_BYTES,
                    BEAT_ANSWER_TIME,
                );
                series.answered(sent.as_ref().ok());
                if let Ok(BeatAnswer {
                    leader_term: Some(term),
                    ..
                }) = &sent
                {
                    // Learnt here, a new leader's term fences its predecessor's orders
                    // before the new leader has sent any.
                    let _ = host.follow_leader_term(*term);
                }
                if matches!(sent, Ok(BeatAnswer { taken: false, .. })) && !resent {
                    // The center needs the whole picture: send it now, not in a second
                    // (unless the host is being stopped).
                    resent = true;
                    if stopped.try_recv() != Err(TryRecvError::Empty) {
                        return;
                    }
                    continue;
                }
                resent = false;
                match (&sent, reachable) {
                    (Ok(_), Some(true)) | (Err(_), Some(false)) => {}
                    (Ok(_), _) => tracing::info!(center = %link.center_url, "reporting to the center"),
                    (Err(e), _) => tracing::warn!(center = %link.center_url, "the center is not taking heartbeats: {e:#}"),
                }
                reachable = Some(sent.is_ok());
                if stopped.recv_timeout(link.interval) != Err(RecvTimeoutError::Timeout) {
                    return;
                }
            }
        })?;
    Ok((stop, thread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_enormous_answer_to_a_heartbeat_is_not_read_whole() {
        use std::io::{BufReader, Write};
        let host = crate::tests::test_host();
        // A "center" that answers a beat with a valid answer padded to far more than
        // the kernel's buffers hold, and says whether the host took all of it.
        const ANSWER: usize = 64 << 20;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (told, taken) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Ok((conn, _)) = listener.accept() else {
                return;
            };
            if ferry_testdata::read_http_request(&mut BufReader::new(&conn)).is_none() {
                return;
            }
            let mut answer = br#"{"taken":true}"#.to_vec();
            answer.resize(ANSWER, b' ');
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {ANSWER}\r\n\r\n"
            );
            let mut conn = conn;
            let whole = conn
                .write_all(head.as_bytes())
                .and_then(|()| conn.write_all(&answer))
                .and_then(|()| conn.flush());
            // Whole: the host read it to the end (the kernel holds far less).
            let _ = told.send(whole.is_ok());
        });
        start(
            host.clone(),
            CenterLink {
                center_url: url,
                api_url: "http://127.0.0.1:1".into(),
                migration_addr: "127.0.0.1:1".into(),
                interval: Duration::from_secs(3600),
            },
        )
        .unwrap();
        let whole = taken.recv_timeout(Duration::from_secs(60));
        host.shutdown();
        assert_eq!(
            whole,
            Ok(false),
            "the host read a {ANSWER}-byte heartbeat answer to its end"
        );
    }
}
