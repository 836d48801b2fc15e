//! `cargo xtask test`: the CI gates in order, stopping at the first failure.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{e2e, ebpf, host_cargo, is_root, package, run_command, toolchain, vm};

/// Runs setup, rustfmt, clippy on the host crates and on the eBPF crate, the tests, and (as
/// root) the tests that load probes, the .deb (`cargo xtask package`, installed on this machine,
/// checked and purged), the end-to-end incident (`cargo xtask e2e`) and the same root tests on
/// other kernels (`cargo xtask vm-test`). `quick` skips rustfmt and clippy,
/// `no_kernels` the kernel matrix.
/// `no_root` accepts that, without root, the root steps do not run; otherwise that is a failure,
/// so that a green `cargo xtask test` always means every check ran.
pub fn run(workspace: &Path, quick: bool, no_kernels: bool, no_root: bool) -> anyhow::Result<()> {
    let mut steps = Steps::default();
    let tools = steps.run("setup", || toolchain::setup(workspace))?;
    if !quick {
        steps.run("rustfmt", || {
            run_command(host_cargo(workspace).args(["fmt", "--all", "--", "--check"]))
        })?;
        steps.run("clippy (host crates)", || {
            run_command(
                host_cargo(workspace)
                    .args(["clippy", "--workspace", "--exclude", "fdtrace-ebpf"])
                    .args(["--all-targets", "--", "-D", "warnings"]),
            )
        })?;
        steps.run("clippy (eBPF crate)", || {
            // Its own target dir: check-mode artifacts of core would otherwise sit beside the
            // build's and share its lock with fdtrace/build.rs.
            let target_dir = workspace.join("target").join("ebpf-clippy");
            // --lib --bins, not --all-targets: tests need std, which bpfel has not.
            run_command(
                ebpf::cargo(workspace, &tools, "clippy", &target_dir)?
                    .args(["--lib", "--bins", "--", "-D", "warnings"]),
            )
        })?;
    }
    // --no-fail-fast: a failing test binary should not hide the failures of the next ones.
    steps.run("tests", || {
        run_command(host_cargo(workspace).args([
            "test",
            "--workspace",
            "--exclude",
            "fdtrace-ebpf",
            "--no-fail-fast",
        ]))
    })?;
    if is_root() {
        steps.run("Debian packages for the root tests", || {
            // promtool checks serve's metrics exposition; prometheus scrapes it.
            e2e::ensure_debian_packages(&["prometheus"])
        })?;
        steps.run("root tests", || {
            // Serialized: each test loads and attaches the probes.
            run_command(host_cargo(workspace).args([
                "test",
                "--package",
                "fdtrace",
                "--no-fail-fast",
                "--",
                "--ignored",
                "--test-threads=1",
            ]))
        })?;
        steps.run("package (.deb installs; systemd-analyze verify)", || {
            package::check(workspace)
        })?;
        steps.run("e2e (FastAPI behind nginx)", || e2e::run(workspace))?;
        if no_kernels {
            steps.skipped.push("the kernel matrix (--no-kernels)");
        } else {
            // Last: the slowest step, and what it tests has passed on this kernel by now.
            steps.run("kernel matrix (vm-test)", || vm::run(workspace, &[]))?;
        }
    } else if no_root {
        steps
            .skipped
            .push("the root tests, the e2e and the kernel matrix (--no-root)");
    } else {
        anyhow::bail!(
            "xtask test: not root, so the root tests, the e2e and the kernel matrix did not run: \
             `sudo -E cargo xtask test` runs them (`--no-root` accepts running without them)"
        );
    }
    steps.summary();
    Ok(())
}

/// Runs named steps, timing each, and remembers the times for the summary.
#[derive(Default)]
struct Steps {
    done: Vec<(&'static str, Duration)>,
    /// What was asked not to run; the summary names it rather than claiming all passed.
    skipped: Vec<&'static str>,
}

impl Steps {
    fn run<T>(
        &mut self,
        name: &'static str,
        step: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        println!("==> {name}");
        let start = Instant::now();
        let result = step();
        let elapsed = start.elapsed();
        let value = result.with_context(|| {
            format!(
                "xtask test: step `{name}` failed after {:.1}s",
                elapsed.as_secs_f64()
            )
        })?;
        println!("==> {name}: ok in {:.1}s", elapsed.as_secs_f64());
        self.done.push((name, elapsed));
        Ok(value)
    }

    fn summary(&self) {
        let total: Duration = self.done.iter().map(|(_, d)| *d).sum();
        let steps = self
            .done
            .iter()
            .map(|(name, d)| format!("{name} {:.1}s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ");
        if self.skipped.is_empty() {
            println!(
                "xtask test: all passed in {:.1}s ({steps})",
                total.as_secs_f64()
            );
        } else {
            println!(
                "xtask test: passed in {:.1}s ({steps}); not run: {}",
                total.as_secs_f64(),
                self.skipped.join(", ")
            );
        }
    }
}
