//! `fdtrace run -- CMD`: trace a command from its first instruction, report at its exit.

use std::{
    process::ExitCode,
    sync::mpsc,
    time::{Duration, Instant},
};

use super::{Format, RunArgs, check_privileges, emit_report};
use crate::{
    clock::monotonic_ns,
    headroom::{self, Crossing},
    launch,
    session::Session,
    signals,
};

/// How long `run` waits, after the command exited, for the tracer to consume what was written
/// before: only a tracer stalled for good takes this long.
const CATCH_UP_MAX: Duration = Duration::from_secs(30);

/// The exit status when a process crossed `--warn-at` and no `--error-exitcode` was given.
pub(crate) const WARN_EXIT: u8 = 3;

pub(crate) fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    if let Err(err) = launch::check_command(&args.command[0]) {
        // As a shell says it, and with its status: nothing ran, so there is nothing to report.
        eprintln!("fdtrace: cannot run {}: {err}", args.command[0]);
        return Ok(ExitCode::from(err.exit_code()));
    }
    check_privileges()?;
    let mut session = Session::start(args.probe.options(true, false))?;
    let child = launch::spawn_stopped(&args.command)?;
    session.watch_mappings(child.pid)?;
    session.add(child.pid)?;
    child.release();
    signals::install();
    let (tx, exited) = mpsc::channel();
    let pid = child.pid;
    std::thread::spawn(move || {
        let _ = tx.send(launch::wait_exit(pid));
    });

    let mut status = None;
    let mut watch = args.warn_at.map(headroom::Watch::new);
    loop {
        let drained = session.drained_until();
        let events = session.pump(Duration::from_millis(50));
        if let Some(watch) = &mut watch {
            watch.observe(&session.model, &events);
        }
        if let Some(sig) = signals::take() {
            // Ctrl-C at the terminal already reached the command (same process group).
            if !sig.from_terminal {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid as i32, sig.signal) };
            }
        }
        if status.is_none()
            && let Ok(code) = exited.try_recv()
        {
            status = Some((code, monotonic_ns(), Instant::now()));
        }
        if let Some((code, exit_ns, exit_at)) = status {
            let seen_exit = session
                .model
                .processes
                .get(&pid)
                .is_some_and(|p| !p.alive());
            // The exit record may have been lost: once everything written before the exit has
            // been consumed, the model is as complete as it will get.
            if seen_exit || drained >= exit_ns {
                session.exit_lost(pid, exit_ns);
                session.set_exit_code(pid, code);
                break;
            }
            if exit_at.elapsed() > CATCH_UP_MAX {
                eprintln!(
                    "fdtrace: the tracer had not caught up {}s after the command exited; reporting what it has",
                    CATCH_UP_MAX.as_secs()
                );
                session.set_exit_code(pid, code);
                break;
            }
        }
    }
    session.settle();
    let report = session.report();
    emit_report(&report, args.format, args.output.as_ref(), true)?;
    // The text report on the terminal says it already; a JSON or a file report would leave
    // the terminal without it.
    let shortfalls = session.shortfalls();
    if !shortfalls.is_empty() && (args.format != Format::Text || args.output.is_some()) {
        eprintln!("==fdtrace== also missed: {}", shortfalls.join(", "));
    }
    let crossings = watch.map_or_else(Vec::new, |w| w.crossings(&session.model));
    for crossing in &crossings {
        eprintln!(
            "{}",
            warning(crossing, args.warn_at.unwrap_or(100.0), &session)
        );
    }
    let code = status.map_or(1, |(code, _, _)| code);
    Ok(match args.error_exitcode {
        Some(n) if report.leaked() > 0 || !crossings.is_empty() => ExitCode::from(n),
        None if !crossings.is_empty() => ExitCode::from(WARN_EXIT),
        _ => ExitCode::from(code.clamp(0, 255) as u8),
    })
}

/// `==PID== WARNING: ...`, in the style of the report.
fn warning(c: &Crossing, percent: f64, session: &Session) -> String {
    let when = c.first_ns.map_or_else(String::new, |ns| {
        format!(" at {}", session.clock.rfc3339(ns))
    });
    format!(
        "=={pid}== WARNING: {comm} reached {threshold} open descriptors of its limit {limit} \
         (--warn-at {percent}%){when}; peak {peak} ({peak_pct:.0}%), {now} open at the end",
        pid = c.pid,
        comm = c.comm,
        threshold = c.threshold,
        limit = c.limit,
        peak = c.peak_open,
        peak_pct = c.peak_percent(),
        now = c.open_now,
    )
}
