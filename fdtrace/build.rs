//! Builds fdtrace-ebpf for bpfel-unknown-none and leaves the object in OUT_DIR for
//! `include_bytes!`, so a plain `cargo build` works once `cargo xtask setup` has run.
//!
//! This replaces aya-build: it finds bpf-linker in the project's tools directory (where
//! `cargo xtask setup` builds it against rustc's own libLLVM) and builds core from source with
//! the same stable toolchain (`RUSTC_BOOTSTRAP=1`), so no second toolchain is involved.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

const SKIP: &str = "FDTRACE_SKIP_EBPF";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("fdtrace.bpf.o");
    println!("cargo:rerun-if-env-changed={SKIP}");
    if env::var_os(SKIP).is_some_and(|v| v == "1") {
        // Lets tools that only need the Rust side (docs, IDEs) build; loading then fails with
        // a message saying the probes were not built.
        std::fs::write(&object, b"").context("writing the empty eBPF placeholder")?;
        return Ok(());
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let workspace = manifest_dir
        .parent()
        .context("fdtrace has no parent directory")?;
    for dir in ["fdtrace-ebpf", "fdtrace-common"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }

    let linker_dir = bpf_linker_dir(workspace)?;
    println!(
        "cargo:rerun-if-changed={}",
        linker_dir.join("bpf-linker").display()
    );
    let target_dir = workspace.join("target").join("ebpf");
    let path = env::join_paths(
        std::iter::once(linker_dir)
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )?;

    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(workspace)
        .args(["build", "--package", "fdtrace-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's settings describe the host build, not this one.
        // The inner build uses the default toolchain, the one `cargo xtask setup` equipped
        // with rust-src and a matching bpf-linker, whatever `+toolchain` the outer build used.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg",
                "bpf_target_arch=\"x86_64\"",
                "-C",
                "debuginfo=2",
                "-C",
                "link-arg=--btf",
            ]
            .join("\x1f"),
        )
        .env("PATH", path);
    let status = cargo.status().context("running cargo for fdtrace-ebpf")?;
    if !status.success() {
        bail!(
            "building the eBPF probes failed (run `cargo xtask setup` if rust-src or bpf-linker is missing)"
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/fdtrace");
    std::fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    Ok(())
}

/// The directory holding bpf-linker: the project's tools directory for this rustc, else PATH.
fn bpf_linker_dir(workspace: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .arg("-vV")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .context("running rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let release = text
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .context("rustc -vV printed no release")?;
    let local = workspace
        .join(".tools")
        .join(format!("rust-{release}"))
        .join("bin");
    if local.join("bpf-linker").exists() {
        return Ok(local);
    }
    if let Some(found) = env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .find(|d| d.join("bpf-linker").exists())
    {
        return Ok(found);
    }
    bail!(
        "bpf-linker not found in {} or PATH: run `cargo xtask setup`",
        local.display()
    )
}
