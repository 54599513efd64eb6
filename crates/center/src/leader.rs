//! Leadership among center replicas that share an etcd store. Each replica campaigns
//! for one key, `{prefix}leader`, created under a lease it keeps alive: whoever creates
//! it leads until its lease ends. Every write the leader makes compares the key's
//! creation revision (the store's [`Fence`]), so a leader that was paused past its lease
//! (and replaced) changes nothing when it wakes; it finds out and follows.
//!
//! Followers serve reads from their own views (they take the hosts' heartbeats too),
//! refresh what only the leader writes from the store, and forward writes to the leader.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::etcd::{Compare, Op};
use crate::store::{EtcdStore, Fence};
use crate::Center;

/// A leader's lease: it leads at most this long after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(4);
/// How often the leader renews its lease, and followers look for a vacancy.
const TICK: Duration = Duration::from_millis(500);
/// A leader stops counting itself one as long before its lease ends by its own clock
/// (measured from when it asked for the renewal), against clock drift.
const LEAD_MARGIN: Duration = Duration::from_millis(500);
/// How often a follower reloads what the leader writes.
const REFRESH: Duration = Duration::from_secs(1);

/// This replica's part.
#[derive(Debug, Clone)]
pub enum Role {
    /// It writes the store and runs operations.
    Leader,
    /// It serves reads and forwards writes to the leader (if one is known).
    Follower {
        /// The leader.
        leader: Option<LeaderInfo>,
    },
}

/// Who leads: the value of the leader key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// Replica name.
    pub name: String,
    /// Its API.
    pub url: String,
}

/// The election's state in this replica.
struct Campaign {
    lease: Option<i64>,
    /// Leading since the lease was last renewed at this instant.
    renewed: BootInstant,
}

impl Center {
    /// Runs the election until `stop` closes (the monitor's stop channel): campaigns,
    /// renews the lease while leading, steps down when it cannot, and keeps a
    /// follower's view of the leader's writes fresh.
    pub(crate) fn run_election(self: &Arc<Self>, stop: &Receiver<()>) {
        let Some(store) = self.store.as_etcd() else {
            return;
        };
        let mut campaign = Campaign {
            lease: None,
            renewed: BootInstant::now(),
        };
        let mut refreshed = Instant::now();
        loop {
            if matches!(*self.role.lock().expect("role lock"), Role::Leader) {
                self.renew(store, &mut campaign);
            } else {
                self.campaign(store, &mut campaign);
                if !self.is_leader() && refreshed.elapsed() >= REFRESH {
                    refreshed = Instant::now();
                    if let Err(e) = self.refresh_from_store() {
                        tracing::debug!("refreshing from the store: {e}");
                    }
                }
            }
            if stop.recv_timeout(TICK) != Err(RecvTimeoutError::Timeout) {
                // Stop leading here first, then hand the lead over at once rather than
                // after the lease: the next leader may win the moment it is revoked.
                store.set_fence(None);
                *self.role.lock().expect("role lock") = Role::Follower { leader: None };
                if let Some(lease) = campaign.lease {
                    let _ = store.etcd().revoke_lease(lease);
                }
                return;
            }
        }
    }

    fn campaign(self: &Arc<Self>, store: &EtcdStore, campaign: &mut Campaign) {
        let key = store.key("leader");
        let me = LeaderInfo {
            name: self.config.name.clone(),
            url: self.config.advertise_url.clone(),
        };
        let lease = match campaign.lease {
            Some(lease) => lease,
            None => match store.etcd().grant_lease(LEASE_TTL) {
                Ok(lease) => {
                    campaign.lease = Some(lease);
                    campaign.renewed = BootInstant::now();
                    lease
                }
                Err(e) => {
                    tracing::debug!("no lease to campaign with: {e}");
                    return;
                }
            },
        };
        // Keep the lease alive while waiting, so a win is not lost to its expiry.
        let asked = BootInstant::now();
        match store.etcd().keep_alive(lease) {
            Ok(true) => campaign.renewed = asked,
            Ok(false) | Err(_) => {
                campaign.lease = None;
                return;
            }
        }
        let value = serde_json::to_vec(&me).expect("leader info serializes");
        let outcome = store.etcd().txn(
            &[Compare::CreateRevision(key.clone(), 0)],
            &[
                Op::Put {
                    key: key.clone(),
                    value,
                    lease: Some(lease),
                },
                Op::Get(key.clone()),
            ],
            &[Op::Get(key.clone())],
        );
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!("campaigning: {e}");
                return;
            }
        };
        let holder = outcome.read.first();
        // An earlier attempt whose answer was lost may have made the key ours: it is
        // ours only under this lease. Another replica may go by the same name and URL
        // (both left to default to a listen address like 0.0.0.0:7000), and a key put
        // under a lease this replica no longer renews ends with that lease.
        let ours = holder.is_some_and(|kv| kv.lease == lease);
        if outcome.succeeded || ours {
            let Some(kv) = holder else { return };
            store.set_fence(Some(Fence {
                key,
                create_revision: kv.create_revision,
                cluster: outcome.cluster,
            }));
            self.lead_until(asked + LEASE_TTL - LEAD_MARGIN);
            tracing::info!(
                "center {} is the leader (lease {lease:x})",
                self.config.name
            );
            if let Err(e) = self.lead() {
                tracing::error!("taking the lead: {e}");
                self.step_down(store, campaign, "it could not load the store");
            }
        } else {
            let leader = holder.and_then(|kv| serde_json::from_slice::<LeaderInfo>(&kv.value).ok());
            *self.role.lock().expect("role lock") = crate::leader::Role::Follower { leader };
        }
    }

    fn renew(&self, store: &EtcdStore, campaign: &mut Campaign) {
        let Some(lease) = campaign.lease else {
            self.step_down(store, campaign, "it holds no lease");
            return;
        };
        let asked = BootInstant::now();
        let lapsed_at = campaign.renewed + LEASE_TTL - LEAD_MARGIN;
        match store.etcd().keep_alive(lease) {
            Ok(true) => {
                // A renewal that came back after the lead ran out by this clock: the
                // operations of this term may have seen it end and stopped, each leaving
                // the rest to a next term's leader. Leading on in this term, no one would
                // resume them; a new term (a new campaign) does. Checked before the lead
                // is extended: extended first, the term lived again for a moment, in
                // which a stopped operation could still write itself off as incomplete.
                if BootInstant::now() >= lapsed_at {
                    self.step_down(
                        store,
                        campaign,
                        "its lead ran out before its lease was renewed",
                    );
                    return;
                }
                campaign.renewed = asked;
                self.lead_until(asked + LEASE_TTL - LEAD_MARGIN);
            }
            Ok(false) => self.step_down(store, campaign, "its lease expired"),
            // Unsure whether the lease lives: step down before it could have ended.
            Err(e) if campaign.renewed.elapsed() + TICK * 2 >= LEASE_TTL => {
                self.step_down(store, campaign, &format!("it cannot renew its lease: {e}"))
            }
            Err(_) => {}
        }
        // A write refused by the fence cleared it: someone else leads.
        if self.is_leader() && !store.fenced() {
            self.step_down(store, campaign, "a write found another leader");
        }
    }

    fn step_down(&self, store: &EtcdStore, campaign: &mut Campaign, why: &str) {
        tracing::warn!("center {} is no longer the leader: {why}", self.config.name);
        store.set_fence(None);
        // Following before the lease goes: a next leader may win the moment it does, and
        // a revoke can wait seconds on a struggling etcd.
        *self.role.lock().expect("role lock") = Role::Follower { leader: None };
        // The key goes now rather than at the lease's end (if etcd is reachable).
        if let Some(lease) = campaign.lease.take() {
            let _ = store.etcd().revoke_lease(lease);
        }
    }
}

/// An instant of the boot clock (`CLOCK_BOOTTIME`), which counts the time the machine
/// was suspended, as etcd's lease clock on another machine does: a replica that slept
/// past its lease (a suspended VM, a laptop lid) wakes knowing its lead ran out.
/// [`Instant`] stops during a suspend on Linux, and would have it lead on at waking
/// while another replica leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BootInstant(Duration);

impl BootInstant {
    /// Now.
    pub(crate) fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes one timespec; CLOCK_BOOTTIME exists on every Linux since 2.6.39.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        assert_eq!(rc, 0, "CLOCK_BOOTTIME: {}", std::io::Error::last_os_error());
        Self(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// Time since this instant (zero for one in the future).
    pub(crate) fn elapsed(self) -> Duration {
        Self::now().0.saturating_sub(self.0)
    }
}

impl std::ops::Add<Duration> for BootInstant {
    type Output = Self;
    fn add(self, d: Duration) -> Self {
        Self(self.0 + d)
    }
}

impl std::ops::Sub<Duration> for BootInstant {
    type Output = Self;
    fn sub(self, d: Duration) -> Self {
        Self(self.0.saturating_sub(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_etcd::TestEtcd;
    use crate::StoreConfig;

    /// A replica on `etcd`, under `prefix`, that has not campaigned yet.
    fn replica(etcd: &TestEtcd, prefix: &str) -> Arc<Center> {
        let store = StoreConfig::Etcd {
            endpoints: vec![etcd.endpoint.clone()],
            prefix: prefix.into(),
        };
        Center::open(crate::tests::test_config(store)).unwrap()
    }

    #[test]
    fn the_boot_clock_advances_with_time_and_adds_as_instants_do() {
        let before = BootInstant::now();
        std::thread::sleep(Duration::from_millis(20));
        let after = BootInstant::now();
        assert!(after > before);
        assert!(before.elapsed() >= Duration::from_millis(20));
        assert!(before + Duration::from_millis(20) <= after);
        assert!(after - Duration::from_millis(20) >= before);
        // A lead's end in the future has not come; one in the past has.
        assert!(BootInstant::now() < after + LEASE_TTL);
        assert!(BootInstant::now() >= after - LEASE_TTL);
        assert_eq!((after + LEASE_TTL).elapsed(), Duration::ZERO);
        // Never before the boot.
        assert_eq!(
            after - Duration::from_secs(u32::MAX.into()),
            BootInstant(Duration::ZERO)
        );
    }

    /// `center` campaigns once, wins, and returns its campaign.
    fn win(center: &Arc<Center>) -> Campaign {
        let mut campaign = Campaign {
            lease: None,
            renewed: BootInstant::now(),
        };
        center.campaign(center.store.as_etcd().unwrap(), &mut campaign);
        assert!(center.is_leader(), "a lone replica wins");
        campaign
    }

    #[test]
    fn a_lead_that_ran_out_before_its_renewal_came_back_ends_its_term() {
        let test = "a_lead_that_ran_out_before_its_renewal_came_back_ends_its_term";
        let Some(etcd) = TestEtcd::start(test) else {
            return;
        };
        let center = replica(&etcd, "/lapse/");
        let store = center.store.as_etcd().unwrap();
        let mut campaign = win(&center);
        let term = center.term().unwrap();
        // The last renewal was asked for a lease's length ago (etcd was slow to answer,
        // or the store slow to load at the win): the lead ran out by this replica's
        // clock, and its operations of this term stopped. The lease itself lives.
        campaign.renewed = BootInstant::now() - LEASE_TTL;
        center.lead_until(campaign.renewed + LEASE_TTL - LEAD_MARGIN);
        assert_eq!(center.term(), None);
        center.renew(store, &mut campaign);
        assert_ne!(
            center.term(),
            Some(term),
            "it leads on in a term whose operations stopped, and no one resumes them"
        );
        // It campaigns again, and leads in a new term (whose lead resumes them).
        center.campaign(store, &mut campaign);
        assert!(center.term().is_some_and(|t| t > term));
    }

    #[test]
    fn a_replica_whose_lead_ran_out_orders_no_host_though_its_fence_is_there() {
        let test = "a_replica_whose_lead_ran_out_orders_no_host_though_its_fence_is_there";
        let Some(etcd) = TestEtcd::start(test) else {
            return;
        };
        let center = replica(&etcd, "/orders/");
        let campaign = win(&center);
        let beat = crate::inventory::tests::beat("h", Vec::new());
        let host = crate::inventory::HostRecord {
            name: "h".into(),
            api_url: beat.api_url,
            info: beat.host,
            mode: crate::inventory::HostMode::Active,
            last_heartbeat_ms: 0,
            joined_ms: 0,
        };
        assert!(center.order_client(&host).is_ok(), "the leader orders");
        // Its renewal is late (etcd slow): by its own clock it leads no more, and another
        // replica may win once the lease ends, though its fence has not been cleared yet.
        center.lead_until(campaign.renewed);
        assert!(center.store.as_etcd().unwrap().term().is_some());
        let refused = center.order_client(&host).err();
        assert!(
            matches!(
                refused,
                Some(crate::CenterError::Store(
                    crate::store::StoreError::NotLeader
                ))
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn a_replica_follows_before_its_lease_goes() {
        let test = "a_replica_follows_before_its_lease_goes";
        let Some(etcd) = TestEtcd::start(test) else {
            return;
        };
        let center = replica(&etcd, "/handover/");
        center.start_monitor().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !center.is_leader() {
            assert!(Instant::now() < deadline, "a lone replica leads");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Stopped (the replica shuts down): its lease is revoked and another replica may
        // lead at once; this one leads no more.
        center.shutdown();
        assert!(!center.is_leader(), "it still leads after handing over");
        assert!(center.term().is_none());

        // Stepping down on a struggling etcd (stopped here: the revoke waits for its
        // timeout), it follows at once, not once the revoke gives up.
        let center = replica(&etcd, "/stepdown/");
        let store = center.store.as_etcd().unwrap();
        let mut campaign = win(&center);
        // SAFETY: signals the test's own etcd child, which is continued below.
        assert_eq!(unsafe { libc::kill(etcd.pid(), libc::SIGSTOP) }, 0);
        let led_while_revoking = std::thread::scope(|scope| {
            let stepping = scope.spawn(|| center.step_down(store, &mut campaign, "a test"));
            std::thread::sleep(Duration::from_millis(500));
            let leads = center.is_leader();
            // SAFETY: as above.
            assert_eq!(unsafe { libc::kill(etcd.pid(), libc::SIGCONT) }, 0);
            stepping.join().unwrap();
            leads
        });
        assert!(
            !led_while_revoking,
            "it led on while its lease was being revoked"
        );
        assert!(!center.is_leader());
    }
}
