//! A center and hosts a, b, c in this process, on loopback, for the benchmarks that
//! need a cluster (`evacuate`, `serve`). Dropped, it stops them all.

use std::time::Duration;

use anyhow::Context;
use ferry_center::{CenterConfig, ClusterView};
use ferry_client::ApiClient;
use ferry_migrate::Secret;

use crate::cmd::poll_until;

/// A center and hosts a, b, c in this process, reporting to it.
pub(crate) struct LoopbackCluster {
    /// The hosts, shut down (VMs stopped, ports closed) when this is dropped.
    _daemons: Vec<crate::cmd::host::Daemon>,
    /// The center, stopped when this is dropped.
    _center: crate::cmd::center::RunningCenter,
    _runtime: tokio::runtime::Runtime,
    _db: tempfile::TempDir,
    /// The center's API, with the operator token.
    pub center: ApiClient,
    /// Its URL.
    pub center_url: String,
    /// The operator token (the gateway takes it too).
    pub token: String,
    /// Each host's name and API client.
    pub hosts: Vec<(String, ApiClient)>,
}

/// The center's database, removed on drop.
impl LoopbackCluster {
    /// Starts the center (`parallel` migrations at once) and three hosts with
    /// `host_capacity` bytes of accelerator memory each, `prefault` bytes of it backed
    /// up front (as a GPU's memory is).
    pub(crate) fn start(
        parallel: usize,
        host_capacity: u64,
        prefault: u64,
        backend: &'static str,
    ) -> anyhow::Result<Self> {
        let secret_text = Secret::generate_hex();
        let token = Secret::generate_hex();
        let secret = Secret::new(secret_text.as_bytes().to_vec())?;
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        // A folder of its own (made 0700, removed with the database in it on drop):
        // a fixed name in the shared temporary folder could be another user's.
        let db = tempfile::Builder::new()
            .prefix("ferry-bench-evacuate-")
            .tempdir()
            .context("cannot make a folder for the center's database")?;
        let center = crate::cmd::center::start(
            &runtime,
            CenterConfig {
                store: ferry_center::StoreConfig::Sqlite(db.path().join("center.db")),
                name: String::new(),
                advertise_url: String::new(),
                token: token.as_bytes().to_vec(),
                secret: secret.clone(),
                api_tokens: None,
                tls: None,
                down_after: Duration::from_secs(5),
                parallel,
                balance_threshold: 0.2,
                balance_every: None,
            },
            "127.0.0.1:0",
        )?;
        let center_url = format!("http://{}", center.addr);
        let mut hosts = Vec::new();
        let mut daemons = Vec::new();
        for name in ["a", "b", "c"] {
            let daemon =
                crate::cmd::host::start_loopback(&runtime, name, &secret, host_capacity, backend)?;
            if prefault > 0 {
                daemon
                    .host
                    .prefault_accel_memory(prefault)
                    .context("backing the hosts' accelerator memory")?;
            }
            daemon.join_center(&center_url, None, Duration::from_millis(200))?;
            let client = ApiClient::new(
                &format!("http://{}", daemon.api_addr),
                secret.token(ferry_migrate::Purpose::HostApi).as_bytes(),
            )?;
            hosts.push((name.to_string(), client));
            daemons.push(daemon);
        }
        let cluster = Self {
            _daemons: daemons,
            _center: center,
            _runtime: runtime,
            _db: db,
            center: ApiClient::new(&center_url, token.as_bytes())?,
            center_url,
            token,
            hosts,
        };
        cluster.wait("three hosts up", |v| {
            v.hosts.len() == 3 && v.hosts.iter().all(|h| h.status == "up")
        })?;
        Ok(cluster)
    }

    /// Host `name`'s API.
    pub(crate) fn host(&self, name: &str) -> &ApiClient {
        &self.hosts.iter().find(|(n, _)| n == name).expect("host").1
    }

    /// Waits (at most 2 minutes) until `check` holds of the cluster view.
    pub(crate) fn wait(
        &self,
        what: &str,
        check: impl Fn(&ClusterView) -> bool,
    ) -> anyhow::Result<()> {
        poll_until(what, Duration::from_secs(120), || {
            let view: ClusterView = self.center.get("/v1/cluster")?;
            Ok(check(&view).then_some(()))
        })
    }
}
