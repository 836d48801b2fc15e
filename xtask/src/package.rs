//! `cargo xtask package`: a Debian package, target/debian/fdtrace_<version>_<arch>.deb, with
//! the release binary (the probes are embedded in it), its man pages and shell completions,
//! the copyright file, and the systemd unit and its /etc/default file from `packaging/`.
//!
//! Plain `dpkg-deb --build` over a staged tree rather than cargo-deb: dpkg-deb is on every
//! Debian machine, and what goes where stays readable in one function.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail, ensure};

use crate::{build_release, command_line, e2e, run_command, target_dir, toolchain};

const PACKAGE: &str = "fdtrace";
/// The workspace's version: xtask takes it from `[workspace.package]` like fdtrace does.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const MAINTAINER: &str = "fdtrace developers <fdtrace@users.noreply.github.com>";
const HOMEPAGE: &str = "https://github.com/fdtrace/fdtrace";
const DESCRIPTION: &str = "\
file-descriptor leak tracer for Linux (eBPF)
 fdtrace shows, on a live process, which call sites hold its open file
 descriptors (full user stacks with file:line), which keep growing, how long
 until the limit at this rate, and what filled the table the moment a call
 failed with EMFILE. It also traces a command to its exit and reports what it
 left open (valgrind --track-fds style), records for replay on any machine,
 and runs as a service (fdtrace serve, the fdtrace.service unit).";

/// Builds the release binary, then the package; returns the .deb's path.
pub fn run(workspace: &Path) -> anyhow::Result<PathBuf> {
    toolchain::setup(workspace)?;
    let binary = build_release(workspace)?;
    build(workspace, &binary)
}

/// The CI check (as root): builds the package, installs it on this machine, checks what landed
/// and the unit with `systemd-analyze verify`, then purges it again so the machine stays as it
/// was (an fdtrace package installed before the check is purged too).
pub fn check(workspace: &Path) -> anyhow::Result<()> {
    if !has_program("systemd-analyze") {
        e2e::ensure_debian_packages(&["systemd"])?;
    }
    let deb = run(workspace)?;
    run_command(Command::new("dpkg").arg("--install").arg(&deb))?;
    let installed = check_installed();
    // The purge runs whatever the checks said; its own failure is reported when they passed.
    let purged = run_command(Command::new("dpkg").args(["--purge", PACKAGE]));
    installed.and(purged)
}

fn check_installed() -> anyhow::Result<()> {
    let listed = command_output(Command::new("dpkg").args(["--listfiles", PACKAGE]))?;
    for path in [
        "/usr/bin/fdtrace",
        "/usr/share/man/man1/fdtrace.1.gz",
        "/lib/systemd/system/fdtrace.service",
    ] {
        ensure!(
            listed.lines().any(|l| l == path),
            "dpkg -L {PACKAGE} does not list {path}"
        );
    }
    let version = command_output(Command::new("/usr/bin/fdtrace").arg("--version"))?;
    ensure!(
        version == format!("fdtrace {VERSION}"),
        "/usr/bin/fdtrace --version printed {version:?}"
    );
    if has_program("man") {
        let page = command_output(Command::new("man").args(["-w", "fdtrace"]))?;
        ensure!(
            page == "/usr/share/man/man1/fdtrace.1.gz",
            "man -w fdtrace found {page:?}, not the packaged page"
        );
    }
    // Offline: it parses the unit and fails when ExecStart's binary, a unit it names or a
    // Documentation= man page is missing. A misspelt directive is only a warning ("Unknown
    // key ..., ignoring") that leaves the status 0, so any line about our unit fails too;
    // lines about other units on the machine are not ours to fix.
    let unit = "/lib/systemd/system/fdtrace.service";
    let output = Command::new("systemd-analyze")
        .args(["verify", unit])
        .stdin(Stdio::null())
        .output()
        .context("starting `systemd-analyze verify`")?;
    let printed = String::from_utf8_lossy(&output.stderr) + String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && !printed.lines().any(|l| l.contains("fdtrace")),
        "systemd-analyze verify {unit} ({}): {}",
        output.status,
        printed.trim()
    );
    Ok(())
}

/// Stages the package tree under target/debian and builds the .deb from it.
fn build(workspace: &Path, binary: &Path) -> anyhow::Result<PathBuf> {
    let arch = command_output(Command::new("dpkg").arg("--print-architecture"))?;
    let out_dir = target_dir(workspace)?.join("debian");
    let name = format!("{PACKAGE}_{VERSION}_{arch}");
    let root = out_dir.join(&name);
    let assets = out_dir.join("assets");
    // From scratch each time: a file dropped from the package must not linger in the tree.
    for dir in [&root, &assets] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    let packaging = workspace.join("packaging");

    let installed_binary = root.join("usr/bin/fdtrace");
    copy(binary, &installed_binary, 0o755)?;
    // Debug sections are 46 MB of the 55 MB release binary (measured 2026-11-29), and Debian
    // strips packaged binaries. --strip-debug keeps the symbol table, so a panic's backtrace still names
    // functions, and .eh_frame, which unwinding needs.
    run_command(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&installed_binary),
    )?;
    // Generated by the binary itself, so they match its --help exactly.
    command_output(Command::new(binary).arg("assets").arg(&assets))?;
    let man_dir = root.join("usr/share/man/man1");
    for page in sorted_entries(&assets.join("man"))? {
        let file_name = page.file_name().context("a man page without a name")?;
        let mut gz = file_name.to_os_string();
        gz.push(".gz");
        gzip(&page, &man_dir.join(gz))?;
    }
    let completions = assets.join("completions");
    for (generated, installed) in [
        (
            "fdtrace.bash",
            "usr/share/bash-completion/completions/fdtrace",
        ),
        ("_fdtrace", "usr/share/zsh/vendor-completions/_fdtrace"),
        (
            "fdtrace.fish",
            "usr/share/fish/vendor_completions.d/fdtrace.fish",
        ),
    ] {
        copy(&completions.join(generated), &root.join(installed), 0o644)?;
    }
    copy(
        &packaging.join("copyright"),
        &root.join("usr/share/doc/fdtrace/copyright"),
        0o644,
    )?;
    copy(
        &packaging.join("fdtrace.service"),
        &root.join("lib/systemd/system/fdtrace.service"),
        0o644,
    )?;
    copy(
        &packaging.join("default/fdtrace"),
        &root.join("etc/default/fdtrace"),
        0o644,
    )?;

    let payload = payload_files(&root)?;
    let control = root.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        copy(
            &packaging.join("debian").join(script),
            &control.join(script),
            0o755,
        )?;
    }
    // dpkg keeps an administrator's edits to a conffile across upgrades and removals.
    write(&control.join("conffiles"), "/etc/default/fdtrace\n")?;
    write(&control.join("md5sums"), &md5sums(&root, &payload)?)?;
    let depends = depends(&out_dir, &installed_binary)?;
    write(
        &control.join("control"),
        &format!(
            "Package: {PACKAGE}\nVersion: {VERSION}\nArchitecture: {arch}\n\
             Maintainer: {MAINTAINER}\nInstalled-Size: {}\nDepends: {depends}\n\
             Section: utils\nPriority: optional\nHomepage: {HOMEPAGE}\n\
             Description: {DESCRIPTION}\n",
            installed_size_kib(&root, &payload)?
        ),
    )?;
    // create_dir_all follows the umask; a package's directories must be 0755 whatever it is.
    set_dir_modes(&root)?;

    let deb = out_dir.join(format!("{name}.deb"));
    run_command(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&root)
            .arg(&deb),
    )?;
    lintian(&deb)?;
    Ok(deb)
}

/// The Depends line. dpkg-shlibdeps (dpkg-dev) knows each library's package and minimum
/// version; without it, fall back to the glibc symbol versions the binary asks for.
fn depends(out_dir: &Path, binary: &Path) -> anyhow::Result<String> {
    if has_program("dpkg-shlibdeps") {
        // It insists on reading debian/control from its working directory.
        let source = out_dir.join("shlibdeps");
        write(
            &source.join("debian/control"),
            &format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
        )?;
        let output = command_output(
            Command::new("dpkg-shlibdeps")
                .arg("-O")
                .arg(binary)
                .current_dir(&source),
        )?;
        return output
            .lines()
            .find_map(|l| l.strip_prefix("shlibs:Depends="))
            .map(str::to_string)
            .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {output}"));
    }
    let dynamic = command_output(Command::new("objdump").args(["-p", "-T"]).arg(binary))?;
    fallback_depends(&dynamic)
}

/// Depends from `objdump -p -T`: libc6 at the newest GLIBC_x.y version any symbol needs, and
/// libgcc-s1 when the binary links libgcc_s (Rust's unwinder). Refuses other libraries rather
/// than guess their package.
fn fallback_depends(objdump: &str) -> anyhow::Result<String> {
    let mut depends = Vec::new();
    let mut needs_gcc_s = false;
    for line in objdump.lines() {
        if let Some(library) = line.trim().strip_prefix("NEEDED") {
            match library.trim() {
                "libc.so.6" | "libm.so.6" | "libpthread.so.0" | "libdl.so.2" | "librt.so.1" => {}
                l if l.starts_with("ld-linux") => {}
                "libgcc_s.so.1" => needs_gcc_s = true,
                other => bail!(
                    "the binary needs {other}, whose package is unknown without dpkg-shlibdeps \
                     (apt-get install dpkg-dev)"
                ),
            }
        }
    }
    let glibc = objdump
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(str::parse::<u32>);
            Some((parts.next()?.ok()?, parts.next().unwrap_or(Ok(0)).ok()?))
        })
        .max()
        .context("objdump -T shows no GLIBC_ symbol versions")?;
    depends.push(format!("libc6 (>= {}.{})", glibc.0, glibc.1));
    if needs_gcc_s {
        depends.push("libgcc-s1".to_string());
    }
    Ok(depends.join(", "))
}

/// Runs lintian on the package when it is installed (it is not a requirement).
fn lintian(deb: &Path) -> anyhow::Result<()> {
    if !has_program("lintian") {
        return Ok(());
    }
    run_command(Command::new("lintian").arg(deb))
}

/// The files of the tree outside DEBIAN/, relative to `root`, sorted.
fn payload_files(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(root: &Path, dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for path in sorted_entries(dir)? {
            if path.is_dir() {
                walk(root, &path, files)?;
            } else {
                files.push(path.strip_prefix(root)?.to_path_buf());
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(root, root, &mut files)?;
    Ok(files)
}

/// DEBIAN/md5sums, which `dpkg --verify` (debsums) checks installed files against. Conffiles
/// are left out, as dh_md5sums does: dpkg tracks their sums itself, and edits are expected.
fn md5sums(root: &Path, files: &[PathBuf]) -> anyhow::Result<String> {
    let files: Vec<_> = files.iter().filter(|f| !f.starts_with("etc")).collect();
    command_output(Command::new("md5sum").args(files).current_dir(root)).map(|s| s + "\n")
}

/// Installed-Size as dpkg-gencontrol counts it: each file rounded up to KiB, one per directory.
fn installed_size_kib(root: &Path, files: &[PathBuf]) -> anyhow::Result<u64> {
    let mut kib = 0;
    let mut dirs = std::collections::BTreeSet::new();
    for file in files {
        let len = fs::metadata(root.join(file))
            .with_context(|| format!("reading {}", file.display()))?
            .len();
        kib += len.div_ceil(1024);
        dirs.extend(
            file.ancestors()
                .skip(1)
                .filter(|d| !d.as_os_str().is_empty()),
        );
    }
    Ok(kib + dirs.len() as u64)
}

fn set_dir_modes(dir: &Path) -> anyhow::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    for path in sorted_entries(dir)? {
        if path.is_dir() {
            set_dir_modes(&path)?;
        }
    }
    Ok(())
}

/// `gzip -9n`: the best compression and no name or time stamp in the header, so the same page
/// compresses to the same bytes on every build (as Debian policy asks of man pages).
fn gzip(source: &Path, destination: &Path) -> anyhow::Result<()> {
    create_parent(destination)?;
    let out = fs::File::create(destination)
        .with_context(|| format!("creating {}", destination.display()))?;
    let mut command = Command::new("gzip");
    command.args(["-9n", "-c"]).arg(source).stdout(out);
    run_command(&mut command)?;
    fs::set_permissions(destination, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", destination.display()))
}

fn copy(source: &Path, destination: &Path, mode: u32) -> anyhow::Result<()> {
    create_parent(destination)?;
    fs::copy(source, destination)
        .with_context(|| format!("copying {} to {}", source.display(), destination.display()))?;
    fs::set_permissions(destination, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", destination.display()))
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    create_parent(path)?;
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn create_parent(path: &Path) -> anyhow::Result<()> {
    let parent = path.parent().context("a path without a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))
}

/// A directory's entries, sorted so that what the package build does is the same every time.
fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut entries = fs::read_dir(dir)
        .and_then(|d| {
            d.map(|e| e.map(|e| e.path()))
                .collect::<Result<Vec<_>, _>>()
        })
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

/// Whether `program` is on PATH.
fn has_program(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Runs `command` and returns its standard output, trimmed; on failure, the error names the
/// command and carries its standard error.
fn command_output(command: &mut Command) -> anyhow::Result<String> {
    let line = command_line(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::fallback_depends;

    #[test]
    fn fallback_depends_takes_the_newest_glibc_version() {
        let objdump = "\
Dynamic Section:
  NEEDED               libgcc_s.so.1
  NEEDED               libc.so.6
DYNAMIC SYMBOL TABLE:
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.2.5) open64
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.34) __libc_start_main
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.9) pipe2
";
        assert_eq!(
            fallback_depends(objdump).unwrap(),
            "libc6 (>= 2.34), libgcc-s1"
        );
    }

    #[test]
    fn fallback_depends_refuses_an_unknown_library() {
        let objdump = "  NEEDED               libssl.so.3\n (GLIBC_2.34) x\n";
        assert!(fallback_depends(objdump).is_err());
    }
}
