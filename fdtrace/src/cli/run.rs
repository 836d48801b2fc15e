//! `fdtrace run -- CMD`: trace a command from its first instruction, report at its exit.

use std::{
    process::ExitCode,
    sync::mpsc,
    time::{Duration, Instant},
};

use super::{RunArgs, check_privileges, emit_report};
use crate::{launch, session::Session, signals};

pub(crate) fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    check_privileges()?;
    let mut session = Session::start(args.probe.options(true))?;
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
    let mut deadline = None;
    loop {
        session.pump(Duration::from_millis(50));
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
            status = Some(code);
            deadline = Some(Instant::now() + Duration::from_millis(500));
        }
        if let (Some(code), Some(deadline)) = (status, deadline) {
            let seen_exit = session
                .model
                .processes
                .get(&pid)
                .is_some_and(|p| !p.alive());
            if seen_exit || Instant::now() > deadline {
                session.set_exit_code(pid, code);
                break;
            }
        }
    }
    let report = session.report();
    emit_report(&report, args.format, args.output.as_ref(), true)?;
    let code = status.unwrap_or(1);
    Ok(match args.error_exitcode {
        Some(n) if report.leaked() > 0 => ExitCode::from(n),
        _ => ExitCode::from(code.clamp(0, 255) as u8),
    })
}
