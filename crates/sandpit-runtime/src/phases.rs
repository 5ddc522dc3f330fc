//! Where a lifecycle operation spends its time: a small recorder of phases with fixed names
//! (never anything a tenant chose), filled where the work happens, on both sides of the
//! [`Runtime`](crate::Runtime) trait.
//!
//! The caller of an operation runs it under [`measure`], which opens a recorder for its
//! task; the code below (the control layer, a backend) reports with [`timed`] or [`record`],
//! which do nothing outside a measurement (the warm pool's background boots, the reaper's
//! idle suspends). Work moved to another thread (`spawn_blocking`) is timed there and
//! recorded back in the measured task with [`record`]; a task spawned inside a measurement
//! is not measured.
//!
//! Phases that run concurrently (a fork's children restoring four at a time, the parent
//! restoring beside them) are recorded as they ran: [`Timings`] gives each phase the wall
//! time during which at least one of its spans ran, so the phases may add up to more than
//! the total, which is the operation's wall time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

/// A phase of create, wake, fork or hibernate. Its [`name`](Phase::name) is what the
/// `Server-Timing` header and the logs show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// A warm-pool sandbox handed out (one store update, the owner's egress rules applied).
    Pool,
    /// A network slot claimed in the store (the row inserted with it, or taken on wake).
    Slot,
    /// The network namespace, veth, address and nftables chain made, or removed.
    Netns,
    /// Files copied in: a snapshot's, a template boot snapshot's, a fork parent's.
    Copy,
    /// The sandbox's disk image made (mkfs), grown and mounted.
    Disk,
    /// The overlay root filesystem mounted.
    Rootfs,
    /// The OCI bundle written.
    Bundle,
    /// `runsc run` or `runsc restore`, until the sandbox runs.
    Runsc,
    /// Waiting for the agent inside to answer.
    Agent,
    /// `/etc/resolv.conf` written through the agent.
    Resolv,
    /// The template's start command started and its ready check passed.
    Start,
    /// `runsc checkpoint`: the memory image written.
    Checkpoint,
    /// The memory image synced and published under its final name.
    Image,
    /// `runsc delete`, the sandbox's processes waited for, its root filesystem unmounted.
    Teardown,
    /// The row's new status written.
    Store,
}

impl Phase {
    /// Every phase, in the order an operation usually meets them.
    pub const ALL: [Phase; 15] = [
        Phase::Pool,
        Phase::Slot,
        Phase::Netns,
        Phase::Copy,
        Phase::Disk,
        Phase::Rootfs,
        Phase::Bundle,
        Phase::Runsc,
        Phase::Agent,
        Phase::Resolv,
        Phase::Start,
        Phase::Checkpoint,
        Phase::Image,
        Phase::Teardown,
        Phase::Store,
    ];

    /// Its name: a fixed lowercase word.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pool => "pool",
            Phase::Slot => "slot",
            Phase::Netns => "netns",
            Phase::Copy => "copy",
            Phase::Disk => "disk",
            Phase::Rootfs => "rootfs",
            Phase::Bundle => "bundle",
            Phase::Runsc => "runsc",
            Phase::Agent => "agent",
            Phase::Resolv => "resolv",
            Phase::Start => "start",
            Phase::Checkpoint => "checkpoint",
            Phase::Image => "image",
            Phase::Teardown => "teardown",
            Phase::Store => "store",
        }
    }
}

/// What a measured operation spent: per phase (in the order each first started) the wall
/// time its spans covered, and the operation's own wall time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub phases: Vec<(Phase, Duration)>,
    pub total: Duration,
}

impl Timings {
    /// The time `phase` covered, if it ran.
    pub fn get(&self, phase: Phase) -> Option<Duration> {
        self.phases
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, d)| *d)
    }

    /// (name, milliseconds) per phase, then `("total", …)`: the `Server-Timing` metrics.
    pub fn metrics(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        self.phases
            .iter()
            .map(|(p, d)| (p.name(), ms(*d)))
            .chain([("total", ms(self.total))])
    }
}

/// For logs: `slot=1.2ms runsc=252.0ms … total=370.5ms`.
impl fmt::Display for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, v)) in self.metrics().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={v:.1}ms")?;
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The recorder of one operation: the spans its phases ran, as (phase, start, end).
#[derive(Debug)]
pub struct Phases {
    started: Instant,
    /// Every span recorded so far, in the order recorded. Held only to push or copy.
    spans: Mutex<Vec<(Phase, Instant, Instant)>>,
}

impl Default for Phases {
    fn default() -> Self {
        Phases::new()
    }
}

impl Phases {
    /// A recorder whose total counts from now.
    pub fn new() -> Phases {
        Phases::starting_at(Instant::now())
    }

    fn starting_at(started: Instant) -> Phases {
        Phases {
            started,
            spans: Mutex::new(Vec::new()),
        }
    }

    /// `phase` ran from `from` to `to`.
    pub fn record(&self, phase: Phase, from: Instant, to: Instant) {
        self.spans
            .lock()
            .expect("phases poisoned")
            .push((phase, from, to.max(from)));
    }

    /// What was recorded until now.
    pub fn timings(&self) -> Timings {
        self.timings_at(Instant::now())
    }

    fn timings_at(&self, now: Instant) -> Timings {
        let mut spans = self.spans.lock().expect("phases poisoned").clone();
        // By start: phases come out in the order each first started, and each phase's
        // spans in order, ready to merge.
        spans.sort_by_key(|(_, from, _)| *from);
        let mut order: Vec<Phase> = Vec::new();
        for (p, _, _) in &spans {
            if !order.contains(p) {
                order.push(*p);
            }
        }
        let phases = order
            .into_iter()
            .map(|phase| {
                let mut covered = Duration::ZERO;
                let mut open: Option<(Instant, Instant)> = None;
                for &(_, from, to) in spans.iter().filter(|(p, _, _)| *p == phase) {
                    open = match open {
                        Some((a, b)) if from <= b => Some((a, b.max(to))),
                        Some((a, b)) => {
                            covered += b - a;
                            Some((from, to))
                        }
                        None => Some((from, to)),
                    };
                }
                if let Some((a, b)) = open {
                    covered += b - a;
                }
                (phase, covered)
            })
            .collect();
        Timings {
            phases,
            total: now.saturating_duration_since(self.started),
        }
    }
}

tokio::task_local! {
    /// The recorder of the operation this task runs under [`measure`].
    static CURRENT: Arc<Phases>;
}

/// Run `fut` with a fresh recorder for its task; what it recorded, with its wall time
/// (counted from this call).
///
/// This and [`timed`] are plain futures over a boxed inner one, not `async fn`s: an
/// `async fn` wrapper copies the (large) lifecycle future it wraps into its own state and
/// poll frame, and in debug builds the create path then outgrew a 2 MiB thread stack.
pub fn measure<F: Future>(fut: F) -> Measure<F> {
    let phases = Arc::new(Phases::new());
    Measure {
        inner: Box::pin(CURRENT.scope(phases.clone(), fut)),
        phases,
    }
}

/// The future of [`measure`].
pub struct Measure<F: Future> {
    inner: Pin<Box<tokio::task::futures::TaskLocalFuture<Arc<Phases>, F>>>,
    phases: Arc<Phases>,
}

impl<F: Future> Future for Measure<F> {
    type Output = (F::Output, Timings);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = ready!(self.inner.as_mut().poll(cx));
        Poll::Ready((out, self.phases.timings()))
    }
}

/// Record that `phase` ran from `from` to `to` (nothing outside [`measure`]).
pub fn record(phase: Phase, from: Instant, to: Instant) {
    let _ = CURRENT.try_with(|p| p.record(phase, from, to));
}

/// Run `fut`, recording its time (from its first poll) as `phase`, whatever it returns.
pub fn timed<F: Future>(phase: Phase, fut: F) -> Timed<F> {
    Timed {
        inner: Box::pin(fut),
        phase,
        from: None,
    }
}

/// The future of [`timed`].
pub struct Timed<F> {
    inner: Pin<Box<F>>,
    phase: Phase,
    from: Option<Instant>,
}

impl<F: Future> Future for Timed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let from = *this.from.get_or_insert_with(Instant::now);
        let out = ready!(this.inner.as_mut().poll(cx));
        record(this.phase, from, Instant::now());
        Poll::Ready(out)
    }
}

/// What the current measurement recorded so far (for a log line), `None` outside one.
pub fn current() -> Option<Timings> {
    CURRENT.try_with(|p| p.timings()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn names_are_fixed_words_and_unique() {
        let names: std::collections::HashSet<_> = Phase::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names.len(), Phase::ALL.len());
        assert!(!names.contains("total"));
        for n in names {
            assert!(n.bytes().all(|b| b.is_ascii_lowercase()), "{n}");
        }
    }

    #[test]
    fn sequential_spans_add_up_and_keep_their_order() {
        let t0 = Instant::now();
        let p = Phases::starting_at(t0);
        // Recorded out of order: reported by start.
        p.record(Phase::Runsc, at(t0, 10), at(t0, 30));
        p.record(Phase::Slot, at(t0, 0), at(t0, 2));
        p.record(Phase::Agent, at(t0, 30), at(t0, 35));
        p.record(Phase::Runsc, at(t0, 40), at(t0, 45));
        let t = p.timings_at(at(t0, 50));
        assert_eq!(
            t.phases,
            vec![
                (Phase::Slot, Duration::from_millis(2)),
                (Phase::Runsc, Duration::from_millis(25)),
                (Phase::Agent, Duration::from_millis(5)),
            ]
        );
        assert_eq!(t.total, Duration::from_millis(50));
        assert_eq!(t.get(Phase::Agent), Some(Duration::from_millis(5)));
        assert_eq!(t.get(Phase::Disk), None);
    }

    #[test]
    fn concurrent_spans_count_their_wall_time_once() {
        let t0 = Instant::now();
        let p = Phases::starting_at(t0);
        // Four children restoring at once, a fifth after the first finished.
        for (from, to) in [(0, 100), (5, 90), (10, 120), (20, 110), (100, 150)] {
            p.record(Phase::Runsc, at(t0, from), at(t0, to));
        }
        // A disjoint span later.
        p.record(Phase::Runsc, at(t0, 200), at(t0, 210));
        // Another phase overlapping them keeps its own time.
        p.record(Phase::Agent, at(t0, 90), at(t0, 160));
        let t = p.timings_at(at(t0, 220));
        assert_eq!(t.get(Phase::Runsc), Some(Duration::from_millis(160)));
        assert_eq!(t.get(Phase::Agent), Some(Duration::from_millis(70)));
        assert_eq!(t.total, Duration::from_millis(220));
    }

    #[test]
    fn metrics_end_with_the_total_and_display_for_logs() {
        let t = Timings {
            phases: vec![
                (Phase::Slot, Duration::from_micros(1200)),
                (Phase::Runsc, Duration::from_millis(252)),
            ],
            total: Duration::from_micros(370_500),
        };
        let m: Vec<_> = t.metrics().collect();
        assert_eq!(m, vec![("slot", 1.2), ("runsc", 252.0), ("total", 370.5)]);
        assert_eq!(t.to_string(), "slot=1.2ms runsc=252.0ms total=370.5ms");
    }

    #[tokio::test]
    async fn records_only_inside_a_measurement() {
        // Outside: nothing to record into, and nothing fails.
        timed(Phase::Disk, async {}).await;
        assert_eq!(current(), None);
        let ((), t) = measure(async {
            let a = timed(Phase::Runsc, tokio::task::yield_now());
            let b = timed(Phase::Agent, tokio::task::yield_now());
            futures_join(a, b).await;
            record(Phase::Store, Instant::now(), Instant::now());
            assert!(current().is_some());
            // A spawned task is not measured.
            tokio::spawn(async { timed(Phase::Copy, async {}).await })
                .await
                .unwrap();
        })
        .await;
        let names: Vec<_> = t.phases.iter().map(|(p, _)| *p).collect();
        assert!(names.contains(&Phase::Runsc) && names.contains(&Phase::Agent));
        assert!(names.contains(&Phase::Store));
        assert!(!names.contains(&Phase::Copy));
        assert!(t.phases.iter().all(|(_, d)| *d <= t.total));
    }

    async fn futures_join(a: impl Future<Output = ()>, b: impl Future<Output = ()>) {
        tokio::join!(a, b);
    }
}
