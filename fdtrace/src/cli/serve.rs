//! `fdtrace serve`: the always-on mode. Traces the selected processes (and those that start
//! matching later) for as long as it runs, serves Prometheus metrics, and with
//! `--flight-recorder` writes a recording when a process hits EMFILE/ENFILE or crosses
//! `--warn-at`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

use super::{MatchArgs, ProbeArgs, check_privileges, select_options};
use crate::{
    headroom,
    metrics::{self, Exposition, ServeCounters},
    model::{Event, Pid},
    record::flight::{self, FlightOptions, FlightRecorder, Written},
    session::Session,
    signals,
};

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Process to trace (repeat for several). Once it exits, it is gone from the metrics, and
    /// serve goes on.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    #[command(flatten)]
    select: MatchArgs,
    /// Also trace the processes the --pid ones have forked and will fork (--comm, --cgroup and
    /// --container always do).
    #[arg(long)]
    follow: bool,
    /// Where to serve /metrics and /healthz.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// Keep the last seconds of what a recording holds in memory, and write them with the 10 s
    /// that follow to DIR/fdtrace-COMM-PID-UNIXTIME.fdtrace when a process first hits
    /// EMFILE/ENFILE or crosses --warn-at.
    #[arg(long, value_name = "DIR")]
    flight_recorder: Option<PathBuf>,
    /// How many seconds a flight recording reaches back (at least).
    #[arg(long, value_name = "N", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    flight_seconds: u64,
    /// Flight recordings kept in DIR; the oldest are removed first.
    #[arg(long, value_name = "K", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    flight_max_files: u64,
    /// Log (and with --flight-recorder, record) when a process's open descriptors reach PERCENT
    /// of its limit (RLIMIT_NOFILE).
    #[arg(long, value_name = "PERCENT", value_parser = crate::headroom::parse_percent)]
    warn_at: Option<f64>,
    #[command(flatten)]
    pub(crate) probe: ProbeArgs,
}

/// How often the metrics are rendered from the model.
const RENDER_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    if args.pids.is_empty() && args.select.is_empty() {
        bail!(
            "serve what? give --pid PID, --comm NAME, --cgroup PATH or --container ID (each repeatable)"
        );
    }
    for &pid in &args.pids {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with pid {pid}");
        }
    }
    let selection = args.select.resolve(&args.pids)?;
    check_privileges()?;
    let listener = metrics::bind(args.listen)?;
    let options = select_options(args.probe, args.follow, false, &selection);
    let mut session = Session::start(options)?;
    let mut flight = match &args.flight_recorder {
        Some(dir) => {
            let flight = FlightRecorder::new(FlightOptions {
                dir: dir.clone(),
                window: Duration::from_secs(args.flight_seconds),
                max_files: args.flight_max_files as usize,
                stack_bytes: args.probe.stack_bytes,
            })
            .with_context(|| format!("creating {}", dir.display()))?;
            session.set_observer(Box::new(flight.observer()));
            Some(flight)
        }
        None => None,
    };
    for &pid in &args.pids {
        // Gone since the check above: not an error for a service.
        if let Err(err) = session.add(pid) {
            eprintln!("fdtrace: {err:#}");
            continue;
        }
        if options.follow {
            session.add_descendants(pid);
        }
    }
    session.select(&selection)?;
    signals::install();
    signals::install_hangup();
    let exposition = Exposition::default();
    let (stop_http, stopped) = tokio::sync::oneshot::channel();
    let http = metrics::spawn_server(listener, exposition.clone(), stopped)?;
    eprintln!(
        "fdtrace: serving metrics on http://{}/metrics{}",
        args.listen,
        if selection.selects_later() {
            format!(
                "; tracing processes matching {} as they start",
                selection.describe_later()
            )
        } else {
            String::new()
        }
    );

    let mut counters = ServeCounters::default();
    let mut headroom = args.warn_at.map(headroom::Watch::new);
    // Processes (pid, start) that hit EMFILE/ENFILE: each triggers one recording.
    let mut failed: BTreeSet<(Pid, u64)> = BTreeSet::new();
    let mut last_render: Option<Instant> = None;
    loop {
        let events = session.pump(Duration::from_millis(200));
        let mut triggers: Vec<(Pid, u64, &'static str)> = Vec::new();
        for event in &events {
            if let Event::Failed {
                pid,
                ts,
                syscall,
                errno,
                ..
            } = event
            {
                counters
                    .failures
                    .count(&session.model, *pid, *syscall, *errno);
                let started = session.model.processes.get(pid).map_or(0, |p| p.started_ns);
                if failed.insert((*pid, started)) {
                    triggers.push((*pid, *ts, errno.name()));
                }
            }
        }
        if let Some(watch) = &mut headroom {
            for c in watch.observe(&session.model, &events) {
                log_line(&c.describe(watch.percent()));
                triggers.push((
                    c.pid,
                    c.first_ns.unwrap_or(session.model.last_ns),
                    "--warn-at",
                ));
            }
        }
        if let Some(flight) = &mut flight {
            for written in flight.sync(&session.model, &session.tracer.stacks) {
                counters.recordings += 1;
                log_written(&written);
            }
            for (pid, ts, why) in triggers {
                if flight.capturing(pid) {
                    continue;
                }
                let comm = session
                    .model
                    .processes
                    .get(&pid)
                    .map_or_else(String::new, |p| p.info.comm.clone());
                match flight.trigger(&session.tracer.stacks, session.clock, pid, &comm, ts) {
                    Ok(path) => log_line(&format!(
                        "{why} in pid {pid} ({comm}): writing the flight recording {} (the {} s after it follow)",
                        path.display(),
                        flight::AFTER.as_secs()
                    )),
                    Err(err) => log_line(&format!(
                        "{why} in pid {pid} ({comm}): could not write a flight recording: {err}"
                    )),
                }
            }
        }
        if last_render.is_none_or(|t| t.elapsed() >= RENDER_EVERY) {
            exposition.render(&session.model, &session.tracer.stacks, &mut counters);
            last_render = Some(Instant::now());
        }
        if signals::take_hangup()
            && let Err(err) = crate::tui::logfile::reopen()
        {
            eprintln!("fdtrace: reopening the log on SIGHUP: {err}");
        }
        if signals::take().is_some() {
            break;
        }
    }
    if let Some(flight) = &mut flight {
        for written in flight.finish_all(&session.model, &session.tracer.stacks) {
            log_written(&written);
        }
    }
    let _ = stop_http.send(());
    let _ = http.join();
    eprintln!("fdtrace: stopped");
    Ok(ExitCode::SUCCESS)
}

/// A line for the journal (standard error under systemd) and the log file.
fn log_line(line: &str) {
    eprintln!("fdtrace: {line}");
    log::info!("{line}");
}

fn log_written(w: &Written) {
    log_line(&format!(
        "flight recording of pid {} written: {} ({} events, {:.1} s before{}, {} bytes)",
        w.pid,
        w.path.display(),
        w.stats.events,
        w.before_secs,
        if w.cut_short {
            ", cut short by the stop"
        } else {
            ""
        },
        w.stats.bytes
    ));
}
