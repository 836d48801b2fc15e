//! Exports of a recording for other tools: Chrome/Perfetto trace-event JSON, folded stacks
//! (what flamegraph.pl and inferno read) and a flamegraph SVG.
//!
//! The Perfetto export replays the recording through the model and reads descriptor lifetimes
//! off it, so it agrees with the report by construction; the folded stacks and the flamegraph
//! are the report's sites (what was open at the end, at each process's exit).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::{self, Write},
    sync::Arc,
};

use serde_json::{Value, json};

use crate::{
    model::{Event, FdKind, Model, OpenFd, Origin, Pid, SiteId, StackId},
    record::{Entry, Recording},
    report::{FrameReport, Report, place},
    tracer::Stacks,
};

/// The identity of a descriptor in a table: when and where it was created.
type FdIdentity = (u64, SiteId);

struct Slice {
    start: u64,
    kind: FdKind,
    lane: usize,
    target: String,
    /// Where it was created, named when it opened: a process's sites are freed at its exit,
    /// before its last slices end.
    place: Arc<str>,
}

/// Writes trace-event JSON one event at a time.
struct TraceWriter<W: Write> {
    out: W,
    first: bool,
    origin_ns: u64,
}

impl<W: Write> TraceWriter<W> {
    fn emit(&mut self, event: &Value) -> io::Result<()> {
        if !self.first {
            self.out.write_all(b",\n")?;
        }
        self.first = false;
        serde_json::to_writer(&mut self.out, event)?;
        Ok(())
    }

    /// Microseconds since the start of the recording (the format's unit), ns precision.
    fn us(&self, ns: u64) -> f64 {
        ns.saturating_sub(self.origin_ns) as f64 / 1000.0
    }
}

/// Descriptor lifetimes as they open and close, laid out on lanes per process and kind (a
/// lane holds one descriptor at a time, so "X" slices on it never overlap).
struct Lifetimes {
    open: HashMap<(Pid, i32), Slice>,
    lanes: HashMap<(Pid, FdKind), Vec<bool>>,
    counts: HashMap<Pid, u64>,
    /// Places by stack and origin: named once, not for each of a million descriptors.
    places: HashMap<(StackId, Origin), Arc<str>>,
}

fn kind_index(kind: FdKind) -> usize {
    FdKind::ALL.iter().position(|&k| k == kind).unwrap_or(0)
}

/// Trace-event thread id of a lane: grouped by kind, in kind order.
fn lane_tid(kind: FdKind, lane: usize) -> u64 {
    (kind_index(kind) as u64 + 1) * 100_000 + lane as u64
}

fn site_place(model: &Model, stacks: &Stacks, site: SiteId) -> String {
    let Some(s) = model.sites.get(site) else {
        return "(unknown)".into();
    };
    origin_place(stacks, s.stack, s.origin)
}

fn origin_place(stacks: &Stacks, stack: StackId, origin: Origin) -> String {
    match origin {
        Origin::Inherited => "open before tracing".into(),
        Origin::Reconciled => "found in /proc".into(),
        Origin::Traced => {
            let frames: Vec<FrameReport> =
                stacks.get(stack).iter().map(FrameReport::from).collect();
            place(&frames)
        }
    }
}

fn identities(model: &Model, pid: Pid) -> BTreeMap<i32, FdIdentity> {
    model
        .processes
        .get(&pid)
        .filter(|p| p.alive())
        .and_then(|_| model.open_fds(pid))
        .map(|t| {
            t.iter()
                .map(|(n, f)| (n, (f.opened_ns, f.site())))
                .collect()
        })
        .unwrap_or_default()
}

fn open_fd(model: &Model, pid: Pid, fd: i32) -> Option<&OpenFd> {
    model
        .processes
        .get(&pid)
        .filter(|p| p.alive())
        .and_then(|_| model.open_fds(pid))
        .and_then(|t| t.get(fd))
}

/// The descriptors an event can change, by process: `None` for "any of them".
fn touched(event: &Event) -> Vec<(Pid, Option<Vec<i32>>)> {
    match event {
        Event::Opened { pid, fds, .. } => vec![(*pid, Some(fds.iter().map(|f| f.fd).collect()))],
        Event::Duplicated { pid, to, .. } | Event::Fetched { pid, to, .. } => {
            vec![(*pid, Some(vec![*to]))]
        }
        Event::Closed { pid, fd, .. } => vec![(*pid, Some(vec![*fd]))],
        Event::Attached { pid, .. }
        | Event::ClosedRange { pid, .. }
        | Event::Exec { pid, .. }
        | Event::Exited { pid, .. }
        | Event::Reconciled { pid, .. } => vec![(*pid, None)],
        Event::Forked { child, .. } => vec![(*child, None)],
        Event::CloexecSet { .. }
        | Event::Failed { .. }
        | Event::LimitChanged { .. }
        | Event::Lost { .. }
        | Event::Losses(_)
        | Event::Unanswered { .. }
        | Event::Listen { .. }
        | Event::UpstreamFailed { .. }
        | Event::UpstreamEnded { .. }
        | Event::ExitTable { .. }
        // No slices: neither end of these descriptors' lives was sent (a flight recording
        // has their counts only).
        | Event::Balanced { .. }
        | Event::Tick { .. } => Vec::new(),
    }
}

impl Lifetimes {
    #[expect(clippy::too_many_arguments, reason = "one slice's facts, written once")]
    fn start<W: Write>(
        &mut self,
        w: &mut TraceWriter<W>,
        model: &Model,
        stacks: &Stacks,
        pid: Pid,
        fd: i32,
        at: u64,
        open: &OpenFd,
    ) -> io::Result<()> {
        let place = match model.sites.get(open.site()) {
            Some(s) => self
                .places
                .entry((s.stack, s.origin))
                .or_insert_with(|| Arc::from(origin_place(stacks, s.stack, s.origin)))
                .clone(),
            None => Arc::from("(unknown)"),
        };
        let lanes = self.lanes.entry((pid, open.kind)).or_default();
        let lane = if let Some(free) = lanes.iter().position(|busy| !busy) {
            lanes[free] = true;
            free
        } else {
            lanes.push(true);
            let lane = lanes.len() - 1;
            let name = if lane == 0 {
                open.kind.name().to_string()
            } else {
                format!("{} #{}", open.kind.name(), lane + 1)
            };
            let tid = lane_tid(open.kind, lane);
            w.emit(
                &json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                           "args": {"name": name}}),
            )?;
            w.emit(
                &json!({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                           "args": {"sort_index": tid}}),
            )?;
            lane
        };
        self.open.insert(
            (pid, fd),
            Slice {
                start: at,
                kind: open.kind,
                lane,
                target: open.target.to_string(),
                place,
            },
        );
        *self.counts.entry(pid).or_default() += 1;
        Ok(())
    }

    fn end<W: Write>(
        &mut self,
        w: &mut TraceWriter<W>,
        pid: Pid,
        fd: i32,
        at: u64,
        how: &str,
    ) -> io::Result<()> {
        let Some(slice) = self.open.remove(&(pid, fd)) else {
            return Ok(());
        };
        if let Some(busy) = self
            .lanes
            .get_mut(&(pid, slice.kind))
            .and_then(|l| l.get_mut(slice.lane))
        {
            *busy = false;
        }
        if let Some(n) = self.counts.get_mut(&pid) {
            *n = n.saturating_sub(1);
        }
        let site = slice.place;
        let name = if slice.target.is_empty() {
            site.to_string()
        } else {
            slice.target.clone()
        };
        w.emit(&json!({
            "ph": "X", "name": name, "cat": slice.kind.name(),
            "ts": w.us(slice.start), "dur": at.saturating_sub(slice.start) as f64 / 1000.0,
            "pid": pid, "tid": lane_tid(slice.kind, slice.lane),
            "args": {"fd": fd, "target": slice.target, "site": &*site, "end": how},
        }))
    }
}

/// Writes the recording as Chrome/Perfetto trace-event JSON: each descriptor's lifetime as an
/// "X" slice on its process's tracks for its kind, each EMFILE/ENFILE as an instant event, and
/// each process's open count as a counter.
pub fn perfetto(recording: &Recording, out: impl Write) -> io::Result<()> {
    let mut stacks = Stacks::default();
    let mut model = Model::new();
    let origin_ns = recording
        .entries
        .iter()
        .find_map(|e| match e {
            Entry::Event(ev) => ev.ts(),
            _ => None,
        })
        .unwrap_or(recording.header.start_mono_ns);
    let mut w = TraceWriter {
        out: io::BufWriter::new(out),
        first: true,
        origin_ns,
    };
    let h = &recording.header;
    writeln!(
        w.out,
        "{{\"displayTimeUnit\":\"ns\",\"otherData\":{},\"traceEvents\":[",
        json!({
            "fdtrace_version": h.fdtrace_version, "host": h.host, "kernel": h.kernel,
            "start": h.clock.rfc3339(origin_ns), "redacted": h.redacted,
        })
    )?;
    let mut life = Lifetimes {
        open: HashMap::new(),
        lanes: HashMap::new(),
        counts: HashMap::new(),
        places: HashMap::new(),
    };
    let mut at = origin_ns;
    for entry in &recording.entries {
        let event = match entry {
            Entry::Stack { frames, .. } => {
                stacks.push(frames.clone());
                continue;
            }
            Entry::ExitCode { pid, code } => {
                model.set_exit_code(*pid, *code);
                continue;
            }
            Entry::Finished { .. } => continue,
            Entry::Event(event) => event,
        };
        if let Some(ts) = event.ts() {
            at = at.max(ts);
        }
        let touched = touched(event);
        let before: Vec<BTreeMap<i32, FdIdentity>> = touched
            .iter()
            .map(|(pid, fds)| match fds {
                Some(fds) => fds
                    .iter()
                    .filter_map(|&fd| {
                        open_fd(&model, *pid, fd).map(|f| (fd, (f.opened_ns, f.site())))
                    })
                    .collect(),
                None => identities(&model, *pid),
            })
            .collect();
        model.apply(event);
        for ((pid, fds), before) in touched.iter().zip(before) {
            let pid = *pid;
            let after: BTreeMap<i32, FdIdentity> = match fds {
                Some(fds) => fds
                    .iter()
                    .filter_map(|&fd| {
                        open_fd(&model, pid, fd).map(|f| (fd, (f.opened_ns, f.site())))
                    })
                    .collect(),
                None => identities(&model, pid),
            };
            let count_before = life.counts.get(&pid).copied().unwrap_or(0);
            let how = match event {
                Event::Exited { .. } => "open at exit",
                Event::Exec { .. } => "closed on exec",
                _ => "closed",
            };
            for (fd, id) in &before {
                if after.get(fd) != Some(id) {
                    life.end(&mut w, pid, *fd, at, how)?;
                }
            }
            for (fd, id) in &after {
                if before.get(fd) != Some(id)
                    && let Some(open) = open_fd(&model, pid, *fd)
                {
                    life.start(&mut w, &model, &stacks, pid, *fd, at, open)?;
                }
            }
            let count = life.counts.get(&pid).copied().unwrap_or(0);
            if count != count_before || matches!(event, Event::Attached { .. }) {
                w.emit(
                    &json!({"ph": "C", "name": "open descriptors", "ts": w.us(at),
                               "pid": pid, "args": {"open": count}}),
                )?;
            }
            if matches!(
                event,
                Event::Attached { .. } | Event::Exec { .. } | Event::Forked { .. }
            ) && let Some(p) = model.processes.get(&pid)
            {
                w.emit(&json!({"ph": "M", "name": "process_name", "pid": pid,
                               "args": {"name": format!("{} ({pid})", p.info.comm)}}))?;
            }
        }
        if let Event::Failed {
            pid,
            tid,
            ts,
            errno,
            syscall,
            ..
        } = event
            && let Some(inc) = model.incidents.last().filter(|i| i.ts == *ts)
        {
            let blame: Vec<String> = inc
                .blame
                .iter()
                .take(5)
                .map(|&(site, n)| format!("{n} at {}", site_place(&model, &stacks, site)))
                .collect();
            let name = format!(
                "{} {}",
                errno.name(),
                fdtrace_common::syscalls::name(*syscall).unwrap_or("?")
            );
            w.emit(
                &json!({"ph": "i", "s": "p", "name": name, "ts": w.us(*ts), "pid": pid,
                           "tid": tid, "args": {"open_fds": inc.open_fds, "limit": inc.limit,
                           "blame": blame}}),
            )?;
        }
        if let Event::Unanswered {
            pid,
            ts,
            fd,
            request_waiting,
        } = event
        {
            w.emit(
                &json!({"ph": "i", "s": "t", "name": "closed unanswered at the limit",
                           "ts": w.us(*ts), "pid": pid, "tid": pid,
                           "args": {"fd": fd, "request_waiting": request_waiting}}),
            )?;
        }
    }
    let mut still: Vec<(Pid, i32)> = life.open.keys().copied().collect();
    still.sort_unstable();
    for (pid, fd) in still {
        life.end(&mut w, pid, fd, at, "open at end")?;
    }
    w.out.write_all(b"\n]}\n")?;
    w.out.flush()
}

/// A frame's name in a folded stack (`;` would split it, so it is replaced).
fn folded_frame(f: &FrameReport) -> String {
    let name = match (&f.function, &f.module) {
        (Some(function), _) => function.clone(),
        (None, Some(module)) => format!("{module}+{}", f.addr),
        (None, None) => f.addr.clone(),
    };
    name.replace(';', ":")
}

/// Folded stacks of the descriptors open at the end (at each process's exit): one line per
/// stack, frames outermost first joined by `;` under the process's name, a space, the count.
pub fn folded(report: &Report) -> String {
    let comm: HashMap<Pid, &str> = report
        .processes
        .iter()
        .map(|p| (p.pid, p.comm.as_str()))
        .collect();
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for s in &report.sites {
        let root = comm.get(&s.pid).copied().unwrap_or("?").replace(';', ":");
        let mut parts = vec![root];
        if s.inherited {
            parts.push("[open before tracing]".into());
        } else if s.unattributed {
            parts.push("[found in /proc]".into());
        } else if s.frames.is_empty() {
            parts.push("[no stack]".into());
        }
        parts.extend(s.frames.iter().rev().map(folded_frame));
        parts.push(format!("[{}]", s.kind.name()));
        *lines.entry(parts.join(";")).or_default() += s.open;
    }
    let mut out = String::new();
    for (stack, n) in lines {
        let _ = writeln!(out, "{stack} {n}");
    }
    out
}

/// A flamegraph SVG of the descriptors open at the end, drawn by inferno.
pub fn flamegraph(report: &Report, out: impl Write) -> anyhow::Result<()> {
    let folded = folded(report);
    let mut options = inferno::flamegraph::Options::default();
    options.title = "fdtrace: open file descriptors by call site".into();
    options.count_name = "descriptors".into();
    options.subtitle = Some(format!(
        "{} process(es), {} descriptors open at the end",
        report.processes.len(),
        report.sites.iter().map(|s| s.open).sum::<u64>()
    ));
    if folded.is_empty() {
        anyhow::bail!("nothing was open at the end: there is no flamegraph to draw");
    }
    inferno::flamegraph::from_lines(&mut options, folded.lines(), out)?;
    Ok(())
}
