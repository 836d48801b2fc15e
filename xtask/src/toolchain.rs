//! `cargo xtask setup`: what building the probes needs beyond a stock rustup toolchain.
//!
//! - rust-src, because `-Z build-std=core` compiles core for bpfel-unknown-none;
//! - bpf-linker, built against rustc's own libLLVM (no prebuilt download works here and Debian
//!   has no LLVM 22; see PLATFORM.md) into `.tools/rust-<release>/`, where fdtrace/build.rs
//!   looks for it. Keyed by the rustc release because the binary links that release's LLVM.
//!
//! Everything is checked before anything is installed, so a warm run costs three process
//! starts (rustc twice, bpf-linker once).

use std::{
    env, fs, io,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run_command;

/// The bpf-linker release known to build against rustc 1.95's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where the eBPF build finds its tools, as prepared by [`setup`].
pub struct Tools {
    /// Holds `bpf-linker`; goes first in PATH for the eBPF build.
    pub bin_dir: PathBuf,
}

/// Facts about the default toolchain's rustc (the one fdtrace/build.rs uses).
struct Rustc {
    /// `release:` from `rustc -vV`, e.g. `1.95.0`.
    release: String,
    /// Major version from `LLVM version:`, e.g. `22`: selects bpf-linker's `llvm-22` feature.
    llvm_major: String,
    /// `rustc --print sysroot`; its `lib/` holds the shared libLLVM.
    sysroot: PathBuf,
}

/// Installs what is missing and returns where the tools are. Idempotent and mounts nothing.
pub fn setup(workspace: &Path) -> anyhow::Result<Tools> {
    let rustc = Rustc::query(workspace)?;
    ensure_rust_src(&rustc)?;
    let tools_dir = workspace
        .join(".tools")
        .join(format!("rust-{}", rustc.release));
    let bin_dir = ensure_bpf_linker(workspace, &rustc, &tools_dir)?;
    println!(
        "setup: ready (rust {}, rust-src, bpf-linker {BPF_LINKER_VERSION} in {})",
        rustc.release,
        bin_dir
            .strip_prefix(workspace)
            .unwrap_or(&bin_dir)
            .display()
    );
    Ok(Tools { bin_dir })
}

/// `rustc` of the workspace's default toolchain, whatever `+toolchain` started xtask: the inner
/// eBPF build in fdtrace/build.rs drops `RUSTUP_TOOLCHAIN` too, and the tools must match the
/// rustc it uses.
fn default_rustc(workspace: &Path) -> Command {
    let mut rustc = Command::new("rustc");
    rustc
        .current_dir(workspace)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC");
    rustc
}

impl Rustc {
    fn query(workspace: &Path) -> anyhow::Result<Self> {
        let version = capture(default_rustc(workspace).arg("-vV"))?;
        let field = |name: &str| {
            version
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .with_context(|| format!("`rustc -vV` printed no `{name}` line"))
        };
        let release = field("release:")?.to_owned();
        let llvm = field("LLVM version:")?;
        let llvm_major = llvm.split('.').next().unwrap_or(llvm).to_owned();
        let sysroot =
            PathBuf::from(capture(default_rustc(workspace).args(["--print", "sysroot"]))?.trim());
        Ok(Self {
            release,
            llvm_major,
            sysroot,
        })
    }

    /// The toolchain's shared LLVM, e.g. `lib/libLLVM.so.22.1-rust-1.95.0-stable`, which is the
    /// soname bpf-linker ends up needing.
    fn libllvm(&self) -> anyhow::Result<PathBuf> {
        let lib = self.sysroot.join("lib");
        let mut found: Vec<PathBuf> = fs::read_dir(&lib)
            .with_context(|| format!("listing {}", lib.display()))?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("libLLVM.so."))
            .map(|e| e.path())
            .collect();
        found.sort();
        found.pop().with_context(|| {
            format!(
                "no libLLVM.so.* in {}: this toolchain ships no shared LLVM to build bpf-linker \
                 against; install bpf-linker into PATH yourself",
                lib.display()
            )
        })
    }
}

/// Runs a command and returns its stdout, failing with a hint when the program is missing.
fn capture(command: &mut Command) -> anyhow::Result<String> {
    let line = crate::command_line(command);
    let output = match command.output() {
        Ok(output) => output,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            bail!(
                "`{line}`: {} not found: install Rust with rustup (https://rustup.rs), then run \
                 `cargo xtask setup` again",
                command.get_program().to_string_lossy()
            )
        }
        Err(err) => return Err(err).with_context(|| format!("running `{line}`")),
    };
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

fn ensure_rust_src(rustc: &Rustc) -> anyhow::Result<()> {
    let core = rustc.sysroot.join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        return Ok(());
    }
    // rustup names each toolchain's directory after the toolchain.
    let toolchain = rustc
        .sysroot
        .file_name()
        .context("rustc's sysroot has no name")?
        .to_string_lossy()
        .into_owned();
    println!("setup: installing rust-src for {toolchain} (-Z build-std=core needs it)");
    let mut rustup = Command::new("rustup");
    rustup.args(["component", "add", "rust-src", "--toolchain", &toolchain]);
    match rustup.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => bail!("`{}` failed ({status})", crate::command_line(&rustup)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => bail!(
            "rust-src is missing from {} and rustup is not installed: add your toolchain's \
             rust-src component (or install Rust with rustup, https://rustup.rs)",
            rustc.sysroot.display()
        ),
        Err(err) => Err(err).context("running rustup"),
    }
}

/// Makes sure `<tools_dir>/bin/bpf-linker` runs, building it if needed; returns the bin dir.
fn ensure_bpf_linker(workspace: &Path, rustc: &Rustc, tools_dir: &Path) -> anyhow::Result<PathBuf> {
    let libllvm = rustc.libllvm()?;
    let prefix = tools_dir.join("llvm");
    // bpf-linker's RUNPATH is `<prefix>/lib`, so these links are what it loads at run time:
    // refreshing them repairs a binary whose toolchain was reinstalled, with no rebuild.
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let soname = libllvm.file_name().context("libLLVM has no file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        ensure_symlink(&lib.join(name), &libllvm)?;
    }

    let bin_dir = tools_dir.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if linker_works(&linker) {
        return Ok(bin_dir);
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM {} into {} \
         (one to two minutes)",
        rustc.llvm_major,
        tools_dir
            .strip_prefix(workspace)
            .unwrap_or(tools_dir)
            .display()
    );
    // With the bin dir in PATH, cargo install does not warn that it is missing from PATH.
    let path = env::join_paths(
        std::iter::once(bin_dir.clone())
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .context("building PATH for cargo install")?;
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(workspace)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{}", rustc.llvm_major))
        .arg("--root")
        .arg(tools_dir)
        // Replaces a binary that exists but does not run (e.g. built for another LLVM).
        .arg("--force")
        .env("LLVM_PREFIX", &prefix)
        .env("PATH", path)
        // A host build with the default toolchain, not whatever the outer cargo was told.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    run_command(&mut cargo)?;
    if !linker_works(&linker) {
        bail!(
            "{} was installed but does not run; remove {} and run `cargo xtask setup` again",
            linker.display(),
            tools_dir.display()
        );
    }
    Ok(bin_dir)
}

/// Whether `linker` starts (it loads libLLVM through RUNPATH) and is the version we build.
fn linker_works(linker: &Path) -> bool {
    Command::new(linker)
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        })
}

/// Points `link` at `target`, replacing whatever was there, unless it already does.
fn ensure_symlink(link: &Path, target: &Path) -> anyhow::Result<()> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", link.display())),
    }
    println!("setup: linking {} -> {}", link.display(), target.display());
    symlink(target, link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))
}
