//! The command line (DESIGN.md's contract); each mode lives in a submodule.

mod assets;
mod export;
mod live;
mod record;
mod replay;
mod report;
mod run;
mod serve;

use std::{fs, io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    probe::{self, ProbeError, ProbeOptions},
    report::Report,
    select::Selection,
};

#[derive(Debug, Parser)]
#[command(
    name = "fdtrace",
    disable_version_flag = true,
    about = "Which call sites hold a process's file descriptors, which keep growing, and what filled the table when accept() failed with EMFILE",
    override_usage = "sudo fdtrace (--pid PID | --comm NAME | --cgroup PATH | --container ID)... [--follow] [--no-tui] [--warn-at PERCENT]\n       sudo fdtrace run [--format text|json] [-o FILE] [--error-exitcode N] [--warn-at PERCENT] -- CMD [ARGS...]\n       sudo fdtrace record ((--pid PID | --comm NAME | --cgroup PATH | --container ID)... | -- CMD [ARGS...]) -o FILE [--duration SECS] [--redact]\n       sudo fdtrace serve (--pid PID | --comm NAME | --cgroup PATH | --container ID)... [--listen ADDR] [--flight-recorder DIR [--flight-seconds N]] [--warn-at PERCENT]\n       fdtrace replay FILE\n       fdtrace report FILE [--format text|markdown|json] [-o FILE]\n       fdtrace export FILE --format perfetto|folded|svg [-o FILE]",
    after_help = "--comm, --cgroup and --container also trace the processes that start matching later (a restarted server, a new container's processes) from their first instruction, and the children of all they select; without a match yet, fdtrace waits for one.\n\nThe live view (--pid, replay) is a terminal UI when standard output is a terminal; press ? in it for its keys. While it runs, logs go to $XDG_STATE_HOME/fdtrace.log, or /tmp/fdtrace-UID.log when XDG_STATE_HOME is unset (level from FDTRACE_LOG, default info).",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    attach: AttachArgs,
    /// Print the version (with --verbose: the kernel, and which probe types and kernel offsets
    /// fdtrace would use on it, which loads the probes and so needs root).
    #[arg(short = 'V', long)]
    version: bool,
    /// With --version: what fdtrace finds on this kernel.
    #[arg(long, requires = "version")]
    verbose: bool,
}

#[derive(Debug, Args)]
pub(crate) struct AttachArgs {
    /// Process to trace (repeat for several).
    #[arg(long = "pid", value_name = "PID")]
    pub(crate) pids: Vec<u32>,
    #[command(flatten)]
    pub(crate) select: MatchArgs,
    /// Also trace the processes they have forked and will fork.
    #[arg(long)]
    pub(crate) follow: bool,
    /// Print summary lines and a final report instead of the terminal UI.
    #[arg(long)]
    pub(crate) no_tui: bool,
    /// Format of the final report.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,
    /// Write the final report to FILE instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Warn when a process's open descriptors reach PERCENT of its limit (RLIMIT_NOFILE).
    #[arg(long, value_name = "PERCENT", value_parser = crate::headroom::parse_percent)]
    pub(crate) warn_at: Option<f64>,
    /// nginx's configuration (`nginx -T` output, or its nginx.conf): upstream timeouts are
    /// compared with its proxy_connect_timeout and proxy_read_timeout.
    #[arg(long, value_name = "FILE")]
    pub(crate) nginx_conf: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) probe: ProbeArgs,
}

/// Reads `--nginx-conf`, failing in one line before any tracing starts.
pub(crate) fn nginx_timeouts(
    path: Option<&PathBuf>,
) -> anyhow::Result<Option<crate::nginx::Timeouts>> {
    path.map(|p| {
        crate::nginx::Timeouts::read(p)
            .with_context(|| format!("reading nginx's configuration {}", p.display()))
    })
    .transpose()
}

/// Selectors by what a process is, which also take in processes that start matching later.
#[derive(Debug, Args, Default)]
pub(crate) struct MatchArgs {
    /// Trace the processes named NAME (their comm, as /proc/PID/comm shows it; names are cut
    /// to 15 bytes as the kernel cuts them), now and as they start (repeat for several).
    #[arg(long = "comm", value_name = "NAME")]
    pub(crate) comms: Vec<String>,
    /// Trace the processes in the cgroup v2 directory PATH or below it, now and as they start:
    /// PATH is relative to where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified
    /// on hybrid systems), absolute under it, or as /proc/PID/cgroup shows it (repeat for
    /// several).
    #[arg(long = "cgroup", value_name = "PATH")]
    pub(crate) cgroups: Vec<String>,
    /// Trace the processes of a container (docker, podman, containerd, CRI-O), now and as they
    /// start: its id, or a prefix of at least 4 hex digits that only it has (repeat for
    /// several).
    #[arg(long = "container", value_name = "ID")]
    pub(crate) containers: Vec<String>,
}

impl MatchArgs {
    pub(crate) fn is_empty(&self) -> bool {
        self.comms.is_empty() && self.cgroups.is_empty() && self.containers.is_empty()
    }

    /// The selection with `pids`, its cgroups and containers found on this machine.
    pub(crate) fn resolve(&self, pids: &[u32]) -> anyhow::Result<Selection> {
        Ok(Selection::resolve(
            pids,
            &self.comms,
            &self.cgroups,
            &self.containers,
        )?)
    }
}

/// Options for probes that trace `selection`: selecting by comm or cgroup follows children.
pub(crate) fn select_options(
    probe: ProbeArgs,
    follow: bool,
    stats: bool,
    selection: &Selection,
) -> ProbeOptions {
    ProbeOptions {
        select: selection.probe_bits(),
        ..probe.options(follow || selection.selects_later(), stats)
    }
}

#[derive(Debug, Args, Clone, Copy)]
pub(crate) struct ProbeArgs {
    /// Bytes of user stack copied per descriptor creation, for unwinding (0 turns stacks off).
    #[arg(long, value_name = "BYTES", default_value_t = fdtrace_common::STACK_DEFAULT,
          value_parser = clap::value_parser!(u32).range(0..=fdtrace_common::STACK_MAX as i64))]
    pub(crate) stack_bytes: u32,
    /// Log the probes' own diagnostics (which program types and kernel offsets they use, forks
    /// followed, layout mismatches) to the log file and standard error: send them in when
    /// fdtrace misbehaves on your kernel.
    #[arg(long)]
    pub(crate) debug_probes: bool,
    /// Use the probe paths older kernels need even where this kernel offers better ones (raw
    /// tracepoint for sys_exit, thread counts from BTF for exits): for testing them.
    #[arg(long, hide = true)]
    pub(crate) probe_fallbacks: bool,
    /// Send every creation and close to fdtrace, as recordings do, instead of keeping the
    /// descriptors of call sites already seen in the kernel until they outlive a second (for
    /// comparing the two; the views show the same either way, less the lifetimes' precision).
    #[arg(long)]
    pub(crate) send_all: bool,
}

impl ProbeArgs {
    pub(crate) fn options(self, follow: bool, stats: bool) -> ProbeOptions {
        ProbeOptions {
            stack_bytes: self.stack_bytes,
            follow,
            stats,
            fallbacks: self.probe_fallbacks,
            debug: self.debug_probes,
            keep: !self.send_all,
            ..ProbeOptions::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run CMD traced from its first instruction, with its children, and report at its exit
    /// what each process left open (valgrind --track-fds style) and every EMFILE/ENFILE.
    Run(RunArgs),
    /// Record what the probes see (of CMD, or of running processes) to a file for replay,
    /// reports and exports on any machine.
    Record(record::RecordArgs),
    /// Always on: trace the selected processes (and those that start matching later), serve
    /// Prometheus metrics, and write a flight recording when one hits EMFILE/ENFILE.
    Serve(serve::ServeArgs),
    /// Replay a recording in the live view (play/pause, seek, speed).
    Replay(replay::ReplayArgs),
    /// The report of a recording: the same as `run` prints, as text, markdown or JSON.
    Report(report::ReportArgs),
    /// Export a recording: Perfetto trace, folded stacks or a flamegraph SVG.
    Export(export::ExportArgs),
    /// Write the man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    Assets { dir: PathBuf },
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,
    /// Write the report to FILE instead of standard error.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Exit with N when the command left descriptors open (instead of the command's status),
    /// or crossed --warn-at.
    #[arg(long, value_name = "N")]
    pub(crate) error_exitcode: Option<u8>,
    /// Warn when a process's open descriptors reach PERCENT of its limit (RLIMIT_NOFILE), and
    /// then exit with 3 (or --error-exitcode N) instead of the command's status.
    #[arg(long, value_name = "PERCENT", value_parser = crate::headroom::parse_percent)]
    pub(crate) warn_at: Option<f64>,
    #[command(flatten)]
    pub(crate) probe: ProbeArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

pub fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if cli.version {
        return version(cli.verbose);
    }
    let debug_probes = match &cli.command {
        Some(Command::Run(args)) => args.probe.debug_probes,
        Some(Command::Record(args)) => args.probe.debug_probes,
        Some(Command::Serve(args)) => args.probe.debug_probes,
        None => cli.attach.probe.debug_probes,
        Some(_) => false,
    };
    crate::tui::logfile::install(&crate::tui::log_path(), debug_probes);
    match cli.command {
        Some(Command::Run(args)) => run::run(&args),
        Some(Command::Record(args)) => record::record(&args),
        Some(Command::Serve(args)) => serve::serve(&args),
        Some(Command::Replay(args)) => replay::replay(&args),
        Some(Command::Report(args)) => report::report(&args),
        Some(Command::Export(args)) => export::export(&args),
        Some(Command::Assets { dir }) => assets::write(&dir),
        None if cli.attach.pids.is_empty() && cli.attach.select.is_empty() => {
            bail!(
                "nothing to trace: give --pid PID, --comm NAME, --cgroup PATH or --container ID, or `fdtrace run -- CMD` (see --help)"
            )
        }
        None => live::attach(&cli.attach),
    }
}

/// `--version`, and with `--verbose` what the probes choose on this kernel (by loading them).
fn version(verbose: bool) -> anyhow::Result<ExitCode> {
    println!("fdtrace {}", env!("CARGO_PKG_VERSION"));
    if !verbose {
        return Ok(ExitCode::SUCCESS);
    }
    if let Some((_, _, release)) = probe::kernel_version() {
        println!("kernel: Linux {release}");
    }
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    println!(
        "BTF: {}",
        if btf {
            "/sys/kernel/btf/vmlinux"
        } else {
            "absent"
        }
    );
    check_privileges()?;
    let probes = probe::Probes::load(ProbeOptions::default())?;
    print!("{}", probes.choices());
    println!();
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn check_privileges() -> anyhow::Result<()> {
    if !probe::privileged() {
        return Err(ProbeError::NotPrivileged.into());
    }
    Ok(())
}

pub(crate) fn emit_report(
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
