//! Planning for one Server's guest: pure functions from what the API wants and what the
//! host shows to what to do and what to report. No I/O happens here.
//!
//! [`plan`] compares [`Desired`] (from the Server) with the VM the driver observed:
//!
//! | wanted        | observed                       | actions                            |
//! |---------------|--------------------------------|------------------------------------|
//! | deleting      | any VM / none                  | destroy / —, then drop finalizer   |
//! | Running       | none, `Stopped`                | start (a first or asked-for boot)  |
//! | Running       | `Crashed`                      | restart unless `Manual`            |
//! | Running       | `PoweredOff` (guest's own)     | restart only with `Always`         |
//! | Running       | `Running` + reboot requested   | reset                              |
//! | Stopped       | anything that is not `Stopped` | stop (ACPI, then force)            |
//!
//! "Stopped on its own" is read from the driver's state, never remembered: `Crashed` is a
//! hypervisor that died without a clean exit; `PoweredOff` is a guest that ended cleanly
//! while it was meant to run, which the driver tells from a VM stopped on request. A
//! restart counts in `status.host.restartCount` and records `lastExitReason`.
//!
//! [`host_status`] turns the VM observed after acting into `status.host` and the
//! `GuestRunning` condition; [`needs_write`] says whether that differs from what the
//! Server already says, so a host with many idle servers writes nothing on a resync.

use ferro_api::v1;
use ferro_api::v1::condition::Status as ConditionStatus;
use ferro_api::v1::server_host_status::PowerState as HostPower;
use ferro_api::v1::server_spec::{PowerState, RunStrategy};

use crate::hypervisor::{VmState, VmStatus};
use crate::node::condition;

/// The annotation asking for a reboot; its value (a timestamp) is recorded in
/// `status.host.lastReboot` once the guest was reset.
pub const REBOOT_ANNOTATION: &str = "ferro.io/reboot-requested-at";

/// The condition type the agent owns on a Server.
pub const GUEST_RUNNING: &str = "GuestRunning";

/// The hypervisor kind reported in `status.host.hypervisor`.
pub const HYPERVISOR: &str = "QEMU";

/// What the API wants of one Server's guest, reduced to what planning needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// The Server is being deleted.
    pub deleting: bool,
    /// The Server carries the agent's finalizer.
    pub holds_finalizer: bool,
    /// Whether the guest should run.
    pub power: PowerState,
    /// What to do when it stops on its own.
    pub run_strategy: RunStrategy,
    /// A reboot request not yet performed: the annotation's value when it differs from
    /// `status.host.lastReboot`.
    pub reboot: Option<String>,
}

impl Desired {
    /// What `server` asks for. Unset enums take their defaults (Running, Always).
    pub fn of(server: &v1::Server) -> Desired {
        let meta = server.metadata.clone().unwrap_or_default();
        let spec = server.spec.clone().unwrap_or_default();
        let last_reboot = server
            .status
            .as_ref()
            .and_then(|s| s.host.as_ref())
            .map(|h| h.last_reboot.as_str())
            .unwrap_or_default();
        let reboot = meta
            .annotations
            .get(REBOOT_ANNOTATION)
            .filter(|v| !v.is_empty() && v.as_str() != last_reboot)
            .cloned();
        Desired {
            deleting: meta.deletion_timestamp.is_some(),
            holds_finalizer: meta
                .finalizers
                .iter()
                .any(|f| f == ferro_api::auth::AGENT_FINALIZER),
            power: match spec.power_state.map(PowerState::try_from) {
                Some(Ok(PowerState::Stopped)) => PowerState::Stopped,
                _ => PowerState::Running,
            },
            run_strategy: match spec.run_strategy.map(RunStrategy::try_from) {
                Some(Ok(strategy @ (RunStrategy::RerunOnFailure | RunStrategy::Manual))) => {
                    strategy
                }
                _ => RunStrategy::Always,
            },
            reboot,
        }
    }
}

/// How a guest stopped on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Its hypervisor died without a clean exit.
    Crashed(Option<String>),
    /// It powered itself off.
    PoweredOff,
}

impl Exit {
    /// The text for `status.host.lastExitReason`.
    pub fn describe(&self) -> String {
        match self {
            Exit::Crashed(Some(detail)) => {
                format!("Crashed: QEMU ended without a clean exit ({detail})")
            }
            Exit::Crashed(None) => "Crashed: QEMU ended without a clean exit".to_owned(),
            Exit::PoweredOff => "GuestShutdown: the guest powered itself off".to_owned(),
        }
    }
}

/// One step towards the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start the VM (creating it if needed; adopting it if it runs).
    Start,
    /// Stop it: ACPI power button, then force after the grace period.
    Stop,
    /// Reset it, performing this reboot request.
    Reset(String),
    /// End it at once and remove everything it has on the host.
    Destroy,
    /// Remove the agent's finalizer from the Server.
    RemoveFinalizer,
}

/// What to do for one Server, and what it means.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The steps, in order.
    pub actions: Vec<Action>,
    /// The guest had stopped on its own while it was meant to run.
    pub exit: Option<Exit>,
    /// The [`Action::Start`] in `actions` restarts it after `exit`.
    pub restart: bool,
    /// A reboot request with nothing to reset (the guest is down, or boots anyway): it
    /// is recorded as done.
    pub reboot_without_reset: Option<String>,
}

/// How the guest of a Server that should run ended, if the observation shows it ended.
fn exit_of(observed: Option<&VmStatus>) -> Option<Exit> {
    match observed.map(|vm| vm.state) {
        Some(VmState::Crashed) => Some(Exit::Crashed(observed.and_then(|vm| vm.detail.clone()))),
        Some(VmState::PoweredOff) => Some(Exit::PoweredOff),
        _ => None,
    }
}

/// Plans one reconcile of a Server's guest.
pub fn plan(desired: &Desired, observed: Option<&VmStatus>) -> Plan {
    let mut plan = Plan::default();
    let state = observed.map(|vm| vm.state);
    if desired.deleting {
        if observed.is_some() {
            plan.actions.push(Action::Destroy);
        }
        if desired.holds_finalizer {
            plan.actions.push(Action::RemoveFinalizer);
        }
        return plan;
    }
    match desired.power {
        PowerState::Running => {
            plan.exit = exit_of(observed);
            // Crashed is a failure; a guest's own power-off is not.
            let restart = matches!(
                (state, desired.run_strategy),
                (
                    Some(VmState::Crashed),
                    RunStrategy::Always | RunStrategy::RerunOnFailure
                ) | (Some(VmState::PoweredOff), RunStrategy::Always)
            );
            if restart || matches!(state, None | Some(VmState::Stopped)) {
                plan.actions.push(Action::Start);
                plan.restart = restart;
            }
        }
        PowerState::Stopped | PowerState::Unspecified => {
            if !matches!(state, None | Some(VmState::Stopped)) {
                plan.actions.push(Action::Stop);
            }
        }
    }
    if let Some(request) = &desired.reboot {
        let running = matches!(state, Some(VmState::Running | VmState::Paused));
        let starting = plan.actions.contains(&Action::Start);
        if desired.power == PowerState::Running && running && !starting {
            plan.actions.push(Action::Reset(request.clone()));
        } else if state != Some(VmState::Unresponsive) {
            // Nothing runs to reset, or it is booting now anyway. An unresponsive VM
            // cannot be reset: the request waits until it answers.
            plan.reboot_without_reset = Some(request.clone());
        }
    }
    plan
}

/// What a reconcile did, as far as the status records it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The guest was restarted after stopping on its own.
    pub restarted: bool,
    /// This reboot request was performed.
    pub reboot: Option<String>,
    /// The start waits for this (its Ports to be plugged in), said in a sentence.
    pub waiting: Option<String>,
}

/// Why a reconcile could not converge, for the `GuestRunning` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// One UpperCamelCase word: `ImageNotFound`, `StartFailed`, ….
    pub reason: String,
    /// A sentence for people.
    pub message: String,
}

/// `status.host` and the `GuestRunning` condition for a Server whose VM is now as
/// `observed`, after a reconcile that planned `plan` and did `applied`.
pub fn host_status(
    server: &v1::Server,
    desired: &Desired,
    plan: &Plan,
    observed: Option<&VmStatus>,
    applied: &Applied,
    failure: Option<&Failure>,
) -> (v1::ServerHostStatus, v1::Condition) {
    let previous = server
        .status
        .as_ref()
        .and_then(|s| s.host.clone())
        .unwrap_or_default();
    let generation = server.metadata.as_ref().map_or(0, |m| m.generation);
    let state = observed.map(|vm| vm.state);
    let power_state = match state {
        None => HostPower::NoState as i32,
        Some(VmState::Running) => HostPower::Running as i32,
        Some(VmState::Paused) => HostPower::Paused as i32,
        Some(VmState::Stopped | VmState::PoweredOff) => HostPower::Shutdown as i32,
        Some(VmState::Crashed) => HostPower::Crashed as i32,
        // Alive but not answering: keep what was last seen.
        Some(VmState::Unresponsive) => match HostPower::try_from(previous.power_state) {
            Ok(HostPower::Running | HostPower::Paused) => previous.power_state,
            _ => HostPower::Running as i32,
        },
    };
    let host = v1::ServerHostStatus {
        power_state,
        hypervisor: HYPERVISOR.to_owned(),
        pid: observed.and_then(|vm| vm.pid).map_or(0, i64::from),
        started_at: observed
            .and_then(|vm| vm.started_at)
            .map(prost_types::Timestamp::from)
            .or(previous.started_at),
        restart_count: previous.restart_count + u32::from(applied.restarted),
        last_reboot: applied.reboot.clone().unwrap_or(previous.last_reboot),
        observed_generation: generation,
        // The guest may have ended between the plan's observation and this one: say how,
        // or the status would show it down with no reason until the next resync.
        last_exit_reason: plan
            .exit
            .clone()
            .or_else(|| {
                (desired.power == PowerState::Running)
                    .then(|| exit_of(observed))
                    .flatten()
            })
            .as_ref()
            .map(Exit::describe)
            .unwrap_or(previous.last_exit_reason),
        // Read from the hypervisor by the reconciler, which fills it in.
        volumes: Vec::new(),
    };
    let mut guest = guest_running(desired, observed, failure);
    guest.observed_generation = generation;
    (host, guest)
}

fn strategy_name(strategy: RunStrategy) -> &'static str {
    match strategy {
        RunStrategy::RerunOnFailure => "RerunOnFailure",
        RunStrategy::Manual => "Manual",
        _ => "Always",
    }
}

fn guest_running(
    desired: &Desired,
    observed: Option<&VmStatus>,
    failure: Option<&Failure>,
) -> v1::Condition {
    use ConditionStatus::{False, True, Unknown};
    let make =
        |status, reason: &str, message: String| condition(GUEST_RUNNING, status, reason, message);
    let alive = observed.is_some_and(VmStatus::is_alive);
    if let Some(failure) = failure
        && !alive
    {
        return make(False, &failure.reason, failure.message.clone());
    }
    let detail = observed
        .and_then(|vm| vm.detail.clone())
        .unwrap_or_default();
    let wants_stopped = desired.power == PowerState::Stopped;
    let strategy = strategy_name(desired.run_strategy);
    match observed.map(|vm| vm.state) {
        Some(VmState::Running) => make(True, "Running", "the guest runs".to_owned()),
        Some(VmState::Paused) => make(
            False,
            "Paused",
            format!("the hypervisor paused the guest ({detail})"),
        ),
        Some(VmState::Unresponsive) => make(
            Unknown,
            "HypervisorUnresponsive",
            format!("QEMU runs but does not answer: {detail}"),
        ),
        Some(VmState::Crashed) => make(
            False,
            "Crashed",
            if wants_stopped {
                "QEMU ended without a clean exit".to_owned()
            } else {
                format!(
                    "QEMU ended without a clean exit; runStrategy {strategy} does not restart it"
                )
            },
        ),
        Some(VmState::PoweredOff) => make(
            False,
            "GuestShutdown",
            if wants_stopped {
                "the guest powered itself off".to_owned()
            } else {
                format!("the guest powered itself off; runStrategy {strategy} does not restart it")
            },
        ),
        Some(VmState::Stopped) if wants_stopped => make(
            False,
            "Stopped",
            "stopped, as spec.powerState asks".to_owned(),
        ),
        None if wants_stopped => make(
            False,
            "Stopped",
            "not started: spec.powerState is Stopped".to_owned(),
        ),
        Some(VmState::Stopped) | None => make(
            False,
            "NotStarted",
            "the guest has not been started yet".to_owned(),
        ),
    }
}

/// Whether the Server's status differs from `host` and `guest` (condition times aside),
/// i.e. whether a status write is needed.
pub fn needs_write(
    server: &v1::Server,
    host: &v1::ServerHostStatus,
    guest: &v1::Condition,
) -> bool {
    let status = server.status.clone().unwrap_or_default();
    if status.host.as_ref() != Some(host) {
        return true;
    }
    !status.conditions.iter().any(|c| {
        crate::node::same_condition(c, guest) && c.observed_generation == guest.observed_generation
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::hypervisor::Accel;

    fn vm(state: VmState) -> VmStatus {
        let alive = matches!(
            state,
            VmState::Running | VmState::Paused | VmState::Unresponsive
        );
        VmStatus {
            uid: "u1".into(),
            state,
            pid: alive.then_some(4242),
            accel: alive.then_some(Accel::Tcg),
            detail: match state {
                VmState::Crashed => Some("terminating on signal 9".into()),
                VmState::Paused => Some("guest-panicked".into()),
                _ => None,
            },
            serial_log: "/x/serial.log".into(),
            console_socket: "/x/console.sock".into(),
            started_at: alive.then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            labels: BTreeMap::new(),
        }
    }

    fn desired(power: PowerState, strategy: RunStrategy) -> Desired {
        Desired {
            deleting: false,
            holds_finalizer: true,
            power,
            run_strategy: strategy,
            reboot: None,
        }
    }

    use PowerState::{Running as WantRunning, Stopped as WantStopped};
    use RunStrategy::{Always, Manual, RerunOnFailure};

    #[test]
    fn the_plan_table() {
        use Action::*;
        let crashed = Some(Exit::Crashed(Some("terminating on signal 9".into())));
        // (wanted power, strategy, observed, actions, restart, exit)
        type Case = (
            PowerState,
            RunStrategy,
            Option<VmState>,
            Vec<Action>,
            bool,
            Option<Exit>,
        );
        let cases: Vec<Case> = vec![
            (WantRunning, Always, None, vec![Start], false, None),
            (WantRunning, Manual, None, vec![Start], false, None),
            (
                WantRunning,
                Always,
                Some(VmState::Running),
                vec![],
                false,
                None,
            ),
            (
                WantRunning,
                Always,
                Some(VmState::Paused),
                vec![],
                false,
                None,
            ),
            (
                WantRunning,
                Always,
                Some(VmState::Unresponsive),
                vec![],
                false,
                None,
            ),
            // Stopped on request earlier: starting it again is no restart, whatever the
            // strategy.
            (
                WantRunning,
                Always,
                Some(VmState::Stopped),
                vec![Start],
                false,
                None,
            ),
            (
                WantRunning,
                Manual,
                Some(VmState::Stopped),
                vec![Start],
                false,
                None,
            ),
            (
                WantRunning,
                Always,
                Some(VmState::Crashed),
                vec![Start],
                true,
                crashed.clone(),
            ),
            (
                WantRunning,
                RerunOnFailure,
                Some(VmState::Crashed),
                vec![Start],
                true,
                crashed.clone(),
            ),
            (
                WantRunning,
                Manual,
                Some(VmState::Crashed),
                vec![],
                false,
                crashed.clone(),
            ),
            (
                WantRunning,
                Always,
                Some(VmState::PoweredOff),
                vec![Start],
                true,
                Some(Exit::PoweredOff),
            ),
            (
                WantRunning,
                RerunOnFailure,
                Some(VmState::PoweredOff),
                vec![],
                false,
                Some(Exit::PoweredOff),
            ),
            (
                WantRunning,
                Manual,
                Some(VmState::PoweredOff),
                vec![],
                false,
                Some(Exit::PoweredOff),
            ),
            (WantStopped, Always, None, vec![], false, None),
            (
                WantStopped,
                Always,
                Some(VmState::Running),
                vec![Stop],
                false,
                None,
            ),
            (
                WantStopped,
                Always,
                Some(VmState::Paused),
                vec![Stop],
                false,
                None,
            ),
            (
                WantStopped,
                Always,
                Some(VmState::Unresponsive),
                vec![Stop],
                false,
                None,
            ),
            (
                WantStopped,
                Always,
                Some(VmState::Stopped),
                vec![],
                false,
                None,
            ),
            // Down on its own while it should be down: record that it is down as asked.
            (
                WantStopped,
                Always,
                Some(VmState::Crashed),
                vec![Stop],
                false,
                None,
            ),
            (
                WantStopped,
                Manual,
                Some(VmState::PoweredOff),
                vec![Stop],
                false,
                None,
            ),
        ];
        for (power, strategy, state, actions, restart, exit) in cases {
            let observed = state.map(vm);
            let got = plan(&desired(power, strategy), observed.as_ref());
            let case = format!("{power:?} {strategy:?} {state:?}");
            assert_eq!(got.actions, actions, "{case}");
            assert_eq!(got.restart, restart, "{case}");
            assert_eq!(got.exit, exit, "{case}");
        }
    }

    /// An in-memory host: does to its one VM what the driver would do for each action.
    struct MemoryHost {
        vm: Option<VmState>,
        finalizer: bool,
    }

    impl MemoryHost {
        fn observed(&self) -> Option<VmStatus> {
            self.vm.map(vm)
        }

        fn apply(&mut self, action: &Action) {
            match action {
                Action::Start => self.vm = Some(VmState::Running),
                Action::Stop => self.vm = Some(VmState::Stopped),
                Action::Reset(_) => assert_eq!(self.vm, Some(VmState::Running)),
                Action::Destroy => self.vm = None,
                Action::RemoveFinalizer => self.finalizer = false,
            }
        }
    }

    #[test]
    fn every_plan_converges_and_running_it_again_does_nothing() {
        let states = [
            None,
            Some(VmState::Running),
            Some(VmState::Paused),
            Some(VmState::Stopped),
            Some(VmState::PoweredOff),
            Some(VmState::Crashed),
        ];
        for deleting in [false, true] {
            for power in [WantRunning, WantStopped] {
                for strategy in [Always, RerunOnFailure, Manual] {
                    for initial in states {
                        let case = format!("{deleting} {power:?} {strategy:?} {initial:?}");
                        let mut host = MemoryHost {
                            vm: initial,
                            finalizer: true,
                        };
                        let wanted = Desired {
                            deleting,
                            ..desired(power, strategy)
                        };
                        for action in &plan(&wanted, host.observed().as_ref()).actions {
                            host.apply(action);
                        }
                        let again = Desired {
                            holds_finalizer: host.finalizer,
                            ..wanted.clone()
                        };
                        assert_eq!(plan(&again, host.observed().as_ref()).actions, [], "{case}");
                        let left_down = matches!(
                            (initial, strategy),
                            (Some(VmState::Crashed), Manual)
                                | (Some(VmState::PoweredOff), Manual | RerunOnFailure)
                        );
                        let expected = if deleting {
                            None
                        } else if power == WantStopped {
                            initial.map(|_| VmState::Stopped)
                        } else if left_down || initial == Some(VmState::Paused) {
                            initial
                        } else {
                            Some(VmState::Running)
                        };
                        assert_eq!(host.vm, expected, "{case}");
                        assert_eq!(host.finalizer, !deleting, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn deletion_destroys_whatever_is_there_then_lets_go() {
        let deleting = Desired {
            deleting: true,
            ..desired(WantRunning, Always)
        };
        for state in [
            VmState::Running,
            VmState::Stopped,
            VmState::Crashed,
            VmState::Unresponsive,
        ] {
            assert_eq!(
                plan(&deleting, Some(&vm(state))).actions,
                [Action::Destroy, Action::RemoveFinalizer],
                "{state:?}"
            );
        }
        assert_eq!(plan(&deleting, None).actions, [Action::RemoveFinalizer]);
        let let_go = Desired {
            holds_finalizer: false,
            ..deleting
        };
        assert_eq!(plan(&let_go, None).actions, []);
    }

    #[test]
    fn a_reboot_request_resets_a_running_guest_once() {
        let asked = Desired {
            reboot: Some("2026-11-22T10:00:00Z".into()),
            ..desired(WantRunning, Always)
        };
        let p = plan(&asked, Some(&vm(VmState::Running)));
        assert_eq!(p.actions, [Action::Reset("2026-11-22T10:00:00Z".into())]);
        assert_eq!(p.reboot_without_reset, None);
        // A guest that boots anyway, or is down, needs no reset: the request is done.
        for state in [None, Some(VmState::Stopped), Some(VmState::Crashed)] {
            let p = plan(&asked, state.map(vm).as_ref());
            assert!(
                !p.actions.iter().any(|a| matches!(a, Action::Reset(_))),
                "{state:?}"
            );
            assert_eq!(
                p.reboot_without_reset.as_deref(),
                Some("2026-11-22T10:00:00Z")
            );
        }
        // One that does not answer keeps the request for later.
        let p = plan(&asked, Some(&vm(VmState::Unresponsive)));
        assert_eq!(p.actions, []);
        assert_eq!(p.reboot_without_reset, None);
    }

    fn server(generation: i64, host: Option<v1::ServerHostStatus>) -> v1::Server {
        v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: "web-1".into(),
                project: "p".into(),
                uid: "u1".into(),
                generation,
                finalizers: vec![ferro_api::auth::AGENT_FINALIZER.into()],
                ..Default::default()
            }),
            spec: Some(v1::ServerSpec::default()),
            status: Some(v1::ServerStatus {
                node: "n1".into(),
                host,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn desired_reads_defaults_finalizer_and_pending_reboots() {
        let mut s = server(1, None);
        let d = Desired::of(&s);
        assert_eq!(d, desired(WantRunning, Always));
        let meta = s.metadata.as_mut().unwrap();
        meta.annotations
            .insert(REBOOT_ANNOTATION.into(), "t1".into());
        s.spec.as_mut().unwrap().power_state = Some(PowerState::Stopped as i32);
        s.spec.as_mut().unwrap().run_strategy = Some(RunStrategy::Manual as i32);
        let d = Desired::of(&s);
        assert_eq!(d.reboot.as_deref(), Some("t1"));
        assert_eq!((d.power, d.run_strategy), (WantStopped, Manual));
        s.status.as_mut().unwrap().host = Some(v1::ServerHostStatus {
            last_reboot: "t1".into(),
            ..Default::default()
        });
        assert_eq!(
            Desired::of(&s).reboot,
            None,
            "a performed reboot is not pending"
        );
    }

    fn status_after(
        server: &v1::Server,
        power: PowerState,
        strategy: RunStrategy,
        before: Option<VmState>,
        after: Option<VmState>,
        applied: Applied,
        failure: Option<Failure>,
    ) -> (v1::ServerHostStatus, v1::Condition) {
        let d = desired(power, strategy);
        let p = plan(&d, before.map(vm).as_ref());
        host_status(
            server,
            &d,
            &p,
            after.map(vm).as_ref(),
            &applied,
            failure.as_ref(),
        )
    }

    #[test]
    fn a_running_guest_is_reported_running() {
        let s = server(3, None);
        let (host, guest) = status_after(
            &s,
            WantRunning,
            Always,
            None,
            Some(VmState::Running),
            Applied::default(),
            None,
        );
        assert_eq!(host.power_state, HostPower::Running as i32);
        assert_eq!(host.hypervisor, "QEMU");
        assert_eq!(host.pid, 4242);
        assert_eq!(host.observed_generation, 3);
        assert_eq!(host.restart_count, 0);
        assert_eq!(host.started_at.unwrap().seconds, 1_700_000_000);
        assert_eq!(guest.r#type, GUEST_RUNNING);
        assert_eq!(guest.status, ConditionStatus::True as i32);
        assert_eq!(guest.observed_generation, 3);
    }

    #[test]
    fn a_restart_counts_and_says_why() {
        let s = server(
            1,
            Some(v1::ServerHostStatus {
                restart_count: 2,
                ..Default::default()
            }),
        );
        let (host, guest) = status_after(
            &s,
            WantRunning,
            Always,
            Some(VmState::Crashed),
            Some(VmState::Running),
            Applied {
                restarted: true,
                ..Applied::default()
            },
            None,
        );
        assert_eq!(host.restart_count, 3);
        assert_eq!(
            host.last_exit_reason,
            "Crashed: QEMU ended without a clean exit (terminating on signal 9)"
        );
        assert_eq!(guest.status, ConditionStatus::True as i32);
    }

    #[test]
    fn a_guest_left_down_by_its_strategy_is_reported_with_a_reason() {
        let s = server(1, None);
        let (host, guest) = status_after(
            &s,
            WantRunning,
            Manual,
            Some(VmState::Crashed),
            Some(VmState::Crashed),
            Applied::default(),
            None,
        );
        assert_eq!(host.power_state, HostPower::Crashed as i32);
        assert_eq!(host.pid, 0);
        assert!(host.last_exit_reason.starts_with("Crashed: "));
        assert_eq!(guest.status, ConditionStatus::False as i32);
        assert_eq!(guest.reason, "Crashed");
        assert!(
            guest.message.contains("runStrategy Manual"),
            "{}",
            guest.message
        );

        let (host, guest) = status_after(
            &s,
            WantRunning,
            RerunOnFailure,
            Some(VmState::PoweredOff),
            Some(VmState::PoweredOff),
            Applied::default(),
            None,
        );
        assert_eq!(host.power_state, HostPower::Shutdown as i32);
        assert_eq!(
            host.last_exit_reason,
            "GuestShutdown: the guest powered itself off"
        );
        assert_eq!(guest.reason, "GuestShutdown");

        // It powered off after the plan looked and before the status was written.
        let (host, _) = status_after(
            &s,
            WantRunning,
            RerunOnFailure,
            Some(VmState::Running),
            Some(VmState::PoweredOff),
            Applied::default(),
            None,
        );
        assert_eq!(
            host.last_exit_reason,
            "GuestShutdown: the guest powered itself off"
        );
    }

    #[test]
    fn stopped_as_asked_is_no_exit() {
        let s = server(2, None);
        let (host, guest) = status_after(
            &s,
            WantStopped,
            Always,
            Some(VmState::Running),
            Some(VmState::Stopped),
            Applied::default(),
            None,
        );
        assert_eq!(host.power_state, HostPower::Shutdown as i32);
        assert_eq!(host.last_exit_reason, "");
        assert_eq!(
            (guest.status, guest.reason.as_str()),
            (ConditionStatus::False as i32, "Stopped")
        );
        let (host, guest) = status_after(
            &s,
            WantStopped,
            Always,
            None,
            None,
            Applied::default(),
            None,
        );
        assert_eq!(host.power_state, HostPower::NoState as i32);
        assert_eq!(guest.reason, "Stopped");
    }

    #[test]
    fn a_failure_is_the_reason_while_nothing_runs() {
        let s = server(1, None);
        let failure = Failure {
            reason: "ImageNotFound".into(),
            message: "image tiny not found in project p or among public images".into(),
        };
        let (host, guest) = status_after(
            &s,
            WantRunning,
            Always,
            None,
            None,
            Applied::default(),
            Some(failure.clone()),
        );
        assert_eq!(host.power_state, HostPower::NoState as i32);
        assert_eq!(guest.reason, "ImageNotFound");
        assert_eq!(guest.message, failure.message);
        // A running guest is running, whatever else failed (a reset, say).
        let (_, guest) = status_after(
            &s,
            WantRunning,
            Always,
            Some(VmState::Running),
            Some(VmState::Running),
            Applied::default(),
            Some(failure),
        );
        assert_eq!(guest.reason, "Running");
    }

    #[test]
    fn an_unresponsive_guest_is_unknown_and_keeps_its_power_state() {
        let s = server(
            1,
            Some(v1::ServerHostStatus {
                power_state: HostPower::Paused as i32,
                ..Default::default()
            }),
        );
        let (host, guest) = status_after(
            &s,
            WantRunning,
            Always,
            Some(VmState::Unresponsive),
            Some(VmState::Unresponsive),
            Applied::default(),
            None,
        );
        assert_eq!(host.power_state, HostPower::Paused as i32);
        assert_eq!(guest.status, ConditionStatus::Unknown as i32);
    }

    #[test]
    fn the_status_is_written_only_when_it_changes() {
        let mut s = server(1, None);
        let (host, guest) = status_after(
            &s,
            WantRunning,
            Always,
            None,
            Some(VmState::Running),
            Applied::default(),
            None,
        );
        assert!(needs_write(&s, &host, &guest));
        // As the apiserver stores it: with a transition time, beside others' conditions.
        let status = s.status.as_mut().unwrap();
        status.host = Some(host.clone());
        let mut stored = guest.clone();
        stored.last_transition_time = Some(prost_types::Timestamp::default());
        status.conditions = vec![
            condition("Ready", ConditionStatus::True, "Running", String::new()),
            stored,
        ];
        let (again, guest_again) = status_after(
            &s,
            WantRunning,
            Always,
            Some(VmState::Running),
            Some(VmState::Running),
            Applied::default(),
            None,
        );
        assert!(
            !needs_write(&s, &again, &guest_again),
            "an idle resync writes nothing"
        );
        // A new generation, a new pid or another condition is worth a write.
        s.metadata.as_mut().unwrap().generation = 2;
        let (newer, guest_newer) = status_after(
            &s,
            WantRunning,
            Always,
            Some(VmState::Running),
            Some(VmState::Running),
            Applied::default(),
            None,
        );
        assert!(needs_write(&s, &newer, &guest_newer));
    }
}
