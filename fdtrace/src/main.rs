use std::process::ExitCode;

fn main() -> ExitCode {
    // Die quietly of a closed pipe (`fdtrace ... | head`), with the status 141 shells expect,
    // instead of panicking in println. The kernel detaches the probes when we go.
    // SAFETY: restoring a default disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    match fdtrace::cli::main() {
        Ok(code) => code,
        Err(err) => {
            // One line, whatever RUST_BACKTRACE says: `{:#}` joins the context chain.
            eprintln!("fdtrace: {err:#}");
            ExitCode::from(1)
        }
    }
}
