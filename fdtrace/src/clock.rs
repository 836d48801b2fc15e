//! Kernel monotonic time to wall-clock time, through one offset measured at start.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WallClock {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, nanoseconds.
    pub offset_ns: i128,
}

pub fn now(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC now, the clock bpf_ktime_get_ns reads.
pub fn monotonic_ns() -> u64 {
    now(libc::CLOCK_MONOTONIC)
}

impl WallClock {
    /// Measures the offset, taking the tightest of a few bracketing reads.
    pub fn measure() -> Self {
        let mut best = (u64::MAX, 0i128);
        for _ in 0..5 {
            let a = monotonic_ns();
            let real = now(libc::CLOCK_REALTIME);
            let b = monotonic_ns();
            if b - a < best.0 {
                best = (b - a, i128::from(real) - i128::from(a + (b - a) / 2));
            }
        }
        Self { offset_ns: best.1 }
    }

    pub fn wall_ns(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.offset_ns
    }

    /// RFC 3339 UTC with nanoseconds, e.g. `2026-11-22T01:48:51.123456789Z`.
    pub fn rfc3339(&self, mono_ns: u64) -> String {
        rfc3339(self.wall_ns(mono_ns))
    }
}

pub fn rfc3339(wall_ns: i128) -> String {
    let secs = wall_ns.div_euclid(1_000_000_000) as i64;
    let nanos = wall_ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        // date -u -d @1795225731 → 2026-11-21T01:48:51Z
        assert_eq!(
            rfc3339(1_795_225_731_123_456_789),
            "2026-11-21T01:48:51.123456789Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
    }
}
