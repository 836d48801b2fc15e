//! `fdtrace replay FILE`: a recording through the live views, with play/pause, seek and speed.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::Args;

use crate::{record::Replay, tui};

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The recording.
    #[arg(value_name = "FILE")]
    input: PathBuf,
    /// Print the report of the whole recording instead of the terminal UI.
    #[arg(long)]
    no_tui: bool,
    /// Playback speed (1 is real time).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
}

pub(crate) fn replay(args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let mut replay = Replay::new(super::record::load(&args.input)?);
    replay.set_speed(args.speed);
    if !args.no_tui && std::io::stdout().is_terminal() {
        let options = tui::TuiOptions {
            replay: true,
            ..tui::TuiOptions::default()
        };
        tui::run(&mut replay, options)?;
        return Ok(ExitCode::SUCCESS);
    }
    replay.to_end();
    print!("{}", replay.report().to_text());
    Ok(ExitCode::SUCCESS)
}
