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
    /// nginx's configuration (`nginx -T` output, or its nginx.conf): upstream timeouts are
    /// compared with its proxy_connect_timeout and proxy_read_timeout.
    #[arg(long, value_name = "FILE")]
    nginx_conf: Option<PathBuf>,
}

pub(crate) fn report(args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let nginx = super::nginx_timeouts(args.nginx_conf.as_ref())?;
    let mut replay = Replay::new(super::record::load(&args.input)?);
    replay.to_end();
    let mut report = replay.report();
    if let Some(timeouts) = &nginx {
        report.compare_nginx(timeouts);
    }
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
