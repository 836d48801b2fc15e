//! Short human forms of durations, rates and times for narrow columns.

use crate::clock::WallClock;

/// `45s`, `3m05s`, `2h10m`.
pub fn secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// An age in nanoseconds: `850ms` below a second, else as [`secs`].
pub fn age(ns: u64) -> String {
    if ns < 1_000_000_000 {
        format!("{}ms", ns / 1_000_000)
    } else {
        secs(ns as f64 / 1e9)
    }
}

/// A lifetime in milliseconds: `0.4ms`, `12ms`, `3.2s`, `5m00s`.
pub fn millis(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1}ms")
    } else if ms < 1000.0 {
        format!("{ms:.0}ms")
    } else if ms < 10_000.0 {
        format!("{:.1}s", ms / 1000.0)
    } else {
        secs(ms / 1000.0)
    }
}

/// A signed growth per minute: `+300`, `-2.5`, `0`.
pub fn growth(per_min: f64) -> String {
    if per_min.abs() < 0.05 {
        "0".into()
    } else if per_min.abs() < 10.0 {
        format!("{per_min:+.1}")
    } else {
        format!("{per_min:+.0}")
    }
}

/// A rate per second: `0`, `2.5`, `120`.
pub fn rate(per_sec: f64) -> String {
    if per_sec < 0.05 {
        "0".into()
    } else if per_sec < 100.0 {
        format!("{per_sec:.1}")
    } else {
        format!("{per_sec:.0}")
    }
}

/// `unlimited` or the number.
pub fn limit(soft: u64) -> String {
    if soft == u64::MAX {
        "unlimited".into()
    } else {
        soft.to_string()
    }
}

/// Wall time to the millisecond: `2026-11-21T01:48:51.123Z`.
pub fn wall_ms(clock: &WallClock, mono_ns: u64) -> String {
    let full = clock.rfc3339(mono_ns);
    // `YYYY-MM-DDTHH:MM:SS.mmm` then the zone: cut the nanoseconds to milliseconds.
    match full.split_once('.') {
        Some((head, tail)) => format!("{head}.{}Z", &tail[..3]),
        None => full,
    }
}

/// Time of day to the millisecond: `01:48:51.123`.
pub fn time_ms(clock: &WallClock, mono_ns: u64) -> String {
    let full = wall_ms(clock, mono_ns);
    full.get(11..23).unwrap_or(&full).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(secs(65.4), "1m05s");
        assert_eq!(age(850_000_000), "850ms");
        assert_eq!(millis(0.42), "0.4ms");
        assert_eq!(millis(3200.0), "3.2s");
        assert_eq!(growth(300.2), "+300");
        assert_eq!(growth(-2.5), "-2.5");
        assert_eq!(growth(0.01), "0");
        let clock = WallClock {
            offset_ns: 1_795_225_731_123_456_789,
        };
        assert_eq!(wall_ms(&clock, 0), "2026-11-21T01:48:51.123Z");
        assert_eq!(time_ms(&clock, 1_000_000), "01:48:51.124");
    }
}
