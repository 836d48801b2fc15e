//! Whatever the bytes, reading a recording and everything done with what it holds (replay,
//! reports, exports) ends without a panic.
#![no_main]

use fdtrace::{export, record};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Half the inputs skip the checksums so mutations reach zstd, postcard and the model.
    let verify = data.len() % 2 == 0;
    let Ok(recording) = record::reader::parse_with(data, verify) else {
        return;
    };
    let _ = export::perfetto(&recording, std::io::sink());
    let mut replay = record::Replay::new(recording);
    replay.to_end();
    let report = replay.report();
    let _ = report.to_text();
    let _ = report.to_markdown();
    let _ = report.to_json();
    let _ = export::folded(&report);
});
