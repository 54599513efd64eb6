//! GPU load balancing. Each open host has a *pressure*: the larger of its accelerator
//! memory use (used ÷ capacity) and its accelerator load (busy devices ÷ the devices it
//! runs at full speed at once). When the spread between the most and least pressured
//! hosts exceeds the threshold, the planner repeatedly takes the busiest host and picks
//! the one move of one of its VMs to a host with room that shrinks the spread most; it
//! stops when the spread is within the threshold or no move shrinks it.

use serde::{Deserialize, Serialize};

use crate::inventory::HostLoad;
use crate::placement::{fits, take, Need};

/// A VM the planner may move.
#[derive(Debug, Clone)]
pub struct MovableVm {
    /// Id.
    pub id: String,
    /// Host it is on.
    pub host: String,
    /// What it needs of a host.
    pub need: Need,
    /// Its accelerator load (busy fraction).
    pub load: f64,
}

/// One move of a plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedMove {
    /// VM.
    pub vm: String,
    /// From host.
    pub from: String,
    /// To host.
    pub to: String,
    /// Its accelerator memory, bytes.
    pub accel_memory: u64,
    /// Its accelerator load.
    pub load: f64,
}

/// A host's pressure before and after the plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostPressure {
    /// Host.
    pub host: String,
    /// Before.
    pub before: f64,
    /// After.
    pub after: f64,
}

/// What `ferry center balance` would do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BalancePlan {
    /// Largest pressure spread allowed.
    pub threshold: f64,
    /// Spread now.
    pub spread_before: f64,
    /// Spread once the moves are done.
    pub spread_after: f64,
    /// Each host.
    pub hosts: Vec<HostPressure>,
    /// The moves, in order.
    pub moves: Vec<PlannedMove>,
    /// Why the plan is what it is, in words.
    pub summary: String,
}

/// A host's pressure (0 = idle, 1 = full).
pub fn pressure(host: &HostLoad) -> f64 {
    let memory = if host.accel_capacity == 0 {
        if host.accel_used > 0 {
            1.0
        } else {
            0.0
        }
    } else {
        host.accel_used as f64 / host.accel_capacity as f64
    };
    memory.max(host.accel_load / host.accel_slots.max(1.0))
}

fn spread(hosts: &[HostLoad]) -> f64 {
    let p = hosts.iter().map(pressure);
    let max = p.clone().fold(f64::MIN, f64::max);
    let min = p.fold(f64::MAX, f64::min);
    if hosts.is_empty() {
        0.0
    } else {
        max - min
    }
}

fn shift(hosts: &mut [HostLoad], vm: &MovableVm, from: usize, to: usize) {
    let src = &mut hosts[from];
    src.accel_free = src.accel_free.saturating_add(vm.need.accel);
    src.memory_free = src.memory_free.saturating_add(vm.need.memory);
    src.accel_used = src.accel_used.saturating_sub(vm.need.accel);
    src.accel_load = (src.accel_load - vm.load).max(0.0);
    take(&mut hosts[to], &vm.need);
    hosts[to].accel_load += vm.load;
}

/// Plans moves among `hosts` (open hosts only) for `vms` (running VMs on them).
pub fn plan(hosts: &[HostLoad], vms: &[MovableVm], threshold: f64) -> BalancePlan {
    let mut sim: Vec<HostLoad> = hosts.to_vec();
    sim.sort_by(|a, b| a.name.cmp(&b.name));
    // The room each move may count on: the moves run at once, so a VM leaving a host
    // frees nothing another move into it could use (its migration may not be over).
    let mut room = sim.clone();
    let before: Vec<f64> = sim.iter().map(pressure).collect();
    let spread_before = spread(&sim);
    let mut placed: Vec<MovableVm> = vms.to_vec();
    let mut moves = Vec::new();
    let mut stop_reason = String::new();
    // Each VM moves at most once, so the loop ends.
    for _ in 0..vms.len() {
        let now = spread(&sim);
        if now <= threshold {
            break;
        }
        let busiest = (0..sim.len())
            .max_by(|&a, &b| {
                pressure(&sim[a])
                    .total_cmp(&pressure(&sim[b]))
                    .then(b.cmp(&a))
            })
            .expect("spread > 0 needs hosts");
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, vm) in placed.iter().enumerate() {
            if vm.host != sim[busiest].name || moves.iter().any(|m: &PlannedMove| m.vm == vm.id) {
                continue;
            }
            for (to, room) in room.iter().enumerate() {
                if to == busiest || !fits(room, &vm.need) {
                    continue;
                }
                let mut trial = sim.clone();
                shift(&mut trial, vm, busiest, to);
                let after = spread(&trial);
                if best.is_none_or(|(b, _, _)| after < b - 1e-9) {
                    best = Some((after, i, to));
                }
            }
        }
        match best {
            Some((after, i, to)) if after < now - 1e-9 => {
                let vm = placed[i].clone();
                shift(&mut sim, &vm, busiest, to);
                take(&mut room[to], &vm.need);
                moves.push(PlannedMove {
                    vm: vm.id.clone(),
                    from: vm.host.clone(),
                    to: sim[to].name.clone(),
                    accel_memory: vm.need.accel,
                    load: vm.load,
                });
                placed[i].host = sim[to].name.clone();
            }
            _ => {
                stop_reason = format!(
                    "no move of a VM off {} with room elsewhere reduces the spread further",
                    sim[busiest].name
                );
                break;
            }
        }
    }
    let spread_after = spread(&sim);
    let summary = if spread_before <= threshold {
        format!(
            "balanced: pressure spread {spread_before:.2} is within the threshold {threshold:.2}"
        )
    } else if moves.is_empty() {
        format!("imbalanced (spread {spread_before:.2} > {threshold:.2}), but {stop_reason}")
    } else {
        format!(
            "{} move(s) bring the pressure spread from {spread_before:.2} to {spread_after:.2} (threshold {threshold:.2})",
            moves.len()
        )
    };
    BalancePlan {
        threshold,
        spread_before,
        spread_after,
        hosts: sim
            .iter()
            .zip(before)
            .map(|(h, before)| HostPressure {
                host: h.name.clone(),
                before,
                after: pressure(h),
            })
            .collect(),
        moves,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, vms: &[&MovableVm]) -> HostLoad {
        let accel_used: u64 = vms.iter().map(|v| v.need.accel).sum();
        let memory_used: u64 = vms.iter().map(|v| v.need.memory).sum();
        HostLoad {
            name: name.into(),
            accel_free: (1 << 30) - accel_used,
            memory_free: (2 << 30) - memory_used,
            accel_capacity: 1 << 30,
            accel_used,
            accel_load: vms.iter().map(|v| v.load).sum(),
            accel_slots: 1.0,
            backends: vec!["cpu".into()],
        }
    }

    fn vm(id: &str, host: &str, accel_mib: u64, load: f64) -> MovableVm {
        MovableVm {
            id: id.into(),
            host: host.into(),
            need: Need::of(128 << 20, accel_mib << 20),
            load,
        }
    }

    /// The plan, at the default threshold (0.2), for hosts `names` loaded with the VMs
    /// of `vms` on each.
    fn plan_for(names: &[&str], vms: &[MovableVm]) -> BalancePlan {
        let hosts: Vec<HostLoad> = names
            .iter()
            .map(|name| {
                let on: Vec<&MovableVm> = vms.iter().filter(|v| v.host == *name).collect();
                host(name, &on)
            })
            .collect();
        plan(&hosts, vms, 0.2)
    }

    #[test]
    fn three_busy_vms_on_one_host_spread_over_three_hosts() {
        let plan = plan_for(
            &["a", "b", "c"],
            &[
                vm("v1", "a", 256, 0.9),
                vm("v2", "a", 256, 0.9),
                vm("v3", "a", 256, 0.9),
            ],
        );
        assert_eq!(plan.moves.len(), 2, "{plan:#?}");
        assert!(plan.moves.iter().all(|m| m.from == "a"));
        let targets: Vec<&str> = plan.moves.iter().map(|m| m.to.as_str()).collect();
        assert!(
            targets.contains(&"b") && targets.contains(&"c"),
            "{targets:?}"
        );
        assert!(
            plan.spread_before > 2.0 && plan.spread_after < 0.01,
            "{plan:#?}"
        );
    }

    #[test]
    fn a_balanced_cluster_gets_no_moves() {
        let plan = plan_for(
            &["a", "b"],
            &[vm("v1", "a", 256, 0.5), vm("v2", "b", 256, 0.5)],
        );
        assert!(plan.moves.is_empty());
        assert!(plan.summary.starts_with("balanced"), "{}", plan.summary);
    }

    #[test]
    fn moves_never_exceed_capacity() {
        // b has room for no 512 MiB VM: nothing can move, and the plan says why.
        let plan = plan_for(
            &["a", "b"],
            &[
                vm("v1", "a", 512, 0.9),
                vm("v2", "a", 512, 0.9),
                vm("w", "b", 768, 0.0),
            ],
        );
        assert!(plan.moves.is_empty(), "{plan:#?}");
        assert!(plan.summary.contains("no move"), "{}", plan.summary);
    }

    #[test]
    fn no_move_counts_on_room_another_move_frees() {
        // a1 leaving a would make room there for b1; but the moves run at once, and a
        // would refuse b1 while a1 is still there.
        let vms = [
            vm("a1", "a", 500, 0.0),
            vm("a2", "a", 450, 0.0),
            vm("b1", "b", 200, 0.0),
            vm("b2", "b", 500, 0.0),
        ];
        let plan = plan_for(&["a", "b", "c"], &vms);
        assert!(!plan.moves.is_empty(), "{plan:#?}");
        let free = |name: &str| {
            let on: Vec<&MovableVm> = vms.iter().filter(|v| v.host == name).collect();
            host(name, &on).accel_free
        };
        for to in ["a", "b", "c"] {
            let arriving: u64 = (plan.moves.iter().filter(|m| m.to == to))
                .map(|m| m.accel_memory)
                .sum();
            assert!(arriving <= free(to), "{to}: {plan:#?}");
        }
    }

    #[test]
    fn a_move_that_would_only_swap_the_imbalance_is_not_made() {
        // One big busy VM alone on a: moving it to b just makes b the busy one.
        let plan = plan_for(&["a", "b"], &[vm("big", "a", 900, 1.0)]);
        assert!(plan.moves.is_empty(), "{plan:#?}");
    }
}
