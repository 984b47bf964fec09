//! What one iteration does: from the fleet as last seen and the interval's
//! target, the steps each VM takes. Of the target about 60% are kept
//! running, 25% stopped and the rest created but never booted; before that,
//! half of the stopped VMs are deleted, so every iteration churns VMs
//! through create, boot, shutdown and delete.

use std::collections::BTreeMap;

use rand::Rng;
use rand::seq::SliceRandom;

/// A VM's state as metald last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Created,
    Running,
    Paused,
    /// Shut down, or failed (both may be booted again).
    Stopped,
}

/// Where the plan wants a VM at the end of the iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Running,
    Stopped,
    Created,
}

impl Seen {
    fn kind(self) -> Kind {
        match self {
            Seen::Created => Kind::Created,
            Seen::Running | Seen::Paused => Kind::Running,
            Seen::Stopped => Kind::Stopped,
        }
    }
}

/// One RPC of a VM's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Boot,
    Shutdown,
    Pause,
    Resume,
    Reboot,
    Delete,
    Info,
}

/// The steps of one VM, run in order; `vm` is `None` for a VM to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    pub vm: Option<String>,
    pub steps: Vec<Step>,
}

/// How many of `target` VMs to keep running, stopped and created.
pub fn mix(target: u32) -> (u32, u32, u32) {
    let running = (f64::from(target) * 0.60).round() as u32;
    let stopped = ((f64::from(target) * 0.25).round() as u32).min(target - running);
    (running, stopped, target - running - stopped)
}

/// An interval's target: 1..=max, or the upper half under heavy load.
pub fn draw_target(rng: &mut impl Rng, max: u32, heavy: bool) -> u32 {
    let low = if heavy { max.div_ceil(2) } else { 1 };
    rng.random_range(low..=max)
}

/// The work of one iteration. Every VM gets at most one `Work`, so no two
/// concurrent calls touch the same VM.
pub fn plan(
    fleet: &BTreeMap<String, Seen>,
    target: u32,
    heavy: bool,
    rng: &mut impl Rng,
) -> Vec<Work> {
    let mut by_kind: BTreeMap<Kind, Vec<String>> = BTreeMap::new();
    for (name, seen) in fleet {
        by_kind.entry(seen.kind()).or_default().push(name.clone());
    }
    for names in by_kind.values_mut() {
        names.shuffle(rng);
    }
    let mut work = Vec::new();
    // Half of the stopped VMs go.
    let stopped = by_kind.entry(Kind::Stopped).or_default();
    let gone = stopped.len() / 2;
    for name in stopped.drain(..gone) {
        work.push(Work {
            vm: Some(name),
            steps: vec![Step::Delete],
        });
    }
    let (r, s, c) = mix(target);
    let mut need: BTreeMap<Kind, u32> =
        [(Kind::Running, r), (Kind::Stopped, s), (Kind::Created, c)].into();
    // VMs already where they should be stay; the rest are surplus.
    let mut kept: Vec<(String, Kind)> = Vec::new();
    let mut surplus: Vec<(String, Kind)> = Vec::new();
    for (kind, names) in by_kind {
        for name in names {
            let n = need.get_mut(&kind).expect("every kind has a need");
            if *n > 0 {
                *n -= 1;
                kept.push((name, kind));
            } else {
                surplus.push((name, kind));
            }
        }
    }
    for (name, from) in surplus {
        let to = [Kind::Running, Kind::Stopped]
            .into_iter()
            .find(|k| need[k] > 0 && path(from, *k).is_some());
        let steps = match to {
            Some(k) => {
                *need.get_mut(&k).expect("known kind") -= 1;
                path(from, k).expect("checked")
            }
            None => vec![Step::Delete],
        };
        work.push(Work {
            vm: Some(name),
            steps,
        });
    }
    for (kind, n) in need {
        for _ in 0..n {
            let mut steps = vec![Step::Create];
            steps.extend(path(Kind::Created, kind).expect("a new VM can reach any kind"));
            work.push(Work { vm: None, steps });
        }
    }
    work.extend(churn(&kept, heavy, rng));
    work
}

/// Steps that take a VM of one kind to another (none where impossible).
fn path(from: Kind, to: Kind) -> Option<Vec<Step>> {
    match (from, to) {
        (a, b) if a == b => Some(vec![]),
        (Kind::Running, Kind::Stopped) => Some(vec![Step::Shutdown]),
        (Kind::Stopped | Kind::Created, Kind::Running) => Some(vec![Step::Boot]),
        (Kind::Created, Kind::Stopped) => Some(vec![Step::Boot, Step::Shutdown]),
        _ => None,
    }
}

/// Reads and state changes on VMs that stay where they are: one running VM
/// paused and resumed (every running VM under heavy load, and one
/// rebooted), and GetVmInfo on a few of the rest (all of them under heavy
/// load).
fn churn(kept: &[(String, Kind)], heavy: bool, rng: &mut impl Rng) -> Vec<Work> {
    let mut out = Vec::new();
    let mut pausable = 1usize;
    let mut reboots = usize::from(heavy);
    let mut reads = if heavy { usize::MAX } else { 3 };
    for (name, kind) in kept {
        let mut steps = Vec::new();
        if *kind == Kind::Running && reboots > 0 && rng.random_bool(0.5) {
            reboots -= 1;
            steps.push(Step::Reboot);
        } else if *kind == Kind::Running && (heavy || pausable > 0) {
            pausable = pausable.saturating_sub(1);
            steps.extend([Step::Pause, Step::Resume]);
        }
        if reads > 0 {
            reads -= 1;
            steps.push(Step::Info);
        }
        if !steps.is_empty() {
            out.push(Work {
                vm: Some(name.clone()),
                steps,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// The fleet after the work ran without errors.
    fn apply(fleet: &mut BTreeMap<String, Seen>, work: &[Work], next: &mut u32) {
        for w in work {
            let name = w.vm.clone().unwrap_or_else(|| {
                *next += 1;
                format!("new{next}")
            });
            for step in &w.steps {
                match step {
                    Step::Create => {
                        fleet.insert(name.clone(), Seen::Created);
                    }
                    Step::Boot | Step::Resume | Step::Reboot => {
                        fleet.insert(name.clone(), Seen::Running);
                    }
                    Step::Pause => {
                        fleet.insert(name.clone(), Seen::Paused);
                    }
                    Step::Shutdown => {
                        fleet.insert(name.clone(), Seen::Stopped);
                    }
                    Step::Delete => {
                        fleet.remove(&name);
                    }
                    Step::Info => {}
                }
            }
        }
    }

    fn count(fleet: &BTreeMap<String, Seen>, kind: Kind) -> u32 {
        fleet.values().filter(|s| s.kind() == kind).count() as u32
    }

    #[test]
    fn every_iteration_reaches_the_mix_of_its_target() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut fleet = BTreeMap::new();
        let mut next = 0;
        for heavy in [false, true] {
            for _ in 0..200 {
                let target = draw_target(&mut rng, 30, heavy);
                let work = plan(&fleet, target, heavy, &mut rng);
                let mut touched: Vec<&String> = work.iter().filter_map(|w| w.vm.as_ref()).collect();
                let n = touched.len();
                touched.sort();
                touched.dedup();
                assert_eq!(touched.len(), n, "one Work per VM");
                apply(&mut fleet, &work, &mut next);
                let (r, s, c) = mix(target);
                assert_eq!(fleet.len() as u32, target);
                assert_eq!(count(&fleet, Kind::Running), r);
                assert_eq!(count(&fleet, Kind::Stopped), s);
                assert_eq!(count(&fleet, Kind::Created), c);
            }
        }
    }

    #[test]
    fn the_mix_is_sixty_twenty_five_and_the_rest() {
        assert_eq!(mix(1), (1, 0, 0));
        assert_eq!(mix(3), (2, 1, 0));
        assert_eq!(mix(10), (6, 3, 1));
        assert_eq!(mix(30), (18, 8, 4));
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert!((15..=30).contains(&draw_target(&mut rng, 30, true)));
            assert!((1..=3).contains(&draw_target(&mut rng, 3, false)));
        }
    }

    #[test]
    fn half_of_the_stopped_are_deleted_and_replaced() {
        let mut rng = StdRng::seed_from_u64(3);
        let fleet: BTreeMap<String, Seen> = [
            ("a", Seen::Running),
            ("b", Seen::Running),
            ("c", Seen::Running),
            ("d", Seen::Running),
            ("e", Seen::Running),
            ("f", Seen::Running),
            ("g", Seen::Stopped),
            ("h", Seen::Stopped),
            ("i", Seen::Stopped),
            ("j", Seen::Created),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_owned(), s))
        .collect();
        let work = plan(&fleet, 10, false, &mut rng);
        let deletes = work.iter().filter(|w| w.steps == [Step::Delete]).count();
        assert_eq!(deletes, 1);
        let fresh: Vec<_> = work.iter().filter(|w| w.vm.is_none()).collect();
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].steps, [Step::Create, Step::Boot, Step::Shutdown]);
    }
}
