//! Python frames: a leak in Python code is reported at its Python function and line, with the
//! system CPython (Debian's, libpython linked in) and pyenv's (shared libpython), in threads.

mod common;

use std::{fs, path::Path};

use fdtrace::{probe::ProbeOptions, report::Report, stack::Lang};

fn marker_line(marker: &str) -> u32 {
    let text =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/leak.py"))
            .unwrap();
    text.lines().position(|l| l.contains(marker)).unwrap() as u32 + 1
}

/// The Python interpreters to test: Debian's and the one `python3` on PATH resolves to.
fn interpreters() -> Vec<String> {
    let mut found = Vec::new();
    if Path::new("/usr/bin/python3.11").exists() {
        found.push("/usr/bin/python3.11".to_string());
    }
    // sys.executable resolves pyenv's shim to the real binary.
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
    {
        let exe = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !exe.is_empty() && !found.contains(&exe) {
            found.push(exe);
        }
    }
    assert!(!found.is_empty(), "no CPython 3.11 on this machine");
    found
}

fn check(report: &Report, pid: u32, function: &str, kind: &str, open: u64, in_thread: bool) {
    let site = report
        .sites
        .iter()
        .filter(|s| s.pid == pid && s.kind.name() == kind)
        .find(|s| {
            s.frames
                .iter()
                .any(|f| f.function.as_deref() == Some(function))
                && s.frames.iter().any(|f| {
                    f.function.as_deref() == Some(if in_thread { "worker" } else { "main" })
                })
        })
        .unwrap_or_else(|| panic!("no {kind} site in {function}: {:#?}", report.sites));
    assert_eq!(site.open, open, "{function}");
    let frame = site
        .frames
        .iter()
        .find(|f| f.function.as_deref() == Some(function))
        .unwrap();
    assert_eq!(frame.lang, Lang::Python);
    assert_eq!(frame.file.as_deref(), Some("leak.py"));
    assert_eq!(frame.line, Some(marker_line(&format!("LEAK {function}"))));
    // The one-line place of the site is the program's function, not the interpreter or socket.py.
    assert!(
        fdtrace::report::place(&site.frames).starts_with(function),
        "{}",
        fdtrace::report::place(&site.frames)
    );
}

#[test]
#[ignore = "root"]
fn python_leaks_name_the_python_function_and_line() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/leak.py");
    for python in interpreters() {
        let run = common::run_traced(
            &[&python, script.to_str().unwrap()],
            ProbeOptions::default(),
        );
        assert_eq!(run.exit_code, 0, "{python}");
        let report = run.session.report();
        check(&report, run.pid, "read_settings", "file", 3, false);
        check(&report, run.pid, "read_settings", "file", 4, true);
        check(&report, run.pid, "connect_upstream", "socket", 2, false);
        assert!(
            !report.sites.iter().any(|s| s
                .frames
                .iter()
                .any(|f| f.function.as_deref() == Some("balanced"))),
            "{python}: balanced opens are not leaks"
        );
    }
}
