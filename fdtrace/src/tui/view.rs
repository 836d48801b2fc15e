//! What the widgets draw: a [`View`] derived from the model at each refresh, and the
//! [`Collector`] that keeps what the model does not (history for the timeline and the rates,
//! probe cost samples, incident rows, symbolized stacks), fed after every pump.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
};

use super::{Feed, format};
use crate::{
    container::Container,
    losses::Losses,
    model::{
        Corrections, FdKind, FdView, Limit, Listen, Model, NO_STACK, Origin, Pid, Process, SiteId,
        StackId,
    },
    probe::ProbeCost,
    report::{self, FrameReport},
};

/// Samples closer than this share a bucket (the larger value is kept).
const BUCKET_NS: u64 = 250_000_000;
/// Ten minutes of buckets.
const MAX_SAMPLES: usize = 2400;
/// Rates are measured over about this long.
const RATE_WINDOW_NS: u64 = 5_000_000_000;

#[derive(Clone, Debug, Default)]
pub struct ProcessView {
    pub pid: Pid,
    /// Its pid in its own pid namespace (`pid` on the host, or when unknown).
    pub ns_pid: Pid,
    /// The container's id or cgroup path, as the report has it.
    pub container: Option<Arc<Container>>,
    pub comm: String,
    pub exe: String,
    pub alive: bool,
    pub open: u64,
    pub limit: Limit,
    pub growth_per_min: f64,
    pub forecast_secs: Option<f64>,
}

impl ProcessView {
    /// Open descriptors as a fraction of the soft limit (0 when unlimited).
    pub fn fill(&self) -> f64 {
        if self.limit.soft == u64::MAX || self.limit.soft == 0 {
            0.0
        } else {
            self.open as f64 / self.limit.soft as f64
        }
    }
}

#[derive(Clone, Debug)]
pub struct SiteRow {
    pub id: SiteId,
    pub pid: Pid,
    pub kind: FdKind,
    pub origin: Origin,
    pub open: u64,
    pub opened: u64,
    pub closed: u64,
    pub growth_per_min: f64,
    pub oldest_age_ns: Option<u64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub place: String,
    pub stack: StackId,
    pub targets: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct BlameRow {
    pub kind: FdKind,
    pub open: u64,
    pub place: String,
    pub stack: StackId,
}

/// A listening socket of the focus process, for the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenRow {
    pub address: String,
    pub queued: u64,
    /// 0 when unknown (a process in another network namespace).
    pub backlog: u64,
    pub full: bool,
    /// Time of day it became full, to the millisecond.
    pub full_since: Option<String>,
}

/// One group of failed outbound connections, for the upstream pane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamRow {
    pub pid: Pid,
    pub comm: String,
    pub peer: String,
    /// The cause, and the phase when the connection was made: "refused", "reply timeout".
    pub cause: String,
    pub errno: String,
    pub count: u64,
    /// How long they lasted, when the state probe saw them end ("1.00 s").
    pub lasted: Option<String>,
    /// Time of day of the latest, to the millisecond.
    pub last: String,
}

#[derive(Clone, Debug)]
pub struct IncidentRow {
    pub ts: u64,
    /// Time of day to the millisecond, for the table.
    pub time: String,
    /// RFC 3339 to the millisecond, for details.
    pub wall: String,
    pub pid: Pid,
    pub tid: u32,
    pub syscall: String,
    pub errno: &'static str,
    pub open: u64,
    pub limit: u64,
    pub stack: StackId,
    pub blame: Vec<BlameRow>,
    /// For an accept: its listening socket's queue at that instant.
    pub listen: Option<Listen>,
}

/// fdtrace's own cost: the probes' average run time and their share of one CPU recently.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProbeLoad {
    pub runs: u64,
    pub avg_ns: f64,
    pub cpu_percent: Option<f64>,
}

/// The timeline of one process's open descriptors.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub pid: Option<Pid>,
    pub limit: Option<u64>,
    pub start_ns: u64,
    pub end_ns: u64,
    /// (time, open descriptors).
    pub points: Vec<(u64, u64)>,
    /// (time, open descriptors) of each EMFILE/ENFILE of the process.
    pub failures: Vec<(u64, u64)>,
    /// The label of the first failure in view: errno and time of day to the millisecond.
    pub first_label: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct View {
    pub position: String,
    pub running: bool,
    pub now_ns: u64,
    /// The process the gauge and timeline show first: the fullest table.
    pub focus: Option<Pid>,
    /// Live processes, and the focus if it exited.
    pub processes: Vec<ProcessView>,
    /// Exited processes besides those in `processes`.
    pub exited: u64,
    pub opens_per_sec: f64,
    pub closes_per_sec: f64,
    pub incidents_total: u64,
    /// Connections accepted at the limit and closed unanswered, all processes together.
    pub unanswered: u64,
    /// Failed outbound connections by process, peer and cause, most first.
    pub upstream: Vec<UpstreamRow>,
    /// The focus process's listen queues (live), and connections dropped at full ones.
    pub listen: Vec<ListenRow>,
    pub listen_overflows: u64,
    pub dropped: u64,
    /// What else was missed, by reason (the header lists the non-zero ones).
    pub losses: Losses,
    pub corrections: Corrections,
    pub probe: Option<ProbeLoad>,
    pub sites: Vec<SiteRow>,
    /// How many of the collector's incident rows this view shows (frozen when paused).
    pub incidents_shown: usize,
    pub timeline: Timeline,
}

impl View {
    pub fn focus_process(&self) -> Option<&ProcessView> {
        self.processes.iter().find(|p| Some(p.pid) == self.focus)
    }
}

/// What the model does not keep but the view needs; fed after every pump, paused or not.
#[derive(Debug, Default)]
pub struct Collector {
    first_ns: u64,
    last_ns: u64,
    /// Open descriptors per process over time, bucketed.
    history: BTreeMap<Pid, VecDeque<(u64, u64)>>,
    /// (time, descriptors opened so far, closed so far), bucketed.
    totals: VecDeque<(u64, (u64, u64))>,
    /// (time, probe cost so far).
    probe: VecDeque<(u64, ProbeCost)>,
    pub incidents: Vec<IncidentRow>,
    /// The process the last view focused on.
    focus: Option<Pid>,
    frames: HashMap<StackId, Arc<[FrameReport]>>,
    places: HashMap<StackId, String>,
}

fn process_view(model: &Model, p: &Process) -> ProcessView {
    ProcessView {
        pid: p.pid,
        ns_pid: p.info.ns_pid_or(p.pid),
        container: p.info.container.clone(),
        comm: p.info.comm.clone(),
        exe: p.info.exe.clone(),
        alive: p.alive(),
        open: model.open_count(p.pid),
        limit: p.info.limit,
        growth_per_min: if p.alive() { p.growth_per_min() } else { 0.0 },
        forecast_secs: if p.alive() {
            model.forecast_secs(p.pid)
        } else {
            None
        },
    }
}

fn push_bucket<T: Copy>(
    samples: &mut VecDeque<(u64, T)>,
    ts: u64,
    value: T,
    merge: impl Fn(T, T) -> T,
) {
    match samples.back_mut() {
        Some(last) if last.0 / BUCKET_NS == ts / BUCKET_NS => {
            *last = (ts, merge(last.1, value));
        }
        _ => {
            if samples.len() == MAX_SAMPLES {
                samples.pop_front();
            }
            samples.push_back((ts, value));
        }
    }
}

impl Collector {
    /// Samples the model after a pump.
    pub fn observe(&mut self, feed: &dyn Feed) {
        let model = feed.model();
        // A replay that seeks back rebuilds its model: history from the old one is void.
        if model.first_ns != self.first_ns
            || model.last_ns < self.last_ns
            || model.incidents.len() < self.incidents.len()
        {
            *self = Self::default();
            self.first_ns = model.first_ns;
        }
        self.last_ns = model.last_ns;
        let ts = model.last_ns;
        if ts == 0 {
            return;
        }
        for p in model.processes.values().filter(|p| p.alive()) {
            let open = model.open_count(p.pid);
            push_bucket(self.history.entry(p.pid).or_default(), ts, open, u64::max);
        }
        // A pid's history goes with it (a shell's children would each leave up to ten
        // minutes of samples), except the focus's: the timeline still shows it.
        let focus = self.focus;
        self.history.retain(|pid, _| {
            Some(*pid) == focus || model.processes.get(pid).is_some_and(Process::alive)
        });
        push_bucket(
            &mut self.totals,
            ts,
            (model.opened_total, model.closed_total),
            |_, new| new,
        );
        if let Some(cost) = feed.probe_cost() {
            push_bucket(&mut self.probe, ts, cost, |_, new| new);
        }
        for inc in &model.incidents[self.incidents.len()..] {
            let blame = inc
                .blame
                .iter()
                .filter_map(|&(site, open)| {
                    // Sites an incident blames are kept for as long as the model.
                    let s = model.sites.get(site)?;
                    Some(BlameRow {
                        kind: s.kind,
                        open,
                        place: self.place(feed, s.stack, s.origin),
                        stack: s.stack,
                    })
                })
                .collect();
            self.frames(feed, inc.stack);
            let row = IncidentRow {
                ts: inc.ts,
                time: format::time_ms(feed.clock(), inc.ts),
                wall: format::wall_ms(feed.clock(), inc.ts),
                pid: inc.pid,
                tid: inc.tid,
                syscall: fdtrace_common::syscalls::name(inc.syscall)
                    .map_or_else(|| format!("syscall {}", inc.syscall), str::to_string),
                errno: inc.errno.name(),
                open: inc.open_fds,
                limit: inc.limit,
                stack: inc.stack,
                blame,
                listen: inc.listen.clone(),
            };
            self.incidents.push(row);
        }
    }

    /// The processes whose history is kept.
    #[cfg(test)]
    pub fn history_pids(&self) -> Vec<Pid> {
        self.history.keys().copied().collect()
    }

    /// The symbolized frames of a stack, innermost first (cached: stacks never change).
    pub fn frames(&mut self, feed: &dyn Feed, stack: StackId) -> Arc<[FrameReport]> {
        self.frames
            .entry(stack)
            .or_insert_with(|| {
                feed.stacks()
                    .get(stack)
                    .iter()
                    .map(FrameReport::from)
                    .collect()
            })
            .clone()
    }

    /// Frames already looked up (render must not reach the feed).
    pub fn cached_frames(&self, stack: StackId) -> &[FrameReport] {
        self.frames.get(&stack).map_or(&[], |f| f)
    }

    /// One line naming where a site's descriptors come from.
    fn place(&mut self, feed: &dyn Feed, stack: StackId, origin: Origin) -> String {
        match origin {
            Origin::Inherited => return "(open before tracing)".into(),
            Origin::Reconciled => return "(found in /proc, never seen created)".into(),
            Origin::Traced if stack == NO_STACK => return "(no stack)".into(),
            Origin::Traced => {}
        }
        if let Some(place) = self.places.get(&stack) {
            return place.clone();
        }
        let frames = self.frames(feed, stack);
        let place = report::place(&frames);
        self.places.insert(stack, place.clone());
        place
    }

    /// Builds the view from the model as it is now.
    pub fn view(&mut self, feed: &dyn Feed) -> View {
        let model = feed.model();
        // The live processes, and the focus once it exited (until another takes its place):
        // exited ones are only counted, since a shell script's thousands would bury the rest.
        let shown = |p: &&Process| p.alive() || Some(p.pid) == self.focus;
        let mut processes: Vec<ProcessView> = model
            .processes
            .values()
            .filter(shown)
            .map(|p| process_view(model, p))
            .collect();
        if processes.is_empty() {
            // Nothing alive and no focus yet (a replay that starts after every exit): the
            // fullest exited process.
            processes.extend(
                model
                    .processes
                    .values()
                    .max_by_key(|p| (p.peak_open, std::cmp::Reverse(p.pid)))
                    .map(|p| process_view(model, p)),
            );
        }
        let focus = processes
            .iter()
            .max_by(|a, b| {
                (a.alive, a.fill(), a.open, std::cmp::Reverse(a.pid))
                    .partial_cmp(&(b.alive, b.fill(), b.open, std::cmp::Reverse(b.pid)))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map(|p| p.pid);
        self.focus = focus;
        let (queues, listen_overflows) =
            focus.map_or_else(Default::default, |pid| feed.listen_queues(pid));
        let listen = queues
            .into_iter()
            .map(|q| ListenRow {
                full: q.full(),
                full_since: q.full_since.map(|t| format::time_ms(feed.clock(), t)),
                address: q.address,
                queued: q.queued,
                backlog: q.backlog,
            })
            .collect();
        let shown_exited = processes.iter().filter(|p| !p.alive).count() as u64;
        let (opens_per_sec, closes_per_sec) = self.rates();
        View {
            position: feed.position(),
            running: feed.running(),
            now_ns: model.last_ns,
            focus,
            processes,
            exited: model.exited_count().saturating_sub(shown_exited),
            opens_per_sec,
            closes_per_sec,
            incidents_total: model.incidents_total,
            unanswered: model.unanswered.values().map(|u| u.count).sum(),
            upstream: upstream_rows(model, feed.clock()),
            listen,
            listen_overflows,
            dropped: model.dropped,
            losses: model.losses,
            corrections: model.corrections,
            probe: self.probe_load(),
            sites: self.sites(feed),
            incidents_shown: self.incidents.len(),
            timeline: self.timeline(model, focus),
        }
    }

    fn rates(&self) -> (f64, f64) {
        let Some(&(t1, (o1, c1))) = self.totals.back() else {
            return (0.0, 0.0);
        };
        let Some(&(t0, (o0, c0))) = self
            .totals
            .iter()
            .rev()
            .find(|(t, _)| t1 - t >= RATE_WINDOW_NS)
            .or(self.totals.front())
        else {
            return (0.0, 0.0);
        };
        if t1 <= t0 {
            return (0.0, 0.0);
        }
        let secs = (t1 - t0) as f64 / 1e9;
        (
            o1.saturating_sub(o0) as f64 / secs,
            c1.saturating_sub(c0) as f64 / secs,
        )
    }

    fn probe_load(&self) -> Option<ProbeLoad> {
        let &(t1, now) = self.probe.back()?;
        let avg_ns = if now.runs == 0 {
            0.0
        } else {
            now.run_time.as_nanos() as f64 / now.runs as f64
        };
        let cpu_percent = self
            .probe
            .iter()
            .rev()
            .find(|(t, _)| t1 - t >= RATE_WINDOW_NS)
            .or(self.probe.front())
            .filter(|(t0, _)| *t0 < t1)
            .map(|&(t0, then)| {
                let busy = now.run_time.saturating_sub(then.run_time).as_nanos() as f64;
                busy / (t1 - t0) as f64 * 100.0
            });
        Some(ProbeLoad {
            runs: now.runs,
            avg_ns,
            cpu_percent,
        })
    }

    fn sites(&mut self, feed: &dyn Feed) -> Vec<SiteRow> {
        let model = feed.model();
        // The oldest open descriptor of each site, from the tables as they are now.
        let mut oldest: HashMap<SiteId, u64> = HashMap::new();
        for p in model.processes.values().filter(|p| p.alive()) {
            for fd in model.open_fds(p.pid).into_iter().flat_map(FdView::values) {
                let e = oldest.entry(fd.site()).or_insert(fd.opened_ns);
                *e = (*e).min(fd.opened_ns);
            }
        }
        let mut rows = Vec::new();
        // Sites of live processes: an exited one's descriptors are closed, and are in the report.
        for (id, s) in model.sites.iter() {
            if (s.open == 0 && s.opened == 0) || s.gone() {
                continue;
            }
            if s.stack != NO_STACK {
                self.frames(feed, s.stack);
            }
            rows.push(SiteRow {
                id,
                pid: s.pid,
                kind: s.kind,
                origin: s.origin,
                open: s.open,
                opened: s.opened,
                closed: s.closed,
                growth_per_min: model.site_growth_per_min(s),
                oldest_age_ns: oldest.get(&id).map(|&t| model.last_ns.saturating_sub(t)),
                p50_ms: s.lifetime_ms(0.5),
                p99_ms: s.lifetime_ms(0.99),
                place: self.place(feed, s.stack, s.origin),
                stack: s.stack,
                targets: s.targets().iter().map(ToString::to_string).collect(),
            });
        }
        rows
    }

    fn timeline(&self, model: &Model, focus: Option<Pid>) -> Timeline {
        let Some(pid) = focus else {
            return Timeline::default();
        };
        let points: Vec<(u64, u64)> = self
            .history
            .get(&pid)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default();
        let start_ns = points.first().map_or(model.first_ns, |p| p.0);
        let end_ns = model.last_ns.max(start_ns);
        let mine = || self.incidents.iter().filter(|i| i.pid == pid);
        let limit = model
            .processes
            .get(&pid)
            .map(|p| p.info.limit.soft)
            .filter(|&l| l != u64::MAX);
        let failures: Vec<&IncidentRow> = mine().filter(|i| i.ts >= start_ns).collect();
        // The first failure in view is labelled; "first" when no earlier one scrolled away.
        let first_label = failures.first().map(|i| {
            let first = mine().next().is_some_and(|f| f.ts == i.ts);
            format!(
                "{}{} {}",
                if first { "first " } else { "" },
                i.errno,
                i.time
            )
        });
        Timeline {
            pid: Some(pid),
            limit,
            start_ns,
            end_ns,
            points,
            failures: failures.iter().map(|i| (i.ts, i.open)).collect(),
            first_label,
        }
    }
}

/// The model's upstream failure groups as rows, most failures first.
fn upstream_rows(model: &Model, clock: &crate::clock::WallClock) -> Vec<UpstreamRow> {
    model
        .upstream_groups()
        .into_iter()
        .map(|(pid, comm, peer, failure, g)| UpstreamRow {
            pid,
            comm: comm.to_string(),
            peer: peer.to_string(),
            cause: match (failure.phase, failure.cause) {
                ("response", "timeout") => "reply timeout".to_string(),
                ("response", "closed_early") => "closed early".to_string(),
                (_, cause) => cause.to_string(),
            },
            errno: crate::model::errno_name(g.errno),
            count: g.count,
            lasted: g
                .durations
                .map(|d| format!("{:.2} s", d.total_ns as f64 / d.count.max(1) as f64 / 1e9)),
            last: format::time_ms(clock, g.last_ns),
        })
        .collect()
}
