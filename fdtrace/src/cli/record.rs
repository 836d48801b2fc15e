//! `fdtrace record`: trace like `run` or `--pid` (`--comm`, `--cgroup`, `--container`) and write
//! what the model consumed to a file.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

use super::{MatchArgs, ProbeArgs, check_privileges, select_options};
use crate::{
    launch,
    model::Pid,
    probe::ProbeOptions,
    record::{self, Command, Header, Recorder, SessionRecorder},
    session::Session,
    signals,
};

#[derive(Debug, Args)]
pub(crate) struct RecordArgs {
    /// Process to record (repeat for several); or select processes by --comm, --cgroup or
    /// --container; or give a command after `--`.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    #[command(flatten)]
    select: MatchArgs,
    /// With --pid: also record the processes they have forked and will fork.
    #[arg(long)]
    follow: bool,
    /// The recording to write.
    #[arg(short = 'o', long = "output", value_name = "FILE", required = true)]
    output: PathBuf,
    /// Stop recording after SECS seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Replace paths, peer addresses, arguments and the host name with stable tokens.
    #[arg(long)]
    redact: bool,
    #[command(flatten)]
    pub(crate) probe: ProbeArgs,
    /// The command to run and record, and its arguments.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// How long a command that got our signal has to exit before recording stops anyway.
const GRACE: Duration = Duration::from_millis(500);

pub(crate) fn record(args: &RecordArgs) -> anyhow::Result<ExitCode> {
    let selecting = !args.pids.is_empty() || !args.select.is_empty();
    if selecting != args.command.is_empty() {
        bail!(
            "record what? give --pid PID, --comm NAME, --cgroup PATH or --container ID (each repeatable), or -- CMD [ARGS...], not both"
        );
    }
    if let Some(d) = args.duration
        && !(d.is_finite() && d > 0.0)
    {
        bail!("--duration takes a positive number of seconds");
    }
    for &pid in &args.pids {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with pid {pid}");
        }
    }
    if let Some(command) = args.command.first() {
        launch::check_command(command)
            .map_err(|err| anyhow::anyhow!("cannot run {command}: {err}"))?;
    }
    let selection = args.select.resolve(&args.pids)?;
    check_privileges()?;
    let launching = !args.command.is_empty();
    let options = ProbeOptions {
        // A recording holds every descriptor's lifetime (perfetto's slices): nothing is kept
        // in the kernel.
        keep: false,
        ..select_options(args.probe, args.follow || launching, false, &selection)
    };
    let mut session = Session::start(options)?;
    let started = Instant::now();
    let stop_at = args
        .duration
        .map(|secs| started + Duration::from_secs_f64(secs));
    let child = if launching {
        Some(launch::spawn_stopped(&args.command)?)
    } else {
        None
    };
    let commands: Vec<Command> = match &child {
        Some(child) => vec![Command {
            argv: args.command.clone(),
            ..Command::of_process(child.pid)
        }],
        None => args
            .pids
            .iter()
            .map(|&pid| Command::of_process(pid))
            .collect(),
    };
    let header = Header::here(session.clock, commands, args.probe.stack_bytes);
    let recorder = Recorder::create(&args.output, header, args.redact)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let mut recorder = SessionRecorder::install(&mut session, recorder);
    let write_error = |path: &Path| {
        format!(
            "writing {} (what was written before stays readable)",
            path.display()
        )
    };

    let mut exited = None;
    if let Some(child) = &child {
        session.watch_mappings(child.pid)?;
        session.add(child.pid)?;
        recorder
            .sync(&session)
            .with_context(|| write_error(&args.output))?;
        child.release();
        let (tx, rx) = mpsc::channel();
        let pid = child.pid;
        std::thread::spawn(move || {
            let _ = tx.send(launch::wait_exit(pid));
        });
        exited = Some(rx);
    } else {
        for &pid in &args.pids {
            session.add(pid)?;
            if options.follow {
                session.add_descendants(pid);
            }
        }
    }
    let matched = session.select(&selection)?;
    signals::install();
    eprintln!(
        "fdtrace: recording to {} (Ctrl-C to stop)",
        args.output.display()
    );
    if selection.selects_later() && args.pids.is_empty() && matched.is_empty() {
        eprintln!(
            "fdtrace: waiting for processes matching {}",
            selection.describe_later()
        );
    }

    let main_pid: Option<Pid> = child.as_ref().map(|c| c.pid);
    let mut status = None;
    let mut grace_until: Option<Instant> = None;
    loop {
        session.pump(Duration::from_millis(50));
        recorder
            .sync(&session)
            .with_context(|| write_error(&args.output))?;
        if let Some(sig) = signals::take() {
            match main_pid {
                Some(pid) => {
                    // Ctrl-C at the terminal already reached the command (same process group).
                    if !sig.from_terminal {
                        // SAFETY: signalling our own child.
                        unsafe { libc::kill(pid as i32, sig.signal) };
                    }
                    grace_until.get_or_insert(Instant::now() + GRACE);
                }
                None => break,
            }
        }
        if status.is_none()
            && let Some(code) = exited.as_ref().and_then(|rx| rx.try_recv().ok())
        {
            status = Some(code);
            grace_until.get_or_insert(Instant::now() + GRACE);
        }
        if stop_at.is_some_and(|t| Instant::now() >= t) {
            eprintln!("fdtrace: --duration reached");
            break;
        }
        let main_seen_exit = main_pid.is_none_or(|pid| {
            session
                .model
                .processes
                .get(&pid)
                .is_some_and(|p| !p.alive())
        });
        // Processes selected by comm or cgroup may come (back) at any time.
        if main_seen_exit
            && (status.is_some() || main_pid.is_none())
            && !session.any_alive()
            && !selection.selects_later()
        {
            break;
        }
        if grace_until.is_some_and(|t| Instant::now() > t) {
            break;
        }
    }
    session.pump(Duration::from_millis(20));
    if let (Some(pid), Some(code)) = (main_pid, status) {
        session.set_exit_code(pid, code);
        recorder.exit_code(&session, pid, code);
    }
    let stats = recorder
        .finish(&session)
        .with_context(|| write_error(&args.output))?;
    eprintln!(
        "fdtrace: recorded {} events and {} stacks in {:.1} s to {} ({} bytes, {:.2} bytes/event)",
        stats.events,
        stats.stacks,
        started.elapsed().as_secs_f64(),
        args.output.display(),
        stats.bytes,
        stats.bytes_per_event()
    );
    Ok(ExitCode::from(status.unwrap_or(0).clamp(0, 255) as u8))
}

/// Reads a recording for `replay`, `report` and `export`: one line and an error when there is
/// nothing to read, one warning when the end was cut.
pub(crate) fn load(path: &Path) -> anyhow::Result<record::Recording> {
    let recording = record::reader::open(path)?;
    if let Some(damage) = &recording.damage {
        eprintln!("fdtrace: warning: {} {damage}", path.display());
    }
    Ok(recording)
}
