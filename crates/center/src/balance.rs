//! GPU load balancing. Each open host has a *pressure*: the larger of its accelerator
//! memory use (used ÷ capacity) and its accelerator load (busy devices ÷ the devices it
//! runs at full speed at once). When the spread between the most and least pressured
//! hosts exceeds the threshold, the planner repeatedly takes the busiest host and picks
//! the one move of one of its VMs to a host with room that shrinks the spread most (the
//! next busiest host's, if none of the busiest's helps). A move that leaves the spread as
//! it is but relieves a busiest host, evening the pressures out (smaller sum of squares),
//! counts too, else two equally busiest hosts would never be relieved. It stops when the
//! spread is within the threshold or no move does either.

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
    spread_of(&hosts.iter().map(pressure).collect::<Vec<_>>())
}

/// The spread of `pressures` (0 for none).
fn spread_of(pressures: &[f64]) -> f64 {
    let max = pressures.iter().copied().fold(f64::MIN, f64::max);
    let min = pressures.iter().copied().fold(f64::MAX, f64::min);
    if pressures.is_empty() {
        0.0
    } else {
        max - min
    }
}

/// The sum of squared `pressures`: smaller when they are more even, so a move that leaves
/// the spread as it is (another host as busy remains) still counts as progress.
fn unevenness(pressures: &[f64]) -> f64 {
    pressures.iter().map(|p| p * p).sum()
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

/// The pressures of `sim`'s hosts were `vm` moved from host `from` to host `to`.
fn pressures_after(
    sim: &[HostLoad],
    pressures: &[f64],
    vm: &MovableVm,
    from: usize,
    to: usize,
) -> Vec<f64> {
    let mut pair = [sim[from].clone(), sim[to].clone()];
    shift(&mut pair, vm, 0, 1);
    let mut after = pressures.to_vec();
    after[from] = pressure(&pair[0]);
    after[to] = pressure(&pair[1]);
    after
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
        let pressures: Vec<f64> = sim.iter().map(pressure).collect();
        let now = spread_of(&pressures);
        if now <= threshold {
            break;
        }
        let now_uneven = unevenness(&pressures);
        // The busiest host first; the next only if no move off it helps (its VMs may be
        // unable to move, or move only to swap the imbalance).
        let mut by_pressure: Vec<usize> = (0..sim.len()).collect();
        by_pressure.sort_by(|&a, &b| pressures[b].total_cmp(&pressures[a]).then(a.cmp(&b)));
        let top = by_pressure.first().map_or(0.0, |&h| pressures[h]);
        // (spread, unevenness) after, source, VM, destination. Each move made lowers the
        // pair (spread first), so successive plans never cycle.
        let mut best: Option<(f64, f64, usize, usize, usize)> = None;
        for &from in &by_pressure {
            for (i, vm) in placed.iter().enumerate() {
                if vm.host != sim[from].name || moves.iter().any(|m: &PlannedMove| m.vm == vm.id) {
                    continue;
                }
                for (to, room) in room.iter().enumerate() {
                    if to == from || !fits(room, &vm.need) {
                        continue;
                    }
                    let trial = pressures_after(&sim, &pressures, vm, from, to);
                    let (after, uneven) = (spread_of(&trial), unevenness(&trial));
                    // Evening out without a smaller spread only relieves a busiest host:
                    // shuffling load among the hosts in between is churn.
                    let evens = pressures[from] >= top && uneven < now_uneven - 1e-9;
                    let progress = after < now - 1e-9 || (after <= now && evens);
                    let better = best.is_none_or(|(b, b_uneven, ..)| {
                        after < b - 1e-9 || (after <= b && uneven < b_uneven - 1e-9)
                    });
                    if progress && better {
                        best = Some((after, uneven, from, i, to));
                    }
                }
            }
            if best.is_some() {
                break;
            }
        }
        let Some((_, _, from, i, to)) = best else {
            stop_reason = "no move of a VM to a host with room reduces the spread or evens \
                the pressures out further"
                .to_string();
            break;
        };
        let vm = placed[i].clone();
        shift(&mut sim, &vm, from, to);
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
    fn two_equally_busy_hosts_are_both_relieved() {
        // Moving one VM off a leaves the spread as it is (b is as busy, d as idle): the
        // plan must not stop there, with two hosts idle and two full.
        let plan = plan_for(
            &["a", "b", "c", "d"],
            &[
                vm("a1", "a", 100, 0.5),
                vm("a2", "a", 100, 0.5),
                vm("b1", "b", 100, 0.5),
                vm("b2", "b", 100, 0.5),
            ],
        );
        assert_eq!(plan.moves.len(), 2, "{plan:#?}");
        let froms: Vec<&str> = plan.moves.iter().map(|m| m.from.as_str()).collect();
        let tos: Vec<&str> = plan.moves.iter().map(|m| m.to.as_str()).collect();
        assert_eq!((froms, tos), (vec!["a", "b"], vec!["c", "d"]), "{plan:#?}");
        assert!(plan.spread_after < 0.01, "{plan:#?}");
    }

    #[test]
    fn a_host_as_busy_as_one_that_cannot_be_relieved_still_is() {
        // a's one VM would only swap the imbalance; b, as busy, can hand one VM to c.
        let plan = plan_for(
            &["a", "b", "c"],
            &[
                vm("big", "a", 100, 1.0),
                vm("b1", "b", 100, 0.5),
                vm("b2", "b", 100, 0.5),
            ],
        );
        assert_eq!(plan.moves.len(), 1, "{plan:#?}");
        assert_eq!(
            (plan.moves[0].from.as_str(), plan.moves[0].to.as_str()),
            ("b", "c"),
            "{plan:#?}"
        );
        assert!(plan.spread_after < 0.51, "{plan:#?}");
    }

    #[test]
    fn load_is_not_shuffled_among_the_hosts_in_between() {
        // a (busiest) cannot be relieved and e (idle) has no room: no move changes the
        // spread, and evening out b and c would be a migration for nothing.
        let vms = [
            vm("big", "a", 100, 1.0),
            vm("b1", "b", 100, 0.5),
            vm("b2", "b", 100, 0.25),
            vm("c1", "c", 100, 0.25),
        ];
        let hosts: Vec<HostLoad> = ["a", "b", "c", "e"]
            .iter()
            .map(|name| {
                let on: Vec<&MovableVm> = vms.iter().filter(|v| v.host == *name).collect();
                let mut h = host(name, &on);
                if *name == "e" {
                    h.memory_free = 0;
                }
                h
            })
            .collect();
        let plan = plan(&hosts, &vms, 0.2);
        assert!(plan.moves.is_empty(), "{plan:#?}");
    }

    #[test]
    fn no_hosts_no_moves_whatever_the_threshold() {
        for threshold in [0.0, -1.0, f64::NAN] {
            let plan = plan(&[], &[vm("v", "gone", 1, 0.5)], threshold);
            assert!(plan.moves.is_empty() && plan.hosts.is_empty(), "{plan:#?}");
        }
    }

    #[test]
    fn a_move_that_would_only_swap_the_imbalance_is_not_made() {
        // One big busy VM alone on a: moving it to b just makes b the busy one.
        let plan = plan_for(&["a", "b"], &[vm("big", "a", 900, 1.0)]);
        assert!(plan.moves.is_empty(), "{plan:#?}");
    }
}
