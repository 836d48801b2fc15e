//! `fdtrace report FILE`: the report of a recording, as `run` would have printed it.

use std::{fs, io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use crate::record::Replay;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ReportFormat {
    Text,
    /// Ready to paste into an issue.
    Markdown,
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct ReportArgs {
    /// The recording.
    #[arg(value_name = "FILE")]
    input: PathBuf,
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    format: ReportFormat,
    /// Write the report to FILE instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
}

pub(crate) fn report(args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let mut replay = Replay::new(super::record::load(&args.input)?);
    replay.to_end();
    let report = replay.report();
    let text = match args.format {
        ReportFormat::Text => report.to_text(),
        ReportFormat::Markdown => report.to_markdown(),
        ReportFormat::Json => report.to_json(),
    };
    match &args.output {
        Some(path) => fs::write(path, text)
            .with_context(|| format!("writing the report to {}", path.display()))?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}
