//! The report of what was left open and every EMFILE/ENFILE: built once from the model, then
//! rendered as text (valgrind style), markdown or JSON (schema "fdtrace.report/1").

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
};

use serde::{Deserialize, Serialize};

use crate::{
    clock::WallClock,
    container,
    losses::Losses,
    model::{FdKind, FdView, Folded, Limit, Listen, Model, Origin, Pid, SiteId},
    stack::{Frame, Lang},
    tracer::Stacks,
};

pub const SCHEMA: &str = "fdtrace.report/1";

/// Sites listed in each incident's blame, and how many of them carry their stacks: the top
/// holders are what matters, and the same stacks repeat in every incident of a retrying
/// server (the JSON grew to hundreds of MB without these bounds). The full stacks of every
/// site are in `sites`.
const BLAME_LISTED: usize = 10;
const BLAME_WITH_FRAMES: usize = 3;
/// Incidents the text report shows with stacks; the rest get one line each.
const INCIDENTS_IN_FULL: usize = 5;
/// Commands named in the line on clean exits; the rest are counted together.
const COMMANDS_NAMED: usize = 8;
/// Groups of folded processes' descriptors the text shows; the rest are counted together.
const FOLDED_GROUPS_SHOWN: usize = 10;
/// Pids named for processes listed once with others like them.
const PIDS_NAMED: usize = 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub fdtrace_version: String,
    pub duration_ms: u64,
    /// Events missing from what follows (`lost.ring_full` + `lost.undecodable`; from a
    /// recording made before format 4, the only count there is).
    pub dropped_events: u64,
    /// What fdtrace could not see, by reason (each a total over the session).
    #[serde(default)]
    pub lost: Losses,
    pub processes: Vec<ProcessReport>,
    pub sites: Vec<SiteReport>,
    pub emfile: Vec<IncidentReport>,
    /// EMFILE/ENFILE failures beyond those listed (the model keeps the first ones whole).
    pub emfile_not_listed: u64,
    pub corrections: crate::model::Corrections,
    /// Failed outbound connections of the traced processes (a proxy's upstream failures),
    /// grouped by process, peer and cause; most first.
    #[serde(default)]
    pub upstream_failures: Vec<UpstreamReport>,
    /// Exited processes not in `processes` or `sites`: the oldest past the model's bound, and
    /// those whose pid came back. Counted here so that the totals still add up.
    #[serde(default)]
    pub folded: FoldedReport,
}

/// Exited processes the model keeps as counts only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FoldedReport {
    pub processes: u64,
    /// Those that exited clean, by command ("" for commands past the model's bound on names).
    pub clean: Vec<CommandCount>,
    /// What the others had open at exit, by command and call site, most descriptors first.
    pub open_at_exit: Vec<FoldedSiteReport>,
    /// Descriptors open at exit in folded processes beyond the groups the model keeps.
    pub ungrouped_open: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandCount {
    pub comm: String,
    pub processes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FoldedSiteReport {
    pub comm: String,
    pub kind: FdKind,
    pub inherited: bool,
    pub unattributed: bool,
    /// Processes that exited with descriptors of this site open, and how many in all.
    pub processes: u64,
    pub open: u64,
    pub frames: Vec<FrameReport>,
}

impl FoldedReport {
    fn build(folded: &Folded, stacks: &Stacks) -> Self {
        let mut open_at_exit: Vec<FoldedSiteReport> = folded
            .open_at_exit
            .iter()
            .map(|(key, group)| FoldedSiteReport {
                comm: key.comm.clone(),
                kind: key.kind,
                inherited: key.origin == Origin::Inherited,
                unattributed: key.origin == Origin::Reconciled,
                processes: group.processes,
                open: group.open,
                frames: frames(stacks, key.stack),
            })
            .collect();
        open_at_exit.sort_by(|a, b| {
            b.open
                .cmp(&a.open)
                .then(a.inherited.cmp(&b.inherited))
                .then_with(|| a.comm.cmp(&b.comm))
                .then_with(|| place(&a.frames).cmp(&place(&b.frames)))
        });
        Self {
            processes: folded.processes,
            clean: by_count(folded.clean.iter().map(|(c, &n)| (c.as_str(), n))),
            open_at_exit,
            ungrouped_open: folded.ungrouped_open,
        }
    }
}

/// Counts by command, most first, then by name.
fn by_count<'a>(counts: impl IntoIterator<Item = (&'a str, u64)>) -> Vec<CommandCount> {
    let mut merged: BTreeMap<&str, u64> = BTreeMap::new();
    for (comm, n) in counts {
        *merged.entry(comm).or_default() += n;
    }
    let mut list: Vec<CommandCount> = merged
        .into_iter()
        .map(|(comm, processes)| CommandCount {
            comm: comm.to_string(),
            processes,
        })
        .collect();
    list.sort_by(|a, b| b.processes.cmp(&a.processes).then(a.comm.cmp(&b.comm)));
    list
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessReport {
    pub pid: Pid,
    /// The pid in the process's own pid namespace: `pid` on the host, or when unknown (0 in a
    /// report written before there was this field).
    #[serde(default)]
    pub ns_pid: Pid,
    pub ppid: Pid,
    pub comm: String,
    pub exe: String,
    /// The container's full id, or the cgroup path of a process in a pid namespace of its
    /// own that no runtime names (see [`crate::container`]); null on the host.
    #[serde(default)]
    pub container: Option<String>,
    pub limit: Limit,
    pub peak_open: u64,
    pub open_at_end: u64,
    pub exit_code: Option<i32>,
    pub exited: bool,
    /// TCP connections accepted just after an EMFILE/ENFILE and closed with nothing read or
    /// written (libuv's reserve-descriptor trick, or any server with that policy): a proxy
    /// answers each with a 502.
    #[serde(default)]
    pub dropped_at_emfile: u64,
    /// Those whose request had arrived: the close reset them ("connection reset by peer");
    /// the others look closed early ("upstream prematurely closed connection").
    #[serde(default)]
    pub dropped_at_emfile_request_waiting: u64,
    /// Where the latest of them was accepted, innermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped_at_emfile_frames: Vec<FrameReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    pub kind: FdKind,
    pub open: u64,
    pub opened: u64,
    pub closed: u64,
    pub oldest_age_ms: u64,
    pub inherited: bool,
    /// Found by reconciliation with /proc, never seen created (SCM_RIGHTS, io_uring, losses).
    pub unattributed: bool,
    pub pid: Pid,
    pub fds: Vec<i32>,
    pub targets: Vec<String>,
    pub frames: Vec<FrameReport>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameReport {
    pub function: Option<String>,
    pub file: Option<String>,
    /// The source file with its directory, when the debug info has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    pub addr: String,
    pub lang: Lang,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IncidentReport {
    pub time: String,
    pub mono_ns: u64,
    pub pid: Pid,
    pub tid: u32,
    pub syscall: String,
    pub errno: String,
    pub open_fds: u64,
    pub limit: u64,
    pub frames: Vec<FrameReport>,
    pub blame: Vec<BlameReport>,
    /// For accept and accept4: the listening socket's queue at that instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Listen>,
}

/// DESIGN.md's `upstream_failures[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamReport {
    pub pid: Pid,
    pub comm: String,
    /// `127.0.0.1:8001`, `[::1]:8001`, `unix:/run/app.sock`; empty when unknown.
    pub peer: String,
    /// "connect": the connection was never made; "response": it was, and no answer came.
    pub phase: String,
    pub cause: String,
    /// Empty for an early close, which has none.
    pub errno: String,
    pub count: u64,
    pub first: String,
    pub last: String,
    /// For refused TCP connects, what does listen on the peer's host, and who: the port
    /// nginx should have used ("127.0.0.1:8000 (uvicorn pid 4242)"). Live sessions only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listening: Vec<String>,
    /// How long the connections lasted, for the timeouts and early ends (from the connect
    /// for the connect phase, from the completed handshake for the response phase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<DurationMs>,
    /// With `--nginx-conf`, for timeouts: the directive whose timer ends that phase, with its
    /// values ("proxy_read_timeout 1s"), and whether the durations end at one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nginx_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub at_nginx_timeout: bool,
}

/// Shortest, longest and mean duration, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurationMs {
    pub min: u64,
    pub max: u64,
    pub mean: u64,
}

impl UpstreamReport {
    /// nginx's terms: "nginx pid 81: 7 connects to 127.0.0.1:8001 refused (ECONNREFUSED:
    /// nothing listens there: ...)", "nginx pid 81: 5 requests to 127.0.0.1:8000 unanswered,
    /// closed after 1.00 s (...)".
    pub fn line(&self) -> String {
        let peer = if self.peer.is_empty() {
            "an unknown address"
        } else {
            &self.peer
        };
        let n = self.count;
        let s = if n == 1 { "" } else { "s" };
        let after = self.duration_ms.map_or(String::new(), |d| {
            let secs = |ms: u64| format!("{:.2}", ms as f64 / 1000.0);
            if d.max - d.min < 10 {
                format!(" after {} s", secs(d.mean))
            } else {
                format!(" after {}-{} s", secs(d.min), secs(d.max))
            }
        });
        let what = match (self.phase.as_str(), self.cause.as_str()) {
            ("response", "timeout") => {
                format!(
                    "{n} request{s} to {peer} unanswered, closed by {}{after}",
                    self.comm
                )
            }
            ("response", "closed_early") => {
                format!("{n} request{s} to {peer} closed by the peer before any answer{after}")
            }
            ("response", _) => format!("{n} connection{s} to {peer} reset{after}"),
            (_, cause) => {
                let verb = match cause {
                    "refused" => "refused",
                    "permission" => "denied",
                    "timeout" => "timed out",
                    "backlog_full" if !self.peer.starts_with("unix:") => "timed out",
                    _ => "failed",
                };
                format!("{n} connect{s} to {peer} {verb}{after}")
            }
        };
        let mut why: Vec<String> = Vec::new();
        let meaning = crate::model::upstream_meaning(&self.phase, &self.cause, &self.peer);
        match (self.errno.is_empty(), meaning.is_empty()) {
            (false, false) => why.push(format!("{}: {meaning}", self.errno)),
            (false, true) => why.push(self.errno.clone()),
            (true, false) => why.push(meaning.to_string()),
            (true, true) => {}
        }
        if let Some(directive) = &self.nginx_timeout {
            why.push(if self.at_nginx_timeout && self.phase == "connect" {
                format!("nginx's {directive}: nginx gave up on the handshake at its timer")
            } else if self.at_nginx_timeout {
                format!("nginx's {directive}: the app takes longer than nginx waits")
            } else {
                format!(
                    "nginx's {directive}, which these did not reach: the client went away first, or another timer ended them"
                )
            });
        }
        if !self.listening.is_empty() {
            why.push(format!(
                "listening on that host: {}",
                self.listening.join(", ")
            ));
        }
        format!(
            "{} pid {}: {what} ({}), {} to {}",
            self.comm,
            self.pid,
            why.join("; "),
            self.first,
            self.last
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlameReport {
    pub kind: FdKind,
    pub open: u64,
    pub inherited: bool,
    pub frames: Vec<FrameReport>,
}

impl From<&Frame> for FrameReport {
    fn from(f: &Frame) -> Self {
        Self {
            function: f.function.clone(),
            file: f.file.clone(),
            path: f.path.clone(),
            line: f.line,
            module: f.module.clone(),
            addr: format!("{:#x}", f.addr),
            lang: f.lang,
        }
    }
}

fn frames(stacks: &Stacks, id: crate::model::StackId) -> Vec<FrameReport> {
    stacks.get(id).iter().map(FrameReport::from).collect()
}

impl Report {
    pub fn build(model: &Model, stacks: &Stacks, clock: &WallClock) -> Self {
        let mut processes = Vec::new();
        let mut sites = Vec::new();
        for p in model.processes.values() {
            let open = model.open_fds(p.pid);
            let end_ns = p.exit.as_ref().map_or(model.last_ns, |e| e.ts);
            let unanswered = model.unanswered_of(p);
            processes.push(ProcessReport {
                pid: p.pid,
                ns_pid: p.info.ns_pid_or(p.pid),
                ppid: p.info.ppid,
                comm: p.info.comm.clone(),
                exe: p.info.exe.clone(),
                container: p.info.container.as_deref().map(|c| c.as_str().to_string()),
                limit: p.info.limit,
                peak_open: p.peak_open,
                open_at_end: model.open_count(p.pid),
                exit_code: p.exit.as_ref().and_then(|e| e.code),
                exited: p.exit.is_some(),
                dropped_at_emfile: unanswered.count,
                dropped_at_emfile_request_waiting: unanswered.request_waiting,
                dropped_at_emfile_frames: if unanswered.count > 0 {
                    frames(stacks, unanswered.stack)
                } else {
                    Vec::new()
                },
            });
            // A clean exit keeps no descriptors: it has no sites here, which is how the text
            // report knows to count it rather than list it.
            let mut by_site: BTreeMap<SiteId, Vec<(i32, &crate::model::OpenFd)>> = BTreeMap::new();
            for (n, fd) in open.into_iter().flat_map(FdView::iter) {
                by_site.entry(fd.site()).or_default().push((n, fd));
            }
            for (site_id, fds) in by_site {
                let Some(site) = model.sites.get(site_id) else {
                    continue;
                };
                let oldest = fds.iter().map(|(_, f)| f.opened_ns).min().unwrap_or(end_ns);
                let mut targets: Vec<String> = Vec::new();
                for (_, f) in &fds {
                    if targets.len() < 5 && !targets.iter().any(|t| **t == *f.target) {
                        targets.push(f.target.to_string());
                    }
                }
                sites.push(SiteReport {
                    kind: site.kind,
                    open: fds.len() as u64,
                    opened: site.opened,
                    closed: site.closed,
                    oldest_age_ms: end_ns.saturating_sub(oldest) / 1_000_000,
                    inherited: site.origin == Origin::Inherited,
                    unattributed: site.origin == Origin::Reconciled,
                    pid: p.pid,
                    fds: fds.iter().map(|(n, _)| *n).collect(),
                    targets,
                    frames: frames(stacks, site.stack),
                });
            }
        }
        // Most descriptors first; inherited ones (stdio) after the program's own at equal counts.
        sites.sort_by(|a, b| {
            b.open
                .cmp(&a.open)
                .then(a.inherited.cmp(&b.inherited))
                .then(a.pid.cmp(&b.pid))
        });

        let emfile = model
            .incidents
            .iter()
            .map(|inc| IncidentReport {
                time: clock.rfc3339(inc.ts),
                mono_ns: inc.ts,
                pid: inc.pid,
                tid: inc.tid,
                syscall: fdtrace_common::syscalls::name(inc.syscall)
                    .unwrap_or("unknown")
                    .to_string(),
                errno: inc.errno.name().to_string(),
                open_fds: inc.open_fds,
                limit: inc.limit,
                frames: frames(stacks, inc.stack),
                listen: inc.listen.clone(),
                blame: inc
                    .blame
                    .iter()
                    .take(BLAME_LISTED)
                    .enumerate()
                    .filter_map(|(rank, &(site, open))| {
                        let s = model.sites.get(site)?;
                        Some(BlameReport {
                            kind: s.kind,
                            open,
                            inherited: s.origin == Origin::Inherited,
                            frames: if rank < BLAME_WITH_FRAMES {
                                frames(stacks, s.stack)
                            } else {
                                Vec::new()
                            },
                        })
                    })
                    .collect(),
            })
            .collect();

        Report {
            schema: SCHEMA.to_string(),
            fdtrace_version: env!("CARGO_PKG_VERSION").to_string(),
            duration_ms: model.last_ns.saturating_sub(model.first_ns) / 1_000_000,
            dropped_events: model.dropped,
            lost: model.losses,
            processes,
            sites,
            emfile,
            emfile_not_listed: model
                .incidents_total
                .saturating_sub(model.incidents.len() as u64),
            corrections: model.corrections,
            upstream_failures: upstream_failures(model, clock),
            folded: FoldedReport::build(&model.folded, stacks),
        }
    }

    /// Names, for each refused TCP connect, the listeners on the peer's host in the failing
    /// process's network namespace and who holds them (the wrong-port mistake), reading /proc.
    pub fn name_listeners(&mut self) {
        for u in self
            .upstream_failures
            .iter_mut()
            .filter(|u| u.cause == "refused")
        {
            let Some((host, _)) = u.peer.rsplit_once(':') else {
                continue;
            };
            if u.peer.starts_with("unix:") {
                continue;
            }
            // Its own listeners (nginx's) are not where it meant to connect.
            let own = crate::procfs::socket_inodes(u.pid);
            let listeners: Vec<crate::procfs::TcpListener> = crate::procfs::tcp_listeners(u.pid)
                .into_iter()
                .filter(|l| !own.contains(&l.inode))
                .filter(|l| {
                    l.address
                        .rsplit_once(':')
                        .is_some_and(|(h, _)| h == host || h == "0.0.0.0" || h == "[::]")
                })
                .collect();
            let inodes: Vec<u64> = listeners.iter().map(|l| l.inode).collect();
            let owners = crate::procfs::socket_owners(&inodes);
            u.listening = listeners
                .into_iter()
                .map(|l| match owners.get(&l.inode) {
                    Some(owner) => format!("{} ({owner})", l.address),
                    None => l.address,
                })
                .collect();
        }
    }

    /// Names, for each timeout, the nginx directive whose timer ends that phase, and whether
    /// the durations end at it.
    pub fn compare_nginx(&mut self, timeouts: &crate::nginx::Timeouts) {
        for u in &mut self.upstream_failures {
            // The timeouts nginx makes up itself: a connect abandoned (a full backlog's
            // included), an answer waited for.
            let (Some(d), true) = (u.duration_ms, u.errno == "ETIMEDOUT") else {
                continue;
            };
            let ms = std::time::Duration::from_millis;
            let (directive, matches) = timeouts.explain(&u.phase, ms(d.min), ms(d.max));
            u.nginx_timeout = Some(directive);
            u.at_nginx_timeout = matches;
        }
    }

    /// Descriptors the traced programs themselves left open (not inherited ones like stdio).
    pub fn leaked(&self) -> u64 {
        let listed: u64 = self
            .sites
            .iter()
            .filter(|s| !s.inherited)
            .map(|s| s.open)
            .sum();
        let folded: u64 = self
            .folded
            .open_at_exit
            .iter()
            .filter(|s| !s.inherited)
            .map(|s| s.open)
            .sum();
        listed + folded
    }

    /// The processes that exited clean (see [`crate::model::ProcessExit::clean`]): those
    /// listed, which have no sites, and those folded, by command.
    fn clean_exits(&self) -> Vec<CommandCount> {
        let with_sites: HashSet<Pid> = self.sites.iter().map(|s| s.pid).collect();
        let listed = self
            .processes
            .iter()
            .filter(|p| p.exited && !with_sites.contains(&p.pid) && p.dropped_at_emfile == 0)
            .map(|p| (p.comm.as_str(), 1));
        let folded = self
            .folded
            .clean
            .iter()
            .map(|c| (c.comm.as_str(), c.processes));
        by_count(listed.chain(folded))
    }

    /// Whether `p` is listed on its own (alive, or something besides stdio open at exit).
    fn listed<T>(p: &ProcessReport, by_pid: &HashMap<Pid, T>) -> bool {
        !p.exited || by_pid.contains_key(&p.pid) || p.dropped_at_emfile > 0
    }

    /// The sites of each process, in report order.
    fn sites_by_pid(&self) -> HashMap<Pid, Vec<&SiteReport>> {
        let mut by_pid: HashMap<Pid, Vec<&SiteReport>> = HashMap::new();
        for s in &self.sites {
            by_pid.entry(s.pid).or_default().push(s);
        }
        by_pid
    }

    /// "4,998 processes exited clean (bash ×3,000, cat ×1,998)", or None when none did.
    pub fn clean_summary(&self) -> Option<String> {
        let clean = self.clean_exits();
        let total: u64 = clean.iter().map(|c| c.processes).sum();
        if total == 0 {
            return None;
        }
        let mut names: Vec<String> = clean
            .iter()
            .take(COMMANDS_NAMED)
            .map(|c| {
                let name = if c.comm.is_empty() {
                    "other commands"
                } else {
                    &c.comm
                };
                format!("{name} ×{}", thousands(c.processes))
            })
            .collect();
        if clean.len() > COMMANDS_NAMED {
            let rest: u64 = clean[COMMANDS_NAMED..].iter().map(|c| c.processes).sum();
            names.push(format!(
                "{} more commands ×{}",
                clean.len() - COMMANDS_NAMED,
                thousands(rest)
            ));
        }
        Some(format!(
            "{} process{} exited clean ({})",
            thousands(total),
            if total == 1 { "" } else { "es" },
            names.join(", ")
        ))
    }

    /// Lines on the processes folded with descriptors open at exit, or none.
    fn folded_lines(&self) -> Vec<String> {
        let f = &self.folded;
        let clean: u64 = f.clean.iter().map(|c| c.processes).sum();
        let others = f.processes.saturating_sub(clean);
        if others == 0 {
            return Vec::new();
        }
        let mut lines = vec![format!(
            "{} more process{} exited with descriptors open (kept as counts to bound memory):",
            thousands(others),
            if others == 1 { "" } else { "es" }
        )];
        for g in f.open_at_exit.iter().take(FOLDED_GROUPS_SHOWN) {
            let place = if g.inherited {
                "open before tracing".to_string()
            } else if g.unattributed {
                "found in /proc, never seen created".to_string()
            } else {
                place(&g.frames)
            };
            lines.push(format!(
                "  {} {} in {} {} process{} at {place}",
                thousands(g.open),
                g.kind.name(),
                thousands(g.processes),
                g.comm,
                if g.processes == 1 { "" } else { "es" }
            ));
        }
        let hidden: u64 = f
            .open_at_exit
            .iter()
            .skip(FOLDED_GROUPS_SHOWN)
            .map(|g| g.open)
            .sum::<u64>()
            + f.ungrouped_open;
        if hidden > 0 {
            lines.push(format!(
                "  {} more descriptors from other sites",
                thousands(hidden)
            ));
        }
        lines
    }

    /// Processes listed and folded.
    fn process_total(&self) -> u64 {
        self.processes.len() as u64 + self.folded.processes
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("the report is plain data");
        s.push('\n');
        s
    }

    /// valgrind-style text: per process, each site with its count, kind, example targets and
    /// stack innermost first, then every incident with its blame.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let by_pid = self.sites_by_pid();
        let none = Vec::new();
        let sites_of = |pid: Pid| by_pid.get(&pid).unwrap_or(&none);
        // Exited processes that left the same things open from the same places (recycled
        // workers, a script's children inheriting one descriptor) are listed once: the first,
        // then how many more and which.
        let mut alike: HashMap<String, Vec<Pid>> = HashMap::new();
        let mut listed: Vec<(&ProcessReport, Option<String>)> = Vec::new();
        for p in self.processes.iter().filter(|p| Self::listed(p, &by_pid)) {
            if !p.exited {
                listed.push((p, None));
                continue;
            }
            let key = signature(p, sites_of(p.pid));
            if let Some(more) = alike.get_mut(&key) {
                more.push(p.pid);
                continue;
            }
            alike.insert(key.clone(), Vec::new());
            listed.push((p, Some(key)));
        }
        for (p, key) in listed {
            let tag = format!("=={}==", p.pid);
            let mine = sites_of(p.pid);
            let leaked: u64 = mine.iter().filter(|s| !s.inherited).map(|s| s.open).sum();
            let inherited: u64 = mine.iter().filter(|s| s.inherited).map(|s| s.open).sum();
            let when = if p.exited { "at exit" } else { "now" };
            // Host processes' lines stay as they were; 0 is a report from before `ns_pid`.
            let ns_pid = if p.ns_pid == 0 { p.pid } else { p.ns_pid };
            let placement = container::placement(p.pid, ns_pid, p.container.as_deref())
                .map(|s| format!(", {s}"))
                .unwrap_or_default();
            let _ = writeln!(
                w,
                "{tag} FILE DESCRIPTORS: {} open {when} ({leaked} opened while traced, {inherited} inherited) in {} [{}], limit {}, peak {}{placement}",
                p.open_at_end,
                p.comm,
                p.exe,
                fmt_limit(p.limit.soft),
                p.peak_open
            );
            if let Some(line) = p.dropped_at_emfile_line() {
                let _ = writeln!(w, "{tag} {line}");
            }
            for s in mine.iter().filter(|s| !s.inherited) {
                let _ = writeln!(w, "{tag}");
                let _ = writeln!(
                    w,
                    "{tag} {} {} descriptor{} still open ({} opened, {} closed here; oldest {} ms): fds {}",
                    s.open,
                    s.kind.name(),
                    if s.open == 1 { "" } else { "s" },
                    s.opened,
                    s.closed,
                    s.oldest_age_ms,
                    fd_list(&s.fds)
                );
                if !s.targets.is_empty() {
                    let _ = writeln!(w, "{tag}    e.g. {}", s.targets.join(", "));
                }
                if s.unattributed {
                    let _ = writeln!(
                        w,
                        "{tag}    (found in /proc, never seen created: received over a socket, io_uring, or lost events)"
                    );
                }
                write_frames(w, &tag, &s.frames);
            }
            if inherited > 0 {
                let _ = writeln!(w, "{tag}");
                let _ = writeln!(
                    w,
                    "{tag} {inherited} descriptor(s) were open before tracing began (no stack)"
                );
            }
            if let Some(more) = key.and_then(|k| alike.get(&k)).filter(|m| !m.is_empty()) {
                let _ = writeln!(w, "{tag}");
                let shown: Vec<String> = more
                    .iter()
                    .take(PIDS_NAMED)
                    .map(ToString::to_string)
                    .collect();
                let _ = writeln!(
                    w,
                    "{tag} and {} more {} process{} exited with the same open at exit: pids {}{}",
                    thousands(more.len() as u64),
                    p.comm,
                    if more.len() == 1 { "" } else { "es" },
                    shown.join(", "),
                    if more.len() > PIDS_NAMED { ", ..." } else { "" }
                );
            }
            let _ = writeln!(w, "{tag}");
        }
        for (i, inc) in self.emfile.iter().enumerate() {
            let tag = format!("=={}==", inc.pid);
            let _ = writeln!(
                w,
                "{tag} {}: {} failed in thread {} at {} with {}/{} descriptors open",
                inc.errno,
                inc.syscall,
                inc.tid,
                inc.time,
                inc.open_fds,
                fmt_limit(inc.limit)
            );
            if i >= INCIDENTS_IN_FULL {
                continue;
            }
            write_frames(w, &tag, &inc.frames);
            if let Some(line) = inc.listen_line() {
                let _ = writeln!(w, "{tag}  {line}");
            }
            let _ = writeln!(w, "{tag}  the table at that instant:");
            for b in &inc.blame {
                let place = if b.inherited {
                    "open before tracing".to_string()
                } else {
                    place(&b.frames)
                };
                let _ = writeln!(w, "{tag}   {:>6} {:<8} {place}", b.open, b.kind.name());
            }
            let _ = writeln!(w, "{tag}");
        }
        if self.emfile_not_listed > 0 {
            let _ = writeln!(
                w,
                "==fdtrace== {} more EMFILE/ENFILE failures not listed",
                self.emfile_not_listed
            );
        }
        for u in &self.upstream_failures {
            let _ = writeln!(w, "=={}== upstream: {}", u.pid, u.line());
        }
        if let Some(clean) = self.clean_summary() {
            let _ = writeln!(w, "==fdtrace== {clean}");
        }
        for line in self.folded_lines() {
            let _ = writeln!(w, "==fdtrace== {line}");
        }
        let c = &self.corrections;
        let _ = writeln!(
            w,
            "==fdtrace== {} process(es), {} EMFILE/ENFILE, {} events lost, corrections from /proc: {} added, {} removed, {} reused",
            self.process_total(),
            self.emfile.len() as u64 + self.emfile_not_listed,
            self.dropped_events,
            c.added,
            c.removed,
            c.reused
        );
        let missed = self.lost.described();
        if !missed.is_empty() {
            let _ = writeln!(w, "==fdtrace== also missed: {}", missed.join(", "));
        }
        out
    }
}

impl Report {
    /// Markdown to paste into an issue: a table of processes, each leaking site with its stack
    /// folded in a `<details>`, every incident with its blame.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "### fdtrace report\n");
        let _ = writeln!(
            w,
            "fdtrace {} · {} ms traced · {} process(es) · {} descriptor(s) left open · {} EMFILE/ENFILE · {} events lost\n",
            self.fdtrace_version,
            self.duration_ms,
            self.process_total(),
            self.leaked(),
            self.emfile.len() as u64 + self.emfile_not_listed,
            self.dropped_events
        );
        let missed = self.lost.described();
        if !missed.is_empty() {
            let _ = writeln!(w, "Also missed: {}.\n", missed.join(", "));
        }
        let _ = writeln!(
            w,
            "| pid | ppid | command | executable | open at end | peak | limit | exit |"
        );
        let _ = writeln!(w, "|---:|---:|---|---|---:|---:|---:|---|");
        let by_pid = self.sites_by_pid();
        for p in self.processes.iter().filter(|p| Self::listed(p, &by_pid)) {
            let exit = match (p.exited, p.exit_code) {
                (true, Some(code)) => format!("exited {code}"),
                (true, None) => "exited".to_string(),
                (false, _) => "running".to_string(),
            };
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {exit} |",
                p.pid,
                p.ppid,
                md_cell(&p.comm),
                md_cell(&p.exe),
                p.open_at_end,
                p.peak_open,
                fmt_limit(p.limit.soft)
            );
        }
        for p in &self.processes {
            if let Some(line) = p.dropped_at_emfile_line() {
                let _ = writeln!(w, "\n**{} (pid {})**: {line}.", md_cell(&p.comm), p.pid);
            }
        }
        if let Some(clean) = self.clean_summary() {
            let _ = writeln!(w, "\n{clean}.");
        }
        let folded = self.folded_lines();
        if let Some((first, groups)) = folded.split_first() {
            let _ = writeln!(w, "\n{first}\n");
            for line in groups {
                let _ = writeln!(w, "- {}", line.trim_start());
            }
        }
        let leaking: Vec<&SiteReport> = self.sites.iter().filter(|s| !s.inherited).collect();
        if !leaking.is_empty() {
            let _ = writeln!(w, "\n#### Still open, by call site\n");
        }
        let comms: HashMap<Pid, &str> = self
            .processes
            .iter()
            .map(|p| (p.pid, p.comm.as_str()))
            .collect();
        let comm = |pid: Pid| comms.get(&pid).copied().unwrap_or("?");
        for s in leaking {
            let _ = writeln!(
                w,
                "**{} {} descriptor{}** in {} (pid {}) at `{}`: fds {} ({} opened, {} closed here; oldest {} ms){}",
                s.open,
                s.kind.name(),
                if s.open == 1 { "" } else { "s" },
                md_cell(comm(s.pid)),
                s.pid,
                place(&s.frames),
                fd_list(&s.fds),
                s.opened,
                s.closed,
                s.oldest_age_ms,
                if s.targets.is_empty() {
                    String::new()
                } else {
                    format!(", e.g. `{}`", s.targets.join("`, `"))
                }
            );
            if s.unattributed {
                let _ = writeln!(
                    w,
                    "\n_found in /proc, never seen created: received over a socket, io_uring, or lost events_"
                );
            }
            md_stack(w, "stack", &s.frames);
        }
        for inc in &self.emfile {
            let _ = writeln!(
                w,
                "\n#### {}: `{}` failed in pid {} (thread {}) at {} with {}/{} descriptors open\n",
                inc.errno,
                inc.syscall,
                inc.pid,
                inc.tid,
                inc.time,
                inc.open_fds,
                fmt_limit(inc.limit)
            );
            md_stack(w, "where it failed", &inc.frames);
            if let Some(line) = inc.listen_line() {
                let _ = writeln!(w, "{}.\n", capitalized(&line));
            }
            let _ = writeln!(w, "| held | kind | call site |");
            let _ = writeln!(w, "|---:|---|---|");
            for b in &inc.blame {
                let site = if b.inherited {
                    "open before tracing".to_string()
                } else {
                    format!("`{}`", place(&b.frames))
                };
                let _ = writeln!(w, "| {} | {} | {} |", b.open, b.kind.name(), md_cell(&site));
            }
        }
        if self.emfile_not_listed > 0 {
            let _ = writeln!(
                w,
                "\n{} more EMFILE/ENFILE failures not listed.",
                self.emfile_not_listed
            );
        }
        if !self.upstream_failures.is_empty() {
            let _ = writeln!(w, "\n#### Upstream failures\n");
            let _ = writeln!(
                w,
                "| pid | command | peer | cause | errno | count | first | last |"
            );
            let _ = writeln!(w, "|---:|---|---|---|---|---:|---|---|");
            for u in &self.upstream_failures {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    u.pid,
                    md_cell(&u.comm),
                    md_cell(&u.peer),
                    u.cause,
                    u.errno,
                    u.count,
                    u.first,
                    u.last
                );
            }
        }
        let c = &self.corrections;
        if c.added + c.removed + c.reused > 0 {
            let _ = writeln!(
                w,
                "\nCorrections from /proc: {} added, {} removed, {} reused.",
                c.added, c.removed, c.reused
            );
        }
        out
    }
}

/// A table cell: pipes would end it early.
fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// A stack folded in a `<details>` block, innermost frame first.
fn md_stack(w: &mut String, summary: &str, frames: &[FrameReport]) {
    let _ = writeln!(w, "\n<details><summary>{summary}</summary>\n\n```");
    if frames.is_empty() {
        let _ = writeln!(w, "(no stack)");
    }
    for (i, f) in frames.iter().enumerate() {
        let _ = writeln!(w, "{} {}", if i == 0 { "at" } else { "by" }, fmt_frame(f));
    }
    let _ = writeln!(w, "```\n\n</details>\n");
}

fn write_frames(w: &mut String, tag: &str, frames: &[FrameReport]) {
    if frames.is_empty() {
        let _ = writeln!(w, "{tag}    (no stack)");
    }
    for (i, f) in frames.iter().enumerate() {
        let _ = writeln!(
            w,
            "{tag}    {} {}",
            if i == 0 { "at" } else { "by" },
            fmt_frame(f)
        );
    }
}

/// `function (file:line) [module]`, or `module+offset` when nothing resolved.
pub fn fmt_frame(f: &FrameReport) -> String {
    let mut s = f.function.clone().unwrap_or_else(|| f.addr.clone());
    if let Some(file) = &f.file {
        let _ = write!(s, " ({file}");
        if let Some(line) = f.line {
            let _ = write!(s, ":{line}");
        }
        s.push(')');
    }
    if let Some(module) = &f.module {
        let _ = write!(s, " [{module}]");
    }
    s
}

/// The model's upstream failure groups, most first.
fn upstream_failures(model: &Model, clock: &WallClock) -> Vec<UpstreamReport> {
    model
        .upstream_groups()
        .into_iter()
        .map(|(pid, comm, peer, failure, g)| UpstreamReport {
            pid,
            comm: comm.to_string(),
            peer: peer.to_string(),
            phase: failure.phase.to_string(),
            cause: failure.cause.to_string(),
            errno: crate::model::errno_name(g.errno),
            count: g.count,
            first: clock.rfc3339(g.first_ns),
            last: clock.rfc3339(g.last_ns),
            listening: Vec::new(),
            duration_ms: g.durations.map(|d| DurationMs {
                min: d.min_ns / 1_000_000,
                max: d.max_ns / 1_000_000,
                mean: d.total_ns / d.count.max(1) / 1_000_000,
            }),
            nginx_timeout: None,
            at_nginx_timeout: false,
        })
        .collect()
}

/// The frame that names a stack in one line: the first of the program's own (outside the C
/// library, the loader, Rust's and Python's runtimes), preferring a Python frame, then one
/// with a source line.
pub fn place(frames: &[FrameReport]) -> String {
    place_frame(frames).map_or_else(|| "(no stack)".to_string(), fmt_frame)
}

/// The frame [`place`] names.
pub fn place_frame(frames: &[FrameReport]) -> Option<&FrameReport> {
    let own = || {
        frames
            .iter()
            .filter(|f| f.function.is_some() && !is_runtime(f))
    };
    // In a Python program the Python caller says more than the C extension below it.
    own()
        .find(|f| f.lang == Lang::Python)
        .or_else(|| own().find(|f| f.file.is_some()))
        .or_else(|| own().next())
        .or(frames.first())
}

impl IncidentReport {
    /// "the listen queue of fd 6 (127.0.0.1:8000) held 12 of 128 ...", for accept failures.
    pub fn listen_line(&self) -> Option<String> {
        let l = self.listen.as_ref()?;
        let at = if l.address.is_empty() {
            String::new()
        } else {
            format!(" ({})", l.address)
        };
        Some(format!(
            "the listen queue of fd {}{at} held {} of {} connection{}: accepted by the kernel, waiting for the program (a proxy's connect succeeds, then it times out: 504)",
            l.fd,
            l.queued,
            l.backlog,
            if l.backlog == 1 { "" } else { "s" }
        ))
    }
}

impl ProcessReport {
    /// The connections it accepted at the limit and closed unanswered, in a proxy's words, or
    /// None when there were none.
    pub fn dropped_at_emfile_line(&self) -> Option<String> {
        let n = self.dropped_at_emfile;
        if n == 0 {
            return None;
        }
        let chain: Vec<&str> = self
            .dropped_at_emfile_frames
            .iter()
            .filter(|f| f.lang == Lang::Native && !is_runtime(f))
            .filter_map(|f| f.function.as_deref())
            .take(3)
            .collect();
        let via = if chain.is_empty() {
            String::new()
        } else {
            format!(", accepted in {}", chain.join(" ← "))
        };
        Some(format!(
            "{n} connection{} accepted and closed unanswered while the table was full ({} with the request waiting, reset){via}; a proxy sees these as \"upstream prematurely closed connection\" or \"connection reset by peer\" (502)",
            if n == 1 { "" } else { "s" },
            self.dropped_at_emfile_request_waiting,
        ))
    }
}

/// Frames of the C library and language runtimes, skipped when naming "the" place in the program.
fn is_runtime(f: &FrameReport) -> bool {
    let module = f.module.as_deref().unwrap_or("");
    let path = f.path.as_deref().unwrap_or("");
    ["libc.so", "ld-linux", "libpthread", "libstdc++", "libpython", "python3"]
        .iter()
        .any(|m| module.starts_with(m))
        // Rust's standard library: built at /rustc/<commit>/library, or resolved to a local
        // rust-src (…/rustlib/src/rust/library/std/…).
        || path.starts_with("/rustc/")
        || ["/library/std/", "/library/core/", "/library/alloc/"].iter().any(|d| path.contains(d))
        // Python's standard library (socket.py wrapping the program's socket() call).
        || (f.lang == Lang::Python && (path.contains("/lib/python3.") || path.starts_with("<frozen ")))
}

fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

fn fmt_limit(limit: u64) -> String {
    if limit == u64::MAX {
        "unlimited".into()
    } else {
        limit.to_string()
    }
}

/// What an exited process left open, without what differs between processes that did the
/// same: its command and container (the first one's line names it for all), and per site the
/// kind, origin, count and stack (not the pid, the descriptor numbers, the targets or the
/// addresses).
fn signature(p: &ProcessReport, sites: &[&SiteReport]) -> String {
    let container = p.container.as_deref().unwrap_or("");
    let mut key = format!("{}\0{}\0{container}", p.comm, p.exe);
    for s in sites {
        let _ = write!(
            key,
            "\0{} {} {} {}",
            s.kind.name(),
            s.inherited,
            s.unattributed,
            s.open
        );
        for f in &s.frames {
            let _ = write!(
                key,
                "|{:?} {:?} {:?} {:?}",
                f.function, f.file, f.line, f.module
            );
        }
    }
    key
}

/// `4,998`: counts of processes run into the thousands.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `3-9, 12` from a sorted list.
fn fd_list(fds: &[i32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < fds.len() {
        let start = fds[i];
        let mut end = start;
        while i + 1 < fds.len() && fds[i + 1] == end + 1 {
            i += 1;
            end = fds[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
        if parts.len() == 12 && i < fds.len() {
            parts.push(format!("... ({} more)", fds.len() - i));
            break;
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4_998), "4,998");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn fd_lists_compress_runs() {
        assert_eq!(fd_list(&[3, 4, 5, 9, 11, 12]), "3-5, 9, 11-12");
        assert_eq!(fd_list(&[]), "");
    }
}
