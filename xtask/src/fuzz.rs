//! `cargo xtask fuzz`: the recording reader's fuzz target (fdtrace/fuzz) for a bounded time.
//!
//! cargo-fuzz is installed once into `.tools/cargo-fuzz/` and runs under the nightly toolchain
//! (libFuzzer's sanitizer flags need it). The probes are not built for the fuzz build
//! (`FDTRACE_SKIP_EBPF=1`): the reader needs none of them.

use std::{
    env,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{command_line, run_command};

const TARGET: &str = "reader";

/// Runs the reader's fuzz target for `seconds`; prints and returns the executions it survived.
pub fn run(workspace: &Path, seconds: u64) -> anyhow::Result<u64> {
    let root = workspace.join(".tools").join("cargo-fuzz");
    let bin = root.join("bin");
    if !bin.join("cargo-fuzz").exists() {
        eprintln!("installing cargo-fuzz into {} (once)", root.display());
        run_command(
            Command::new("cargo")
                .args(["install", "cargo-fuzz", "--locked", "--root"])
                .arg(&root)
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO"),
        )?;
    }
    let fuzz_dir = workspace.join("fdtrace").join("fuzz");
    let corpus = fuzz_dir.join("corpus").join(TARGET);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let path = env::join_paths(
        std::iter::once(bin).chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )?;
    let mut fuzz = Command::new("cargo");
    fuzz.current_dir(&fuzz_dir)
        .args(["+nightly", "fuzz", "run", TARGET])
        .arg(&corpus)
        .arg(fuzz_dir.join("seeds"))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .env("PATH", path)
        .env("FDTRACE_SKIP_EBPF", "1")
        // The outer cargo's choices describe the stable host build, not this one.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .stderr(Stdio::piped());
    let line = command_line(&fuzz);
    let mut child = fuzz.spawn().with_context(|| format!("starting `{line}`"))?;
    // libFuzzer reports on stderr; pass it through and keep its closing count.
    let mut runs = None;
    let stderr = child.stderr.take().context("fuzzer stderr")?;
    for text in BufReader::new(stderr).lines() {
        let text = text.context("reading the fuzzer's output")?;
        eprintln!("{text}");
        // "Done 1234567 runs in 61 second(s)"
        if let Some(rest) = text.strip_prefix("Done ") {
            runs = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok());
        }
    }
    let status = child.wait().context("waiting for the fuzzer")?;
    if !status.success() {
        bail!(
            "`{line}` failed ({status}); the input that broke the reader is in fdtrace/fuzz/artifacts/{TARGET}/"
        );
    }
    let runs = runs.context("the fuzzer ended without its `Done N runs` line")?;
    println!("fuzz: the recording reader survived {runs} executions in {seconds} s");
    Ok(runs)
}
