use std::process::ExitCode;

fn main() -> ExitCode {
    match fdtrace::cli::main() {
        Ok(code) => code,
        Err(err) => {
            // One line, whatever RUST_BACKTRACE says: `{:#}` joins the context chain.
            eprintln!("fdtrace: {err:#}");
            ExitCode::from(1)
        }
    }
}
