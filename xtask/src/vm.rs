//! `cargo xtask vm-test`: the root integration tests on Debian's kernels (6.1 and 6.12), each
//! booted under QEMU by virtme-ng, sharing this machine's root file system.
//!
//! Whether the probes load, and what the layouts they read look like, differs between kernels,
//! and only a real kernel answers that; Debian's are what many users' servers run. The guest is
//! emulated (TCG): this machine's CPU has no nested virtualization, and with KVM the guest hangs
//! (PLATFORM.md). It runs several times slower, so the guest tells the tests with
//! `FDTRACE_EMULATED=1` and those that assert wall-clock bounds check order instead.
//!
//! Everything is cached between runs: qemu, kmod and busybox-static come from Debian once,
//! virtme-ng from PyPI into .tools/venv-vng, each kernel's vmlinuz into .tools/kernels/<release>/
//! and its modules into /lib/modules/<release>/. Each kernel's results and console are kept in
//! target/vm-test/<series>/.
//!
//! The tests are built with `--release`, in the workspace's own target directory: `cargo xtask
//! test` has built the release dependencies for the .deb by then, where a target directory of
//! the matrix's own rebuilt them all, and the release tracer uses a tenth of the debug one's
//! CPU (the attribution tests on the host). A guest's test time hardly moved: it is mostly a
//! fixed start-up cost. While guests run, vm-test holds cargo's lock
//! on target/release, so a `cargo build --release` elsewhere waits rather than replacing a
//! binary under a running guest (one did, and fdtrace segfaulted in ld.so).

use std::{
    env,
    ffi::OsString,
    fmt::Write as _,
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    command_line,
    e2e::{children, ensure_debian_packages},
    host_cargo, is_root, run_command, target_dir,
};

/// Pinned: the flags used below (`--force-9p`, `--overlay-rwdir`) were checked against it.
const VNG_VERSION: &str = "1.42";
const GUEST_MEMORY: &str = "2G";
/// Two vCPUs: QEMU runs each in its own host thread (MTTCG), and some tests fork and thread.
const GUEST_CPUS: &str = "2";
/// A whole boot, all test binaries included: about 13 minutes on 6.12 and 24 on 6.1 (whose
/// emulated guest runs everything about twice as slow, the verifier included, for the three
/// sys_exit/sys_enter programs each session loads) for 37 root tests on a 2-core host on
/// 2026-11-30. On 2026-12-07 the host (AMD, SRSO mitigations) ran them about twice as slow
/// again: the attribution binary alone took 620 s of 6.1's boot, the kernel binary over 900.
const BOOT_TIMEOUT: Duration = Duration::from_mins(55);
/// One test binary inside the guest; a hung one is killed so the ones after it still report.
const BINARY_TIMEOUT_SECS: u64 = 1500;
/// Root tests the guests leave to the host, because their subject is fdtrace's own code, which
/// a guest's kernel does not change, and each costs 6.1's guest about a minute, however small
/// (on the host, the verifier takes half of a session's 1.1 s start). Libtest `--skip` filters, matched as substrings:
/// - `_on_the_older_kernels_paths` forces the raw tracepoint and BTF paths that 6.1 and 6.12
///   take anyway, so in a guest each repeats its plain twin;
/// - `_at_o1` and `rust_leaks` differ from `c_leaks_name_function_and_line_at_o2` only in the
///   fixture's compiler and flags, i.e. in the unwinding, while the kernel copies the stack
///   the same way;
/// - `run_reports_json` checks the report's JSON and the exit code;
/// - `a_script_that_exits_at_once` checks how soon the reader finds a new interpreter's
///   runtime (160 s in a 6.12 guest), while `python_leaks` checks the probes' Python frames.
const HOST_ONLY_TESTS: [&str; 5] = [
    "_on_the_older_kernels_paths",
    "_at_o1",
    "rust_leaks_name_function_and_line",
    "run_reports_json_and_the_error_exitcode",
    "a_script_that_exits_at_once_is_still_named",
];
/// Test binaries whose subject is what fdtrace does with events it has: recordings and their
/// exports, the metrics server, the terminal view. Their probes and events are those the
/// kernel, attribution and select binaries check in the guests.
const HOST_ONLY_BINARIES: [&str; 3] = ["record", "serve", "tui"];
/// Lines of one binary's output printed on the host; its file keeps the rest.
const PRINTED_LINES: usize = 200;
/// Host environment the guest's command gets: virtme-ng's init starts from a fixed one (PATH
/// without ~/.cargo/bin or pyenv's shims), and the tests run rustc, gcc, python3 and tmux.
/// Not RUST_BACKTRACE: a kernel that refuses the probes fails every test, and a backtrace each
/// buries the one line that says why.
const GUEST_ENV: [&str; 4] = ["PATH", "HOME", "PYENV_ROOT", "LANG"];

/// A kernel line and the shape of its Debian package names: `<prefix><N><suffix>`, newest N.
pub struct Series {
    pub name: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

/// Digits only between prefix and suffix: that leaves out the -cloud- flavours (no 9p, so they
/// cannot mount the host's root) and -rt-, and the exact suffix leaves out -dbg and -unsigned.
pub const SERIES: [Series; 2] = [
    // Debian 12's own kernel.
    Series {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    // The newer LTS that Debian 12 carries too.
    Series {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

/// Boots each selected series (all when `selected` is empty) and runs the root tests in it;
/// fails if any test failed or a guest did not report.
pub fn run(workspace: &Path, selected: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "vm-test installs packages and kernel modules, and the tests load probes: run it as \
             root (sudo -E cargo xtask vm-test)"
        );
    }
    let started = Instant::now();
    if let Some(unknown) = selected
        .iter()
        .find(|name| !SERIES.iter().any(|s| s.name == name.as_str()))
    {
        bail!("no kernel series {unknown}");
    }
    // In the table's order, each once however often it was named.
    let series: Vec<&Series> = SERIES
        .iter()
        .filter(|s| selected.is_empty() || selected.iter().any(|name| name == s.name))
        .collect();
    let vng = ensure_host_tools(workspace)?;
    let mut apt = Apt::default();
    let kernels = series
        .iter()
        .map(|s| ensure_kernel(workspace, s, &mut apt))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = target_dir(workspace)?;
    let vm_dir = target.join("vm-test");
    let binaries = build_tests(workspace)?;
    let _release_lock = lock_release_dir(&target)?;
    // Where the tests build their fixtures (CARGO_TARGET_TMPDIR); the host's root tests have
    // filled it, and gcc and rustc under TCG take minutes.
    let fixtures_dir = target.join("tmp");
    fs::create_dir_all(&fixtures_dir)
        .with_context(|| format!("creating {}", fixtures_dir.display()))?;
    let listed: usize = binaries.iter().map(|b| b.tests).sum();
    println!(
        "vm-test: ready in {:.1}s: {listed} root tests in {} binaries, kernels {}",
        started.elapsed().as_secs_f64(),
        binaries.len(),
        kernels
            .iter()
            .map(|k| k.release.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // One guest after the other, each with both vCPUs to itself. Booted at once (tried on
    // 2026-12-07), four vCPUs shared two host CPUs: 6.1's guest, the long pole, ran about 20%
    // slower per test than alone, so the matrix ended little sooner, and the racing tests ran
    // on vCPUs the host stalled at will.
    let mut outcomes = Vec::new();
    for kernel in &kernels {
        let guest = Guest {
            workspace,
            vng: &vng,
            dir: vm_dir.join(kernel.series),
            fixtures_dir: &fixtures_dir,
        };
        let outcome = guest.boot_until_it_reports(kernel, &binaries)?;
        outcome.print_details();
        outcomes.push(outcome);
    }

    println!("vm-test: summary");
    for outcome in &outcomes {
        println!("  {}", outcome.summary_line());
    }
    println!(
        "vm-test: matrix took {:.1}s in all",
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.failure().map(|why| format!("{} ({why})", o.series)))
        .collect();
    if !failed.is_empty() {
        bail!(
            "vm-test: failed on {} (outputs above, consoles in {})",
            failed.join(", "),
            vm_dir.display()
        );
    }
    Ok(())
}

/// Where virtme-ng is, and the PATH it needs: it starts `virtme-run` from PATH.
struct Vng {
    program: PathBuf,
    path: OsString,
}

/// qemu, depmod and a static busybox from Debian, and virtme-ng from PyPI, when missing.
fn ensure_host_tools(workspace: &Path) -> anyhow::Result<Vng> {
    let mut wanted = Vec::new();
    if find_program("qemu-system-x86_64").is_none() {
        wanted.push("qemu-system-x86");
    }
    if find_program("depmod").is_none() {
        wanted.push("kmod");
    }
    // Debian's kernels need an initramfs to load virtio and 9p, and virtme-ng puts busybox in it
    // alone, without a libc: Debian's `busybox` is dynamic and does not start there.
    wanted.push("busybox-static");
    ensure_debian_packages(&wanted)?;

    let venv = workspace.join(".tools").join("venv-vng");
    let bin = venv.join("bin");
    let program = bin.join("vng");
    let path = env::join_paths(
        std::iter::once(bin.clone())
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .context("building PATH for vng")?;
    let installed = || {
        Command::new(&program)
            .arg("--version")
            .env("PATH", &path)
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout).trim()
                        == format!("virtme-ng {VNG_VERSION}")
            })
    };
    if !installed() {
        if !bin.join("python").exists() {
            run_command(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
        println!(
            "vm-test: installing virtme-ng {VNG_VERSION} into {}",
            venv.display()
        );
        run_command(
            Command::new(bin.join("python"))
                .args(["-m", "pip", "install", "--quiet"])
                .arg(format!("virtme-ng=={VNG_VERSION}")),
        )?;
        ensure!(
            installed(),
            "{} does not report virtme-ng {VNG_VERSION}",
            program.display()
        );
    }
    Ok(Vng { program, path })
}

/// `name` in PATH, or in the sbin directories a non-login root shell may lack.
fn find_program(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// apt-get update at most once per run, and only when a lookup or download needs it.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn update(&mut self) -> anyhow::Result<()> {
        if !self.updated {
            println!("vm-test: apt-get update");
            run_command(
                Command::new("apt-get")
                    .args(["update", "-qq"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            self.updated = true;
        }
        Ok(())
    }
}

/// A kernel ready to boot.
struct Kernel {
    series: &'static str,
    /// `uname -r` in the guest, e.g. `6.12.117+deb12-amd64`.
    release: String,
    vmlinuz: PathBuf,
}

/// The newest package of `series` apt knows, its vmlinuz kept in .tools/kernels/<release>/ and
/// its modules installed in /lib/modules/<release>/ (virtme-ng loads virtio and 9p from there).
fn ensure_kernel(
    workspace: &Path,
    series: &'static Series,
    apt: &mut Apt,
) -> anyhow::Result<Kernel> {
    let mut kernel = Kernel::of(workspace, series, &newest_package(series, apt)?)?;
    if !kernel.installed() && !apt.updated {
        // Downloading anyway: take the newest, not whatever the lists knew when last updated
        // (they may even name a version gone from the archive).
        apt.update()?;
        kernel = Kernel::of(workspace, series, &newest_package(series, apt)?)?;
    }
    let release = kernel.release.clone();
    if kernel.installed() {
        println!("vm-test: {} is {release} (cached)", series.name);
        return Ok(kernel);
    }
    let package = format!("linux-image-{release}");
    let dir = kernel
        .vmlinuz
        .parent()
        .context("vmlinuz has no directory")?
        .to_path_buf();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let deb = download(&package, &dir)?;
    let unpacked = dir.join("unpacked");
    remove_dir_if_present(&unpacked)?;
    run_command(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;

    let modules = kernel.modules();
    if !modules.join("modules.dep").is_file() {
        let shipped = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| unpacked.join(d).join(&release))
            .find(|d| d.is_dir())
            .with_context(|| format!("{package} ships no lib/modules/{release}"))?;
        // This machine's own kernel has no modules: without /lib/modules, `cp -a` would make
        // the release's directory /lib/modules itself.
        fs::create_dir_all("/lib/modules").context("creating /lib/modules")?;
        // `src/.` copies the contents, whether or not an interrupted run left the target.
        run_command(
            Command::new("cp")
                .arg("-a")
                .arg(shipped.join("."))
                .arg(&modules),
        )?;
        let depmod = find_program("depmod").context("depmod not found (Debian package kmod)")?;
        run_command(Command::new(depmod).arg(&release))?;
    }
    let shipped = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    let partial = dir.join("vmlinuz.partial");
    fs::copy(&shipped, &partial)
        .and_then(|_| fs::rename(&partial, &kernel.vmlinuz))
        .with_context(|| {
            format!(
                "copying {} to {}",
                shipped.display(),
                kernel.vmlinuz.display()
            )
        })?;
    // What stays is vmlinuz (and the modules in /lib/modules): the package is 70-110 MB.
    remove_dir_if_present(&unpacked)?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    println!("vm-test: {} is {release} (installed)", series.name);
    Ok(kernel)
}

impl Kernel {
    fn of(workspace: &Path, series: &'static Series, package: &str) -> anyhow::Result<Self> {
        let release = package
            .strip_prefix("linux-image-")
            .context("kernel package without the linux-image- prefix")?
            .to_owned();
        Ok(Self {
            series: series.name,
            vmlinuz: workspace
                .join(".tools")
                .join("kernels")
                .join(&release)
                .join("vmlinuz"),
            release,
        })
    }

    fn modules(&self) -> PathBuf {
        Path::new("/lib/modules").join(&self.release)
    }

    /// vmlinuz is written last, so its presence means the whole kernel is in place.
    fn installed(&self) -> bool {
        self.vmlinuz.is_file() && self.modules().join("modules.dep").is_file()
    }
}

fn remove_dir_if_present(dir: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The newest `<prefix><N><suffix>` package name apt knows, updating the lists if none: a
/// fresh machine's lists can predate a series (they had no 6.12 here until updated).
fn newest_package(series: &Series, apt: &mut Apt) -> anyhow::Result<String> {
    if let Some(name) = newest_listed(series)? {
        return Ok(name);
    }
    apt.update()?;
    newest_listed(series)?.with_context(|| {
        format!(
            "apt knows no {}N{} package: is Debian 12's archive (with bookworm-security) in \
             /etc/apt/sources.list.d?",
            series.prefix, series.suffix
        )
    })
}

fn newest_listed(series: &Series) -> anyhow::Result<Option<String>> {
    let mut apt_cache = Command::new("apt-cache");
    apt_cache.args(["pkgnames", series.prefix]);
    let names = stdout_of(&mut apt_cache)?;
    Ok(names
        .lines()
        .filter_map(|name| {
            let n = name
                .strip_prefix(series.prefix)?
                .strip_suffix(series.suffix)?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some((n.parse::<u64>().ok()?, name))
        })
        .max()
        .map(|(_, name)| name.to_owned()))
}

/// `apt-get download`s `package` into `dir`, unless an interrupted run left it there; returns
/// the .deb.
fn download(package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let find = || -> anyhow::Result<Option<PathBuf>> {
        let prefix = format!("{package}_");
        Ok(fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "deb")
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
            }))
    };
    if let Some(deb) = find()? {
        return Ok(deb);
    }
    println!("vm-test: downloading {package}");
    run_command(
        Command::new("apt-get")
            .current_dir(dir)
            // As root into a directory the _apt user cannot write: say so instead of warning.
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root", package]),
    )?;
    find()?.with_context(|| format!("apt-get download left no {package}_*.deb"))
}

/// Runs a command and returns its stdout.
fn stdout_of(command: &mut Command) -> anyhow::Result<String> {
    let line = command_line(command);
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running `{line}`"))?;
    ensure!(
        output.status.success(),
        "`{line}` failed ({})",
        output.status
    );
    String::from_utf8(output.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

/// An integration test binary of the fdtrace package with root tests (`#[ignore = "root"]`).
struct TestBinary {
    /// The test target's name, e.g. `kernel` for tests/kernel.rs.
    name: String,
    path: PathBuf,
    /// How many tests `--ignored` runs in it.
    tests: usize,
}

/// Builds fdtrace's tests in release and returns the integration test binaries that have
/// ignored (root) tests. Unit tests need no kernel and are left out.
fn build_tests(workspace: &Path) -> anyhow::Result<Vec<TestBinary>> {
    let mut cargo = host_cargo(workspace);
    cargo
        .args(["test", "--release", "--package", "fdtrace", "--no-run"])
        // Diagnostics still reach the terminal rendered; stdout is the JSON.
        .arg("--message-format=json-render-diagnostics");
    let messages = stdout_of(&mut cargo)?;
    let mut binaries = Vec::new();
    for line in messages.lines() {
        let message: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("cargo printed a line that is not JSON: {line}"))?;
        let is_test = message["reason"] == "compiler-artifact"
            && message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        let (true, Some(path), Some(name)) = (
            is_test,
            message["executable"].as_str(),
            message["target"]["name"].as_str(),
        ) else {
            continue;
        };
        if HOST_ONLY_BINARIES.contains(&name) {
            continue;
        }
        let mut list = Command::new(path);
        list.args(["--list", "--ignored", "--format", "terse"])
            .args(skip_args())
            .current_dir(workspace.join("fdtrace"));
        let tests = stdout_of(&mut list)?
            .lines()
            .filter(|l| l.ends_with(": test"))
            .count();
        if tests > 0 {
            binaries.push(TestBinary {
                name: name.to_owned(),
                path: PathBuf::from(path),
                tests,
            });
        }
    }
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    ensure!(
        !binaries.is_empty(),
        "cargo built no fdtrace test binary with root tests"
    );
    Ok(binaries)
}

/// libtest's arguments for `HOST_ONLY_TESTS`.
fn skip_args() -> impl Iterator<Item = &'static str> {
    HOST_ONLY_TESTS.iter().flat_map(|name| ["--skip", name])
}

/// Takes cargo's own lock on target/release (the one `cargo build --release` waits on with
/// "Blocking waiting for file lock on artifact directory") until the returned file is dropped.
fn lock_release_dir(target: &Path) -> anyhow::Result<File> {
    let path = target.join("release").join(".cargo-lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // flock(LOCK_EX) on Linux, as cargo takes it.
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// One kernel's boot: where its files go and what it shares with the host.
struct Guest<'a> {
    workspace: &'a Path,
    vng: &'a Vng,
    /// target/vm-test/<series>: console.log, and guest/ (the results, shared read-write).
    dir: PathBuf,
    /// target/tmp: writable in the guest as an overlay (a stale fixture is rebuilt there),
    /// while the host keeps its files as built.
    fixtures_dir: &'a Path,
}

impl Guest<'_> {
    /// Boots the kernel and runs the tests; boots once more when the guest's kernel crashed.
    fn boot_until_it_reports(
        &self,
        kernel: &Kernel,
        binaries: &[TestBinary],
    ) -> anyhow::Result<Outcome> {
        let outcome = self.boot(kernel, binaries)?;
        if !outcome.guest_kernel_crashed() {
            return Ok(outcome);
        }
        // Seen once on 6.12, in a clean-clone CI run: "Oops: int3" in __schedule while the
        // tests attached probes, i.e. static-key patching (text_poke_bp) racing under QEMU's
        // multi-threaded TCG. The guest's kernel, not fdtrace, died; one more boot tells an
        // emulation flake from a real failure, which would crash again.
        outcome.print_details();
        println!(
            "vm-test: the {} guest's kernel crashed (console above); booting it once more",
            kernel.series
        );
        self.boot(kernel, binaries)
    }

    fn boot(&self, kernel: &Kernel, binaries: &[TestBinary]) -> anyhow::Result<Outcome> {
        let results = self.dir.join("guest");
        remove_dir_if_present(&results)?;
        fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
        let script = results.join("run.sh");
        fs::write(&script, self.script(&results, binaries)?)
            .with_context(|| format!("writing {}", script.display()))?;
        let console_path = self.dir.join("console.log");
        let console = File::create(&console_path)
            .with_context(|| format!("creating {}", console_path.display()))?;

        let mut vng = Command::new(&self.vng.program);
        vng.current_dir(self.workspace)
            .env("PATH", &self.vng.path)
            // TCG: /dev/kvm exists but without vmx the guest hangs after "Probing EDD".
            .arg("--disable-kvm")
            // Without it vng first tries Debian's virtiofsd, which refuses its arguments, and
            // waits about 10 s for it before falling back to 9p.
            .arg("--force-9p")
            // The console carries the kernel's messages: the log to read when a guest fails.
            .arg("--verbose")
            .args(["--memory", GUEST_MEMORY, "--cpus", GUEST_CPUS])
            .arg("--rwdir")
            .arg(&results)
            .arg("--overlay-rwdir")
            .arg(self.fixtures_dir)
            .arg("--run")
            .arg(&kernel.vmlinuz)
            .arg("--")
            .arg(format!("sh {}", utf8(&script)?))
            .stdin(Stdio::null())
            .stdout(console.try_clone().context("duplicating the console log")?)
            .stderr(console);
        println!(
            "vm-test: booting {} ({}), console in {}",
            kernel.series,
            kernel.release,
            console_path.display()
        );
        let started = Instant::now();
        let mut child = vng
            .spawn()
            .with_context(|| format!("starting `{}`", command_line(&vng)))?;
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for vng")? {
                break Some(status);
            }
            if started.elapsed() > BOOT_TIMEOUT {
                // vng runs qemu a few processes down (vng, sh, virtme-run, qemu).
                kill_guest(&mut child);
                break None;
            }
            thread::sleep(Duration::from_millis(500));
        };
        Ok(Outcome::collect(
            kernel,
            binaries,
            &results,
            &console_path,
            status,
            started.elapsed(),
        ))
    }

    /// The guest's command: each binary's output and exit status into a file of `results`,
    /// because the console mixes the command's output with the kernel's.
    fn script(&self, results: &Path, binaries: &[TestBinary]) -> anyhow::Result<String> {
        let mut script = String::from("# Written by `cargo xtask vm-test`: run in the guest.\n");
        for var in GUEST_ENV {
            if let Some(value) = env::var_os(var) {
                let value = value
                    .into_string()
                    .map_err(|_| anyhow::anyhow!("${var} is not UTF-8"))?;
                writeln!(script, "export {var}={}", sh_quote(&value))?;
            }
        }
        // The tests that assert wall-clock bounds relax them under emulation.
        script.push_str("export FDTRACE_EMULATED=1\n");
        // virtme-ng's init leaves the kernel's default RLIMIT_NOFILE (1024); the tests were
        // written against the host's, and a fixture racing threads on descriptor numbers ran
        // out of them in the guest.
        let mut nofile = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we own and nothing else.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut nofile) } != 0 {
            return Err(io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
        }
        writeln!(
            script,
            "ulimit -H -n {} && ulimit -S -n {}",
            nofile.rlim_max, nofile.rlim_cur
        )?;
        // Where cargo test runs integration tests from.
        writeln!(
            script,
            "cd {}",
            sh_quote(utf8(&self.workspace.join("fdtrace"))?)
        )?;
        // virtme-ng's /tmp is an overlay on the host's, shared over 9p, which has no file
        // handles (name_to_handle_at fails with EOPNOTSUPP); a real machine's /tmp is a tmpfs
        // or a disk file system, and the fixtures work there. The tests' temporary directory
        // is a tmpfs of its own (TMPDIR), not one mounted over /tmp: the workspace itself may
        // be under /tmp (a CI clone was), and would vanish from the guest.
        script.push_str(
            "mkdir -p /run/fdtrace-tmp && mount -t tmpfs -o mode=1777 tmpfs /run/fdtrace-tmp \
             && export TMPDIR=/run/fdtrace-tmp\n",
        );
        writeln!(script, "R={}", sh_quote(utf8(results)?))?;
        script.push_str("uname -r > \"$R/kernel\"\n");
        // Every test flips static keys as its tracer comes and goes, and the kernel patches
        // its own code for each flip. Under QEMU's multi-threaded TCG the other vCPU can then
        // run a stale translation of that code: twice in one CI run, 6.12 died of "Oops: int3"
        // in __schedule, whose perf_sched_events branch the tracer's per-task perf events
        // (the mapping watcher) turn on and off. Holding the keys on for the whole guest
        // leaves nothing to patch; the tests still load, attach and detach every probe.
        let xtask = env::current_exe().context("locating the xtask binary")?;
        writeln!(
            script,
            "{} vm-guest-hold-keys > \"$R/hold-keys.log\" 2>&1 &",
            sh_quote(utf8(&xtask)?)
        )?;
        for binary in binaries {
            writeln!(
                script,
                // --show-output: what passing tests print (a syscall the kernel refused, a
                // relaxed check) is part of what a kernel did.
                // RUSTC_BOOTSTRAP lets a stable-built libtest print each test's time: what
                // to read when a guest nears its limits.
                "RUSTC_BOOTSTRAP=1 timeout -s KILL {BINARY_TIMEOUT_SECS} {} --ignored \
                 --test-threads=1 {} -Z unstable-options --report-time --show-output \
                 > \"$R/{name}.out\" 2>&1; echo $? > \"$R/{name}.status\"",
                sh_quote(utf8(&binary.path)?),
                skip_args().collect::<Vec<_>>().join(" "),
                name = binary.name
            )?;
        }
        script.push_str("echo done > \"$R/done\"\n");
        Ok(script)
    }
}

/// The guest side of the static-key hold (see `Guest::script`): a task-bound perf event keeps
/// perf_sched_events on, and the sched tracepoints the probes use stay enabled in tracefs
/// (with tracing off, so nothing is recorded). Never returns unless it fails.
pub fn hold_static_keys() -> anyhow::Result<()> {
    // perf_event_attr as far as PERF_ATTR_SIZE_VER0: type, size, config; the rest zero.
    let mut attr = [0u64; 8];
    attr[0] = u64::from(PERF_TYPE_SOFTWARE) | (size_of_val(&attr) as u64) << 32;
    attr[1] = PERF_COUNT_SW_DUMMY;
    // SAFETY: attr is a perf_event_attr of the size it declares; the other arguments are
    // plain integers (this task, any CPU, no group, no flags).
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error())
            .context("perf_event_open (a dummy event on itself)");
    }
    let tracing = Path::new("/sys/kernel/tracing");
    if !tracing.join("events").exists() {
        let status = Command::new("mount")
            .args(["-t", "tracefs", "nodev"])
            .arg(tracing)
            .status()
            .context("mounting tracefs")?;
        ensure!(status.success(), "mounting tracefs: {status}");
    }
    fs::write(tracing.join("tracing_on"), "0").context("turning tracing off")?;
    for event in [
        "sched_process_fork",
        "sched_process_exec",
        "sched_process_exit",
    ] {
        let enable = tracing.join("events/sched").join(event).join("enable");
        fs::write(&enable, "1").with_context(|| format!("writing {}", enable.display()))?;
    }
    println!("holding perf_sched_events and the sched tracepoints on");
    loop {
        thread::sleep(Duration::from_hours(1));
    }
}

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_DUMMY: u64 = 9;

fn utf8(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Ends vng and what it started: the processes without children first (qemu), so that the
/// ones above reap them and exit on their own; then whatever is left, by SIGKILL.
fn kill_guest(vng: &mut Child) {
    let mut family = vec![vng.id()];
    let mut i = 0;
    while i < family.len() {
        family.extend(children(family[i]));
        i += 1;
    }
    for &p in &family {
        if children(p).is_empty() {
            // SAFETY: signalling a process we started; kill has no memory preconditions.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && matches!(vng.try_wait(), Ok(None)) {
        thread::sleep(Duration::from_millis(100));
    }
    for p in family {
        if Path::new(&format!("/proc/{p}")).exists() {
            // SAFETY: as above.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
    let _ = vng.wait();
}

/// What one test binary reported from the guest.
struct BinaryResult {
    name: String,
    /// Tests it was to run (`--list --ignored` on the host).
    tests: usize,
    /// Its exit status; None when it never reported one.
    status: Option<i32>,
    /// From libtest's `test result:` line.
    passed: usize,
    output: String,
    /// The file holding `output`.
    output_path: PathBuf,
}

impl BinaryResult {
    fn ok(&self) -> bool {
        self.status == Some(0)
    }

    /// Listed tests that did not pass: failed, or never ran because the binary died.
    fn failed(&self) -> usize {
        self.tests.saturating_sub(self.passed)
    }
}

/// One kernel's run.
struct Outcome {
    series: &'static str,
    expected_release: String,
    /// `uname -r` as the guest wrote it; None when the command never ran.
    release: Option<String>,
    binaries: Vec<BinaryResult>,
    /// Whether the command got to its end.
    finished: bool,
    /// vng's status; None when it was killed at the timeout.
    status: Option<ExitStatus>,
    wall: Duration,
    console: PathBuf,
}

impl Outcome {
    fn collect(
        kernel: &Kernel,
        binaries: &[TestBinary],
        results: &Path,
        console: &Path,
        status: Option<ExitStatus>,
        wall: Duration,
    ) -> Self {
        let read = |name: &str| fs::read_to_string(results.join(name)).ok();
        let binaries = binaries
            .iter()
            .map(|b| {
                let output_path = results.join(format!("{}.out", b.name));
                let output = fs::read_to_string(&output_path).unwrap_or_default();
                BinaryResult {
                    name: b.name.clone(),
                    tests: b.tests,
                    status: read(&format!("{}.status", b.name)).and_then(|s| s.trim().parse().ok()),
                    passed: passed_count(&output),
                    output,
                    output_path,
                }
            })
            .collect();
        Self {
            series: kernel.series,
            expected_release: kernel.release.clone(),
            release: read("kernel").map(|s| s.trim().to_owned()),
            binaries,
            finished: results.join("done").exists(),
            status,
            wall,
            console: console.to_path_buf(),
        }
    }

    fn passed(&self) -> usize {
        self.binaries.iter().map(|b| b.passed).sum()
    }

    /// The guest stopped early because its own kernel panicked.
    fn guest_kernel_crashed(&self) -> bool {
        !self.finished
            && fs::read_to_string(&self.console)
                .is_ok_and(|console| console.contains("Kernel panic - not syncing"))
    }

    fn failed(&self) -> usize {
        self.binaries.iter().map(BinaryResult::failed).sum()
    }

    /// Why this kernel fails the step, if it does.
    fn failure(&self) -> Option<String> {
        if self.release.is_none() {
            return Some(format!("no report: {}", self.how_it_stopped()));
        }
        if self.release.as_deref() != Some(&self.expected_release) {
            return Some(format!(
                "booted {}, not {}",
                self.release.as_deref().unwrap_or("?"),
                self.expected_release
            ));
        }
        let broken: Vec<&str> = self
            .binaries
            .iter()
            .filter(|b| !b.ok())
            .map(|b| b.name.as_str())
            .collect();
        if !broken.is_empty() || !self.finished {
            let total: usize = self.binaries.iter().map(|b| b.tests).sum();
            let mut why = format!("{} of {total} tests failed", self.failed());
            if !self.finished {
                let _ = write!(why, ", {} before the end", self.how_it_stopped());
            }
            let _ = write!(why, "; in {}", broken.join(", "));
            return Some(why);
        }
        None
    }

    /// Why the guest's command did not get to its end.
    fn how_it_stopped(&self) -> String {
        match self.status {
            None => format!("killed at the {} s limit", BOOT_TIMEOUT.as_secs()),
            Some(status) => format!("the guest stopped ({status})"),
        }
    }

    /// Each binary's output, and the console's end when the guest stopped early.
    fn print_details(&self) {
        for b in &self.binaries {
            let status = match b.status {
                Some(0) => "ok".to_owned(),
                // `timeout -s KILL` exits with 137 too.
                Some(137) => {
                    format!("SIGKILL: at the {BINARY_TIMEOUT_SECS} s limit, or out of memory")
                }
                Some(code) => format!("exit status {code}"),
                None if b.output_path.exists() => "did not finish".to_owned(),
                None => "did not run".to_owned(),
            };
            println!(
                "---- {} {}: {} passed, {} failed ({status})",
                self.series,
                b.name,
                b.passed,
                b.failed()
            );
            print_cut(&b.output, &b.output_path);
        }
        if !self.finished {
            let console = fs::read_to_string(&self.console).unwrap_or_default();
            let lines: Vec<&str> = console.lines().collect();
            println!(
                "---- {}: {}; the console's last lines ({}):",
                self.series,
                self.how_it_stopped(),
                self.console.display()
            );
            for line in &lines[lines.len().saturating_sub(40)..] {
                println!("{line}");
            }
        }
    }

    fn summary_line(&self) -> String {
        let verdict = self.failure().unwrap_or_else(|| "ok".to_owned());
        format!(
            "{:<5} {:<22} {:>3} passed, {:>3} failed in {:>6.1}s: {verdict}",
            self.series,
            self.release.as_deref().unwrap_or(&self.expected_release),
            self.passed(),
            self.failed(),
            self.wall.as_secs_f64()
        )
    }
}

/// Prints `output`, or its head and tail when longer than [`PRINTED_LINES`]: a failing
/// assertion can dump a whole report, and the file keeps all of it.
fn print_cut(output: &str, path: &Path) {
    let lines: Vec<&str> = output.lines().collect();
    if lines.len() <= PRINTED_LINES {
        // Line by line: a binary killed mid-line leaves no final newline.
        for line in lines {
            println!("{line}");
        }
        return;
    }
    // The head names the tests and the first failure; the tail has libtest's summary.
    let tail = 40;
    let head = PRINTED_LINES - tail;
    for line in &lines[..head] {
        println!("{line}");
    }
    println!(
        "[... {} lines cut: the whole output is in {}]",
        lines.len() - head - tail,
        path.display()
    );
    for line in &lines[lines.len() - tail..] {
        println!("{line}");
    }
}

/// `N passed` from libtest's `test result: ... N passed; M failed; ...` line.
fn passed_count(output: &str) -> usize {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("test result: "))
        .filter_map(|rest| {
            rest.split(';')
                .find_map(|part| part.trim().strip_suffix(" passed"))
                .and_then(|n| n.rsplit(' ').next()?.parse::<usize>().ok())
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_count_reads_libtest_summaries() {
        let output = "running 6 tests\n\
            test a ... ok\n\
            test result: FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 1 filtered out; \
            finished in 91.29s\n";
        assert_eq!(passed_count(output), 5);
        assert_eq!(passed_count("test result: ok. 2 passed; 0 failed;"), 2);
        assert_eq!(passed_count("thread 'main' panicked"), 0);
    }

    #[test]
    fn sh_quote_survives_quotes() {
        assert_eq!(sh_quote("a'b c"), r"'a'\''b c'");
    }
}
