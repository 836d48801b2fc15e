//! `fdtrace assets DIR` (hidden): the man pages and shell completions, generated from the
//! command line's own definition so that they never drift from `--help`. The package build
//! (`cargo xtask package`) calls it.

use std::{fs, path::Path, process::ExitCode};

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use super::Cli;

pub(crate) fn write(dir: &Path) -> anyhow::Result<ExitCode> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // One page per subcommand too (fdtrace-serve.1, ...), as git and cargo ship theirs.
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "fdtrace", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    println!("{}", dir.display());
    Ok(ExitCode::SUCCESS)
}
