//! The inner cargo that compiles fdtrace-ebpf for bpfel-unknown-none, set up exactly as
//! fdtrace/build.rs does it, so `build-ebpf` and the eBPF clippy pass see what the real build sees.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{run_command, toolchain::Tools};

pub const TARGET: &str = "bpfel-unknown-none";
const PACKAGE: &str = "fdtrace-ebpf";
/// The probes' binary target (fdtrace-ebpf's `[[bin]] name`).
const OBJECT: &str = "fdtrace";

/// The rustflags aya-build passes; fdtrace/build.rs uses the same.
const RUSTFLAGS: [&str; 6] = [
    "--cfg",
    "bpf_target_arch=\"x86_64\"",
    "-C",
    "debuginfo=2",
    "-C",
    "link-arg=--btf",
];

/// `cargo <subcommand> -p fdtrace-ebpf --target bpfel-unknown-none -Z build-std=core
/// --target-dir <target_dir>` on the default toolchain, with bpf-linker first in PATH.
pub fn cargo(
    workspace: &Path,
    tools: &Tools,
    subcommand: &str,
    target_dir: &Path,
) -> anyhow::Result<Command> {
    let path = env::join_paths(
        std::iter::once(tools.bin_dir.clone())
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .context("building PATH for the eBPF build")?;
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(workspace)
        .args([subcommand, "--package", PACKAGE, "--release"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir)
        // The outer cargo's settings describe a host build; the probes build with the default
        // toolchain, the one `setup` equipped with rust-src and a matching bpf-linker.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        // -Z build-std on the stable toolchain.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"))
        .env("PATH", path);
    Ok(cargo)
}

/// Builds the probes into target/ebpf (where fdtrace/build.rs builds them, so either reuses
/// the other's work) and returns the object's path.
pub fn build(workspace: &Path, tools: &Tools) -> anyhow::Result<PathBuf> {
    let target_dir = workspace.join("target").join("ebpf");
    run_command(cargo(workspace, tools, "build", &target_dir)?.arg("--bins"))?;
    Ok(target_dir.join(TARGET).join("release").join(OBJECT))
}
