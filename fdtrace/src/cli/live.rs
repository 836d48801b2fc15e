//! `fdtrace --pid` (and `--comm`, `--cgroup`, `--container`): attach to running processes, and
//! to those that start matching later.

use std::{
    fmt::Write as _,
    io::IsTerminal as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::bail;

use super::{AttachArgs, check_privileges, emit_report, select_options};
use crate::{
    headroom,
    model::{Event, Origin, Pid},
    report::FrameReport,
    session::Session,
    signals,
};

pub(crate) fn attach(args: &AttachArgs) -> anyhow::Result<ExitCode> {
    for &pid in &args.pids {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with pid {pid}");
        }
    }
    let selection = args.select.resolve(&args.pids)?;
    let nginx = super::nginx_timeouts(args.nginx_conf.as_ref())?;
    let with_nginx = |mut report: crate::report::Report| {
        if let Some(timeouts) = &nginx {
            report.compare_nginx(timeouts);
        }
        report
    };
    check_privileges()?;
    let tui = !args.no_tui && std::io::stdout().is_terminal();
    let options = select_options(args.probe, args.follow, tui, &selection);
    let mut session = Session::start(options)?;
    for &pid in &args.pids {
        session.add(pid)?;
        if options.follow {
            session.add_descendants(pid);
        }
    }
    let matched = session.select(&selection)?;
    signals::install();
    if tui {
        // The UI owns the terminal until it closes. The full report (every incident with its
        // stacks) would bury the shell after it: it goes to -o FILE, or is one line away.
        let options = crate::tui::TuiOptions {
            warn_at: args.warn_at,
            ..crate::tui::TuiOptions::default()
        };
        crate::tui::run(&mut session, options)?;
        session.settle();
        let report = with_nginx(session.report());
        if args.output.is_some() {
            emit_report(&report, args.format, args.output.as_ref(), false)?;
        } else {
            eprintln!(
                "fdtrace: {} descriptor(s) held by traced call sites, {} EMFILE/ENFILE; for the full report use -o FILE (or e in the view)",
                report.leaked(),
                report.emfile.len() as u64 + report.emfile_not_listed
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut pids = args.pids.clone();
    pids.extend(&matched);
    if !selection.selects_later() {
        eprintln!(
            "fdtrace: tracing {} (Ctrl-C for the report)",
            describe(&pids)
        );
    } else if pids.is_empty() {
        eprintln!(
            "fdtrace: waiting for processes matching {} (Ctrl-C for the report)",
            selection.describe_later()
        );
    } else {
        eprintln!(
            "fdtrace: tracing {}, and processes matching {} as they start (Ctrl-C for the report)",
            describe(&pids),
            selection.describe_later()
        );
    }
    let mut printer = LivePrinter::default();
    let mut headroom = args.warn_at.map(headroom::Watch::new);
    loop {
        let events = session.pump(Duration::from_millis(100));
        printer.events(&session, &events);
        if let Some(watch) = &mut headroom {
            for c in watch.observe(&session.model, &events) {
                eprintln!("fdtrace: WARNING: {}", c.describe(watch.percent()));
            }
        }
        printer.summary(&session, &pids);
        if signals::take().is_some() {
            break;
        }
        // Processes selected by comm or cgroup may come (back) at any time.
        if !selection.selects_later() && !session.any_alive() {
            eprintln!("fdtrace: every traced process has exited");
            break;
        }
    }
    session.settle();
    emit_report(
        &with_nginx(session.report()),
        args.format,
        args.output.as_ref(),
        false,
    )?;
    Ok(ExitCode::SUCCESS)
}

fn describe(pids: &[Pid]) -> String {
    // A cgroup can hold hundreds of processes: the first few say enough.
    const SHOWN: usize = 8;
    let names: Vec<String> = pids
        .iter()
        .take(SHOWN)
        .map(|&p| match crate::procfs::identity(p) {
            Ok(id) => format!("{p} ({})", id.comm),
            Err(_) => p.to_string(),
        })
        .collect();
    let more = match pids.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    format!("pid {}{more}", names.join(", "))
}

/// Text-mode output while tracing: each incident as it happens, a summary every few seconds.
#[derive(Default)]
struct LivePrinter {
    last_summary: Option<Instant>,
    /// EMFILE/ENFILE failures per process since tracing began, all of them (the model keeps
    /// the first [`crate::model::MAX_INCIDENTS`] whole).
    failures: std::collections::BTreeMap<Pid, u64>,
    /// Failures past those the model keeps, by process and syscall, since the last summary:
    /// counted there in one line each, so the output neither stops nor floods.
    unlisted: std::collections::BTreeMap<(Pid, u32), u64>,
    /// Upstream failure groups already announced, and their counts at the last summary.
    upstream_seen: std::collections::BTreeMap<(Pid, String, crate::model::Failure), u64>,
}

const SUMMARY_EVERY: Duration = Duration::from_secs(3);

impl LivePrinter {
    fn events(&mut self, session: &Session, events: &[Event]) {
        self.upstream(session, events);
        for event in events {
            if let Event::Failed {
                pid,
                syscall,
                errno,
                ts,
                ..
            } = event
            {
                *self.failures.entry(*pid).or_default() += 1;
                let model = &session.model;
                let Some(inc) = model
                    .incidents
                    .iter()
                    .rev()
                    .find(|i| i.ts == *ts && i.pid == *pid)
                else {
                    *self.unlisted.entry((*pid, *syscall)).or_default() += 1;
                    continue;
                };
                let top = inc.blame.first().map_or_else(String::new, |&(site, n)| {
                    let s = &model.sites[site];
                    format!(
                        "; top holder: {n} {} at {}",
                        s.kind.name(),
                        place(session, s.stack, s.origin)
                    )
                });
                let queue = inc.listen.as_ref().map_or_else(String::new, |l| {
                    format!(
                        "; listen queue {}/{} on fd {} {}",
                        l.queued, l.backlog, l.fd, l.address
                    )
                });
                eprintln!(
                    "fdtrace: {} in pid {pid}: {} failed at {} with {}/{} open{top}{queue}",
                    errno.name(),
                    fdtrace_common::syscalls::name(*syscall).unwrap_or("?"),
                    session.clock.rfc3339(*ts),
                    inc.open_fds,
                    inc.limit
                );
            }
        }
    }

    /// The first upstream failure of each (process, peer, phase and cause) at once, in
    /// nginx's terms.
    fn upstream(&mut self, session: &Session, events: &[Event]) {
        for u in events.iter().filter_map(Event::upstream) {
            let (pid, f) = (u.pid, u.failure);
            let key = (pid, u.peer.to_string(), f);
            if self.upstream_seen.contains_key(&key) {
                continue;
            }
            self.upstream_seen.insert(key, 1);
            let comm = session
                .model
                .processes
                .get(&pid)
                .map_or("?", |p| p.info.comm.as_str());
            let peer = if u.peer.is_empty() {
                "an unknown address"
            } else {
                u.peer
            };
            let after = u.duration_ns.map_or(String::new(), |ns| {
                format!(" after {:.2} s", ns as f64 / 1e9)
            });
            let what = match (f.phase, f.cause) {
                ("connect", "timeout" | "backlog_full") if u.duration_ns.is_some() => {
                    format!("connect to {peer} timed out{after}")
                }
                ("connect", _) => format!(
                    "connect to {peer} failed with {}",
                    crate::model::errno_name(u.errno)
                ),
                (_, "timeout") => format!("request to {peer} unanswered, closed{after}"),
                (_, "closed_early") => {
                    format!("request to {peer} closed by the peer before any answer{after}")
                }
                _ => format!("connection to {peer} reset{after}"),
            };
            let meaning = crate::model::upstream_meaning(f.phase, f.cause, u.peer);
            eprintln!(
                "fdtrace: {comm} pid {pid}: {what}{}{meaning}",
                if meaning.is_empty() { "" } else { ": " },
            );
        }
    }

    /// Upstream failure groups that grew since the last summary, one line each.
    fn upstream_summary(&mut self, session: &Session) {
        for ((pid, _, peer, failure), g) in &session.model.upstream {
            let key = (*pid, peer.to_string(), *failure);
            let before = self.upstream_seen.get(&key).copied().unwrap_or(0);
            if g.count <= before {
                continue;
            }
            self.upstream_seen.insert(key, g.count);
            let comm = session
                .model
                .processes
                .get(pid)
                .map_or("?", |p| p.info.comm.as_str());
            let what = if failure.phase == "connect" {
                "connects"
            } else {
                "requests"
            };
            eprintln!(
                "fdtrace: {comm} pid {pid}: {} {what} to {peer} {} ({}) so far, {} since the last summary",
                g.count,
                failure.cause,
                crate::model::errno_name(g.errno),
                g.count - before
            );
        }
    }

    fn summary(&mut self, session: &Session, pids: &[Pid]) {
        if self
            .last_summary
            .is_some_and(|t| t.elapsed() < SUMMARY_EVERY)
        {
            return;
        }
        self.last_summary = Some(Instant::now());
        self.upstream_summary(session);
        for ((pid, syscall), n) in std::mem::take(&mut self.unlisted) {
            eprintln!(
                "fdtrace: {n} more EMFILE/ENFILE in pid {pid} ({}) since the last summary, past the first {} listed one by one",
                fdtrace_common::syscalls::name(syscall).unwrap_or("?"),
                crate::model::MAX_INCIDENTS
            );
        }
        let model = &session.model;
        for p in model.processes.values().filter(|p| p.alive()) {
            if !pids.contains(&p.pid) && model.open_count(p.pid) == 0 {
                continue;
            }
            let open = model.open_count(p.pid);
            let eta = model.forecast_secs(p.pid).map_or_else(
                || "not growing".to_string(),
                |s| format!("limit in {}", fmt_secs(s)),
            );
            let top = model
                .sites_of(p.pid)
                .filter(|s| s.origin != Origin::Inherited && s.open > 0)
                .max_by_key(|s| s.open)
                .map_or_else(
                    || "-".to_string(),
                    |s| {
                        format!(
                            "{} {} at {}",
                            s.open,
                            s.kind.name(),
                            place(session, s.stack, s.origin)
                        )
                    },
                );
            let limit = p.info.limit.soft;
            let unanswered = model.unanswered_of(p);
            let dropped = if unanswered.count > 0 {
                format!(
                    " | {} accepted and closed unanswered at the limit (502s behind a proxy)",
                    unanswered.count
                )
            } else {
                String::new()
            };
            let mut queues = String::new();
            for q in session
                .listeners
                .queues
                .get(&p.pid)
                .into_iter()
                .flatten()
                .filter(|q| q.queued > 0)
            {
                if q.backlog > 0 {
                    let _ = write!(
                        queues,
                        " | listen {} backlog {}/{}",
                        q.address, q.queued, q.backlog
                    );
                } else {
                    let _ = write!(queues, " | listen {} {} queued", q.address, q.queued);
                }
                if let Some(t) = q.full_since {
                    let _ = write!(queues, " full since {}", session.clock.rfc3339(t));
                }
            }
            let overflows = session.listeners.overflows(p.pid);
            if overflows > 0 {
                let _ = write!(
                    queues,
                    " | {overflows} connections dropped at a full listen queue (netns ListenOverflows)"
                );
            }
            let shortfalls = session.shortfalls();
            let shortfalls = if shortfalls.is_empty() {
                String::new()
            } else {
                format!(" | {}", shortfalls.join(", "))
            };
            eprintln!(
                "fdtrace: pid {} ({}) {open}/{} open, {:+.0}/min, {eta} | top: {top} | EMFILE {}{dropped}{queues} | lost {}{shortfalls}",
                p.pid,
                p.info.comm,
                if limit == u64::MAX {
                    "unlimited".to_string()
                } else {
                    limit.to_string()
                },
                p.growth_per_min(),
                self.failures.get(&p.pid).copied().unwrap_or(0),
                model.dropped
            );
        }
    }
}

/// The frame that names a site for a one-line view: the first outside the C library.
fn place(session: &Session, stack: crate::model::StackId, origin: Origin) -> String {
    if origin == Origin::Inherited {
        return "open before tracing".into();
    }
    let frames: Vec<FrameReport> = session
        .tracer
        .stacks
        .get(stack)
        .iter()
        .map(FrameReport::from)
        .collect();
    crate::report::place(&frames)
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}
