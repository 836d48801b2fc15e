//! Developer tasks for fdtrace, run as `cargo xtask <command>` (an alias in .cargo/config.toml).
//!
//! The commands stay thin: fdtrace/build.rs compiles the probes itself, so once `setup` has
//! installed rust-src and bpf-linker a plain `cargo build` works. xtask bootstraps that
//! toolchain and strings the usual cargo invocations together.

mod bench;
mod checks;
mod demo;
mod e2e;
mod ebpf;
mod fuzz;
mod package;
mod toolchain;
mod vm;

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "fdtrace's developer tasks",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the probes needs (rust-src, bpf-linker in .tools/); idempotent.
    Setup,
    /// Build only the eBPF probes and print the object's path.
    BuildEbpf,
    /// Build the release binary, target/release/fdtrace.
    Build,
    /// Build the release binary and run it with the given arguments (as root).
    Run {
        /// Arguments for fdtrace, after `--`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build the release binary and install it as PREFIX/bin/fdtrace.
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Build the Debian package target/debian/fdtrace_<version>_<arch>.deb: the release binary,
    /// man pages, shell completions and the systemd unit (packaging/); prints its path.
    Package,
    /// Trace a leaking demo server under load (as root: `sudo -E cargo xtask demo`).
    Demo {
        /// Extra arguments for fdtrace, after `--` (e.g. `-- --no-tui`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run the CI gates in order: setup, fmt, clippy (host, eBPF), tests, and as root the root
    /// tests, the package (installed, verified, purged), the end-to-end incident and the kernel
    /// matrix (vm-test).
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        quick: bool,
        /// Skip the kernel matrix (`cargo xtask vm-test`).
        #[arg(long)]
        no_kernels: bool,
        /// Without root, pass on the steps that can run (otherwise a test run that could not
        /// run the root steps fails).
        #[arg(long)]
        no_root: bool,
    },
    /// The 502-behind-nginx incident end to end: FastAPI/uvicorn leaking behind nginx, traced
    /// (as root; installs nginx, and fastapi and uvicorn into .tools/venv-fastapi, if missing).
    E2e,
    /// Benchmark fdtrace against strace and bpftrace; prints a table, writes target/bench.json
    /// (as root; installs bpftrace, strace, wrk and nginx if missing).
    Bench {
        /// Run only these sections (loop, nginx, ingest, unwinding, memory, churn, serve, attach,
        /// recording); all of them when none is named.
        only: Vec<String>,
    },
    /// Run the root tests on Debian's 6.1 and 6.12 kernels, each booted under QEMU with
    /// virtme-ng (as root; installs qemu, kmod and busybox-static, virtme-ng into
    /// .tools/venv-vng and the kernels into .tools/kernels and /lib/modules, if missing).
    VmTest {
        /// Only this kernel series (repeat or comma-separate); all of them when none is given.
        #[arg(
            long = "kernel",
            value_name = "SERIES",
            value_delimiter = ',',
            value_parser = clap::builder::PossibleValuesParser::new(vm::SERIES.map(|s| s.name))
        )]
        kernels: Vec<String>,
    },
    /// Inside a vm-test guest: keep the kernel's code patched as the tests will want it, and
    /// sleep until the guest ends (the guest's run script starts it).
    #[command(hide = true)]
    VmGuestHoldKeys,
    /// Fuzz the recording reader for SECONDS (cargo +nightly fuzz; installs cargo-fuzz into
    /// .tools/ once) and print how many executions it survived.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Errors are one line whatever RUST_BACKTRACE says: anyhow's `{:#}` prints the context chain.
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<ExitCode> {
    let workspace = workspace_root()?;
    match task {
        Task::Setup => {
            toolchain::setup(&workspace)?;
        }
        Task::BuildEbpf => {
            let tools = toolchain::setup(&workspace)?;
            let object = ebpf::build(&workspace, &tools)?;
            println!("{}", object.display());
        }
        Task::Build => {
            toolchain::setup(&workspace)?;
            let binary = build_release(&workspace)?;
            println!("built {}", binary.display());
        }
        Task::Run { args } => {
            toolchain::setup(&workspace)?;
            let binary = build_release(&workspace)?;
            let status = Command::new(&binary)
                .args(&args)
                .status()
                .with_context(|| format!("starting {}", binary.display()))?;
            // fdtrace's own exit status is the answer (`run --error-exitcode` relies on it).
            return Ok(status
                .code()
                .map_or(ExitCode::FAILURE, |c| ExitCode::from(c as u8)));
        }
        Task::Install { prefix } => {
            toolchain::setup(&workspace)?;
            let binary = build_release(&workspace)?;
            let installed = install(&binary, &prefix.join("bin"))?;
            println!("installed {}", installed.display());
        }
        Task::Package => {
            let deb = package::run(&workspace)?;
            println!("{}", deb.display());
        }
        Task::Demo { args } => demo::run(&workspace, &args)?,
        Task::Test {
            quick,
            no_kernels,
            no_root,
        } => checks::run(&workspace, quick, no_kernels, no_root)?,
        Task::E2e => e2e::run(&workspace)?,
        Task::VmTest { kernels } => {
            toolchain::setup(&workspace)?;
            vm::run(&workspace, &kernels)?;
        }
        Task::VmGuestHoldKeys => vm::hold_static_keys()?,
        Task::Bench { only } => bench::run(&workspace, &only)?,
        Task::Fuzz { seconds } => {
            fuzz::run(&workspace, seconds)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The workspace root: xtask's manifest directory is one level below it.
fn workspace_root() -> anyhow::Result<PathBuf> {
    // At run time cargo tells us where the package is; the compile-time path is the fallback
    // for running the binary directly.
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}

/// The host target directory: `CARGO_TARGET_DIR` when set, else `<workspace>/target`.
fn target_dir(workspace: &Path) -> anyhow::Result<PathBuf> {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => Ok(env::current_dir()
            .context("reading the current directory")?
            .join(dir)),
        None => Ok(workspace.join("target")),
    }
}

/// The cargo that started xtask, so host builds use the toolchain the developer chose.
fn host_cargo(workspace: &Path) -> Command {
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.current_dir(workspace);
    cargo
}

/// Runs `command` with inherited stdio and fails with the command line if it does not succeed.
fn run_command(command: &mut Command) -> anyhow::Result<()> {
    let line = command_line(command);
    let status = command
        .status()
        .with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// A command as a developer would type it, for messages.
fn command_line(command: &Command) -> String {
    let program = Path::new(command.get_program());
    // Show `cargo`, not the toolchain's full path to it.
    let name = program.file_name().unwrap_or(program.as_os_str());
    std::iter::once(name)
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo build --release -p fdtrace`, returning the binary's path.
fn build_release(workspace: &Path) -> anyhow::Result<PathBuf> {
    run_command(host_cargo(workspace).args(["build", "--release", "--package", "fdtrace"]))?;
    Ok(target_dir(workspace)?.join("release").join("fdtrace"))
}

/// Copies `binary` into `bin_dir` atomically: a temporary file in the same directory, renamed
/// over the old one, so a running fdtrace or a concurrent reader never sees a half-written file.
fn install(binary: &Path, bin_dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;

    let destination = bin_dir.join("fdtrace");
    let temporary = bin_dir.join(format!(".fdtrace.tmp-{}", std::process::id()));
    let copied = fs::create_dir_all(bin_dir)
        .and_then(|()| fs::copy(binary, &temporary))
        .and_then(|_| fs::set_permissions(&temporary, fs::Permissions::from_mode(0o755)))
        .and_then(|()| fs::rename(&temporary, &destination));
    if let Err(err) = copied {
        let _ = fs::remove_file(&temporary);
        if err.kind() == std::io::ErrorKind::PermissionDenied {
            bail!(
                "cannot write {}: run as root (sudo -E cargo xtask install) or pass --prefix",
                bin_dir.display()
            );
        }
        return Err(err).with_context(|| format!("installing {}", destination.display()));
    }
    Ok(destination)
}

/// Whether this process runs as root (the probes need it).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
