//! `serve`'s Prometheus metrics (DESIGN.md "Prometheus metrics"): the model rendered as text
//! exposition, and the HTTP endpoint that serves it.
//!
//! The model lives on the tracing thread and is not shared: that thread renders the text once
//! a second ([`Exposition::render`]) and the HTTP thread serves the latest copy. A scrape is
//! at most a second behind the model, and it never waits for the tracer or slows it down.
//!
//! Cardinality stays bounded by what is alive: only live processes are exported, each with its
//! [`TOP_SITES`] call sites holding the most descriptors, so a process's series go with it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, RwLock, atomic::AtomicU64},
};

use anyhow::Context as _;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    model::{Errno, Model, Origin, Pid},
    report::FrameReport,
    tracer::Stacks,
};

/// Call sites exported per process.
pub const TOP_SITES: usize = 5;
/// Upstream failure groups (peer and cause) exported per process, most failures first.
pub const TOP_UPSTREAMS: usize = 10;
/// OpenMetrics, which Prometheus asks for first and prometheus-client writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic text format, for every other client (curl, promtool, older scrapers).
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

type Labels = Vec<(String, String)>;

/// EMFILE/ENFILE failures of the live processes by syscall and errno, counted from the events
/// (the model keeps only the first [`crate::model::MAX_INCIDENTS`] whole). A process's counts
/// go when it exits, with its other series.
#[derive(Debug, Default)]
pub struct FailureCounts {
    by_process: BTreeMap<(Pid, u64), BTreeMap<(u32, Errno), u64>>,
}

impl FailureCounts {
    pub fn count(&mut self, model: &Model, pid: Pid, syscall: u32, errno: Errno) {
        let started = model.processes.get(&pid).map_or(0, |p| p.started_ns);
        *self
            .by_process
            .entry((pid, started))
            .or_default()
            .entry((syscall, errno))
            .or_default() += 1;
    }

    /// Forgets the processes that are no longer alive.
    fn retain_alive(&mut self, model: &Model) {
        self.by_process.retain(|&(pid, started), _| {
            model
                .processes
                .get(&pid)
                .is_some_and(|p| p.alive() && p.started_ns == started)
        });
    }
}

/// What the tracing thread knows beyond the model.
#[derive(Debug, Default)]
pub struct ServeCounters {
    pub failures: FailureCounts,
    /// Flight recordings written.
    pub recordings: u64,
}

/// The latest rendered text, shared with the HTTP thread.
#[derive(Clone, Default)]
pub struct Exposition(Arc<RwLock<String>>);

impl Exposition {
    /// Renders the model's live processes into the text the next scrape gets.
    pub fn render(&self, model: &Model, stacks: &Stacks, counters: &mut ServeCounters) {
        counters.failures.retain_alive(model);
        let text = render(model, stacks, counters);
        if let Ok(mut current) = self.0.write() {
            *current = text;
        }
    }

    fn text(&self) -> String {
        self.0.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// The body and its content type for a client that sent `accept`.
    fn negotiate(&self, accept: Option<&str>) -> (&'static str, String) {
        let text = self.text();
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            (OPENMETRICS, text)
        } else {
            (TEXT_004, text_004(&text))
        }
    }
}

/// OpenMetrics text as the classic format (0.0.4): a counter's HELP and TYPE name its sample
/// (`fdtrace_emfile_total`), not its family, and there is no `# EOF` or `# UNIT`. Without
/// this, promtool and 0.0.4 parsers see each counter as an untyped metric without help.
fn text_004(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn render(model: &Model, stacks: &Stacks, counters: &ServeCounters) -> String {
    let open: Family<Labels, Gauge> = Family::default();
    let limit: Family<Labels, Gauge> = Family::default();
    let growth: Family<Labels, Gauge<f64, AtomicU64>> = Family::default();
    let emfile: Family<Labels, Counter> = Family::default();
    let site_open: Family<Labels, Gauge> = Family::default();
    let upstream: Family<Labels, Counter> = Family::default();
    for p in model.processes.values().filter(|p| p.alive()) {
        let mut labels: Labels = vec![
            ("pid".into(), p.pid.to_string()),
            ("comm".into(), p.info.comm.clone()),
        ];
        if let Some(container) = &p.info.container {
            labels.push(("container".into(), container.as_str().to_string()));
        }
        open.get_or_create(&labels)
            .set(model.open_count(p.pid) as i64);
        // Unlimited (u64::MAX) as +Inf would not be a gauge's integer: left out, as the
        // process exporter leaves out process_max_fds it cannot read.
        if p.info.limit.soft != u64::MAX {
            limit
                .get_or_create(&labels)
                .set(p.info.limit.soft.min(i64::MAX as u64) as i64);
        }
        growth.get_or_create(&labels).set(p.growth_per_min());
        if let Some(counts) = counters.failures.by_process.get(&(p.pid, p.started_ns)) {
            for (&(syscall, errno), &n) in counts {
                let mut l = labels.clone();
                l.push((
                    "syscall".into(),
                    fdtrace_common::syscalls::name(syscall)
                        .unwrap_or("unknown")
                        .into(),
                ));
                l.push(("errno".into(), errno.name().into()));
                emfile.get_or_create(&l).inc_by(n);
            }
        }
        let mut sites: Vec<_> = model.sites_of(p.pid).filter(|s| s.open > 0).collect();
        sites.sort_by_key(|s| std::cmp::Reverse(s.open));
        for s in sites.into_iter().take(TOP_SITES) {
            let place = if s.origin == Origin::Traced {
                let frames: Vec<FrameReport> =
                    stacks.get(s.stack).iter().map(FrameReport::from).collect();
                site_label(&frames)
            } else {
                "open before tracing".to_string()
            };
            let mut l = labels.clone();
            l.push(("kind".into(), s.kind.name().into()));
            l.push(("site".into(), place));
            // Two stacks can name the same place: their descriptors add up under it.
            site_open.get_or_create(&l).inc_by(s.open as i64);
        }
        let mut failed: Vec<_> = model
            .upstream
            .range(
                (
                    p.pid,
                    p.started_ns,
                    Arc::from(""),
                    crate::model::Failure::MIN,
                )..,
            )
            .take_while(|((pid, started, _, _), _)| *pid == p.pid && *started == p.started_ns)
            .collect();
        failed.sort_by_key(|(_, g)| std::cmp::Reverse(g.count));
        for ((_, _, peer, failure), g) in failed.into_iter().take(TOP_UPSTREAMS) {
            let mut l = labels.clone();
            l.push(("peer".into(), peer.to_string()));
            l.push(("phase".into(), failure.phase.to_string()));
            l.push(("cause".into(), failure.cause.to_string()));
            l.push(("errno".into(), crate::model::errno_name(g.errno)));
            upstream.get_or_create(&l).inc_by(g.count);
        }
    }
    let lost: Counter = Counter::default();
    lost.inc_by(model.losses.events());
    let recordings: Counter = Counter::default();
    recordings.inc_by(counters.recordings);

    let mut registry = Registry::default();
    registry.register("fdtrace_open_fds", "Descriptors open now", open);
    registry.register(
        "fdtrace_fd_limit",
        "The soft RLIMIT_NOFILE (absent when unlimited)",
        limit,
    );
    registry.register(
        "fdtrace_fd_growth_per_minute",
        "Net descriptors gained per minute over the last 30 s",
        growth,
    );
    registry.register(
        "fdtrace_emfile",
        "Syscalls that failed with EMFILE or ENFILE",
        emfile,
    );
    registry.register(
        "fdtrace_site_open_fds",
        "Descriptors open now by call site (the top 5 of each process)",
        site_open,
    );
    registry.register(
        "fdtrace_upstream_failures",
        "Outbound connections that failed, by peer and cause (the top 10 of each process)",
        upstream,
    );
    registry.register(
        "fdtrace_events_lost",
        "Events the probes could not deliver",
        lost,
    );
    registry.register(
        "fdtrace_flight_recordings",
        "Flight recordings written",
        recordings,
    );
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

/// "function (file:line)" (DESIGN.md), or "function [module]" without line tables: a label
/// stays short, and the module is what tells an unnamed frame apart.
fn site_label(frames: &[FrameReport]) -> String {
    let Some(f) = crate::report::place_frame(frames) else {
        return "(no stack)".into();
    };
    let function = f.function.as_deref().unwrap_or(&f.addr);
    match (&f.file, f.line, &f.module) {
        (Some(file), Some(line), _) => format!("{function} ({file}:{line})"),
        (Some(file), None, _) => format!("{function} ({file})"),
        (None, _, Some(module)) => format!("{function} [{module}]"),
        (None, _, None) => function.to_string(),
    }
}

/// Serves `/metrics` and `/healthz` on `listener` from a thread of its own until `shutdown`
/// fires.
pub fn spawn_server(
    listener: std::net::TcpListener,
    exposition: Exposition,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use axum::{Router, http::header, routing::get};

    listener
        .set_nonblocking(true)
        .context("setting the metrics socket non-blocking")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the HTTP runtime")?;
    std::thread::Builder::new()
        .name("fdtrace-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(err) => {
                        log::error!("metrics endpoint: {err}");
                        return;
                    }
                };
                let app = Router::new()
                    .route(
                        "/metrics",
                        get(move |headers: axum::http::HeaderMap| {
                            let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                            let (content_type, body) = exposition.negotiate(accept);
                            async move { ([(header::CONTENT_TYPE, content_type)], body) }
                        }),
                    )
                    .route("/healthz", get(|| async { "ok\n" }));
                let server = axum::serve(listener, app).with_graceful_shutdown(async {
                    let _ = shutdown.await;
                });
                if let Err(err) = server.await {
                    log::error!("metrics endpoint: {err}");
                }
            });
        })
        .context("starting the HTTP thread")
}

/// Binds `addr` for the metrics endpoint, with one line saying why not.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_sample_in_the_classic_format() {
        let om = "# HELP fdtrace_emfile Syscalls that failed.\n# TYPE fdtrace_emfile counter\nfdtrace_emfile_total{pid=\"1\"} 3\n# HELP fdtrace_open_fds Open.\n# TYPE fdtrace_open_fds gauge\nfdtrace_open_fds{pid=\"1\"} 7\n# EOF\n";
        assert_eq!(
            text_004(om),
            "# HELP fdtrace_emfile_total Syscalls that failed.\n# TYPE fdtrace_emfile_total counter\nfdtrace_emfile_total{pid=\"1\"} 3\n# HELP fdtrace_open_fds Open.\n# TYPE fdtrace_open_fds gauge\nfdtrace_open_fds{pid=\"1\"} 7\n"
        );
    }

    #[test]
    fn prometheus_gets_openmetrics_and_others_the_classic_format() {
        let e = Exposition::default();
        *e.0.write().unwrap() = "# EOF\n".into();
        let scraper = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(e.negotiate(Some(scraper)), (OPENMETRICS, "# EOF\n".into()));
        assert_eq!(e.negotiate(None), (TEXT_004, String::new()));
    }
}
