//! The command line (DESIGN.md's contract) and the two live modes: attach and `run`.

use std::{
    fs,
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    launch,
    model::{Event, Origin, Pid},
    probe::{self, ProbeError, ProbeOptions},
    report::{FrameReport, Report},
    session::Session,
    signals,
};

#[derive(Debug, Parser)]
#[command(
    name = "fdtrace",
    version,
    about = "Which call sites hold a process's file descriptors, which keep growing, and what filled the table when accept() failed with EMFILE",
    override_usage = "sudo fdtrace --pid PID [--pid PID ...] [--follow] [--no-tui]\n       sudo fdtrace run [--format text|json] [-o FILE] [--error-exitcode N] -- CMD [ARGS...]",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    attach: AttachArgs,
}

#[derive(Debug, Args)]
struct AttachArgs {
    /// Process to trace (repeat for several).
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Also trace the processes they have forked and will fork.
    #[arg(long)]
    follow: bool,
    /// Print summary lines and a final report instead of the terminal UI.
    #[arg(long)]
    no_tui: bool,
    /// Format of the final report.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write the final report to FILE instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    probe: ProbeArgs,
}

#[derive(Debug, Args, Clone, Copy)]
struct ProbeArgs {
    /// Bytes of user stack copied per descriptor creation, for unwinding (0 turns stacks off).
    #[arg(long, value_name = "BYTES", default_value_t = fdtrace_common::STACK_DEFAULT,
          value_parser = clap::value_parser!(u32).range(0..=fdtrace_common::STACK_MAX as i64))]
    stack_bytes: u32,
}

impl ProbeArgs {
    fn options(self, follow: bool) -> ProbeOptions {
        ProbeOptions {
            stack_bytes: self.stack_bytes,
            follow,
            ..ProbeOptions::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run CMD traced from its first instruction, with its children, and report at its exit
    /// what each process left open (valgrind --track-fds style) and every EMFILE/ENFILE.
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write the report to FILE instead of standard error.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Exit with N when the command left descriptors open (instead of the command's status).
    #[arg(long, value_name = "N")]
    error_exitcode: Option<u8>,
    #[command(flatten)]
    probe: ProbeArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Run(args)) => run(&args),
        None if cli.attach.pids.is_empty() => {
            bail!("nothing to trace: give --pid PID, or `fdtrace run -- CMD` (see --help)")
        }
        None => attach(&cli.attach),
    }
}

fn check_privileges() -> anyhow::Result<()> {
    if !probe::privileged() {
        return Err(ProbeError::NotPrivileged.into());
    }
    Ok(())
}

fn attach(args: &AttachArgs) -> anyhow::Result<ExitCode> {
    for &pid in &args.pids {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with pid {pid}");
        }
    }
    check_privileges()?;
    if !args.no_tui && std::io::stdout().is_terminal() {
        log::info!("the terminal UI is not built yet; using text mode");
    }
    let mut session = Session::start(args.probe.options(args.follow))?;
    for &pid in &args.pids {
        session.add(pid)?;
        if args.follow {
            session.add_descendants(pid);
        }
    }
    signals::install();
    let pids = args.pids.clone();
    eprintln!(
        "fdtrace: tracing {} (Ctrl-C for the report)",
        describe(&pids)
    );
    let mut printer = LivePrinter::default();
    loop {
        let events = session.pump(Duration::from_millis(100));
        LivePrinter::events(&session, &events);
        printer.summary(&session, &pids);
        if signals::take().is_some() {
            break;
        }
        if !session.any_alive() {
            eprintln!("fdtrace: every traced process has exited");
            break;
        }
    }
    session.pump(Duration::from_millis(20));
    emit_report(&session.report(), args.format, args.output.as_ref(), false)?;
    Ok(ExitCode::SUCCESS)
}

fn describe(pids: &[Pid]) -> String {
    let names: Vec<String> = pids
        .iter()
        .map(|&p| match crate::procfs::identity(p) {
            Ok(id) => format!("{p} ({})", id.comm),
            Err(_) => p.to_string(),
        })
        .collect();
    format!("pid {}", names.join(", "))
}

/// Text-mode output while tracing: each incident as it happens, a summary every few seconds.
#[derive(Default)]
struct LivePrinter {
    last_summary: Option<Instant>,
}

const SUMMARY_EVERY: Duration = Duration::from_secs(3);

impl LivePrinter {
    fn events(session: &Session, events: &[Event]) {
        for event in events {
            if let Event::Failed {
                pid,
                syscall,
                errno,
                ts,
                ..
            } = event
            {
                let model = &session.model;
                let Some(inc) = model
                    .incidents
                    .iter()
                    .rev()
                    .find(|i| i.ts == *ts && i.pid == *pid)
                else {
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
                eprintln!(
                    "fdtrace: {} in pid {pid}: {} failed at {} with {}/{} open{top}",
                    errno.name(),
                    fdtrace_common::syscalls::name(*syscall).unwrap_or("?"),
                    session.clock.rfc3339(*ts),
                    inc.open_fds,
                    inc.limit
                );
            }
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
            eprintln!(
                "fdtrace: pid {} ({}) {open}/{} open, {:+.0}/min, {eta} | top: {top} | EMFILE {} | lost {}",
                p.pid,
                p.info.comm,
                if limit == u64::MAX {
                    "unlimited".to_string()
                } else {
                    limit.to_string()
                },
                p.growth_per_min(),
                model.incidents.iter().filter(|i| i.pid == p.pid).count(),
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

fn emit_report(
    report: &Report,
    format: Format,
    output: Option<&PathBuf>,
    to_stderr: bool,
) -> anyhow::Result<()> {
    let text = match format {
        Format::Text => report.to_text(),
        Format::Json => report.to_json(),
    };
    match output {
        Some(path) => fs::write(path, text)
            .with_context(|| format!("writing the report to {}", path.display())),
        None if to_stderr => {
            std::io::stderr().write_all(text.as_bytes())?;
            Ok(())
        }
        None => {
            std::io::stdout().write_all(text.as_bytes())?;
            Ok(())
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
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
