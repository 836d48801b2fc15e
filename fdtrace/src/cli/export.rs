//! `fdtrace export FILE --format perfetto|folded|svg`: a recording for other tools.

use std::{
    fs::File,
    io::{self, Write},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use crate::{export, record::Replay};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ExportFormat {
    /// Chrome/Perfetto trace-event JSON (ui.perfetto.dev, chrome://tracing).
    Perfetto,
    /// Folded stacks of the descriptors open at the end (flamegraph.pl, inferno, speedscope).
    Folded,
    /// A flamegraph of the descriptors open at the end.
    Svg,
}

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// The recording.
    #[arg(value_name = "FILE")]
    input: PathBuf,
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Where to write (standard output when not given).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
}

pub(crate) fn export(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let recording = super::record::load(&args.input)?;
    let out: Box<dyn Write> = match &args.output {
        Some(path) => {
            Box::new(File::create(path).with_context(|| format!("creating {}", path.display()))?)
        }
        None => Box::new(io::stdout().lock()),
    };
    let what = || {
        args.output
            .as_ref()
            .map_or_else(|| "standard output".into(), |p| p.display().to_string())
    };
    match args.format {
        ExportFormat::Perfetto => {
            export::perfetto(&recording, out).with_context(|| format!("writing {}", what()))?;
        }
        ExportFormat::Folded | ExportFormat::Svg => {
            let mut replay = Replay::new(recording);
            replay.to_end();
            let report = replay.report();
            if args.format == ExportFormat::Folded {
                let mut out = out;
                out.write_all(export::folded(&report).as_bytes())
                    .and_then(|()| out.flush())
                    .with_context(|| format!("writing {}", what()))?;
            } else {
                export::flamegraph(&report, out).with_context(|| format!("writing {}", what()))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
