//! What fdtrace could not see, by reason: the probes' per-CPU counters, the mapping reports
//! the kernel dropped, and the records that did not decode. Each is a running total; the
//! session sends the totals to the model whenever one moves (`Event::Losses`), so the live
//! views, the reports and a recording's replay all show the same numbers.

use std::cell::Cell;

use serde::{Deserialize, Deserializer, Serialize};

/// Running totals, each a reason something is missing from what fdtrace shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Losses {
    /// Records the kernel's ring buffer had no room for: their events are missing.
    pub ring_full: u64,
    /// Records that reached userspace and did not decode: their events are missing.
    pub undecodable: u64,
    /// Creations whose user stack could not be read: they have no frames.
    pub stacks_unreadable: u64,
    /// Creations sent without their stack because the ring was more than half full: they
    /// have their syscall's frame and `tracer::SKIPPED_FRAME`, and the table stays exact. Absent from recordings
    /// before format 8 (see [`reading_before_stacks_skipped`]).
    #[serde(default, deserialize_with = "stacks_skipped")]
    pub stacks_skipped: u64,
    /// Paths or socket addresses the probes could not read: descriptors without a target.
    pub paths_unreadable: u64,
    /// Forks of traced processes not followed, the traced-process map being full.
    pub forks_not_followed: u64,
    /// Processes that matched `--comm`/`--cgroup`/`--container` and were not traced, the
    /// traced-process map being full.
    pub selected_not_traced: u64,
    /// Creations in CPython whose Python frames could not be read.
    pub python_frames_missing: u64,
    /// Mapping reports (mmap) the kernel dropped: code mapped then may stay unnamed.
    pub mapping_reports: u64,
    /// Connections accepted at the limit whose socket another connection had taken by the
    /// time their close was looked at: whether they were answered is unknown, and they are
    /// not in `dropped_at_emfile`.
    #[serde(default)]
    pub unanswered_unknown: u64,
}

thread_local! {
    static BEFORE_STACKS_SKIPPED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `read` (a postcard decoding) with [`Losses`] read as recordings before format 8 wrote
/// them, without `stacks_skipped`. Postcard writes a struct's fields one after the other with
/// nothing to tell them apart, so the field cannot just be defaulted: it must not be read.
pub fn reading_before_stacks_skipped<R>(read: impl FnOnce() -> R) -> R {
    BEFORE_STACKS_SKIPPED.set(true);
    let read = read();
    BEFORE_STACKS_SKIPPED.set(false);
    read
}

/// `stacks_skipped`, or 0 without reading anything in an older recording.
fn stacks_skipped<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    if BEFORE_STACKS_SKIPPED.get() {
        Ok(0)
    } else {
        u64::deserialize(d)
    }
}

/// One reason: its count, a word or two for the TUI header, and what it means.
pub struct Reason {
    pub count: u64,
    pub short: &'static str,
    pub long: &'static str,
}

impl Losses {
    /// Events missing from the model (the report's `dropped_events`).
    pub fn events(&self) -> u64 {
        self.ring_full + self.undecodable
    }

    /// Every reason but the ring's, which the views show on their own as events lost.
    pub fn shortfalls(&self) -> impl Iterator<Item = Reason> {
        let reason = |count, short, long| Reason { count, short, long };
        [
            reason(self.undecodable, "undecodable", "records undecodable"),
            reason(
                self.stacks_unreadable,
                "no stack",
                "stacks unreadable (no frames)",
            ),
            reason(
                self.stacks_skipped,
                "stacks skipped",
                "stacks skipped under load (ring over half full; syscall frame only)",
            ),
            reason(
                self.paths_unreadable,
                "no path",
                "paths or addresses unreadable",
            ),
            reason(
                self.forks_not_followed,
                "forks missed",
                "forks not followed (traced-process map full)",
            ),
            reason(
                self.selected_not_traced,
                "not adopted",
                "selected processes not traced (traced-process map full)",
            ),
            reason(
                self.python_frames_missing,
                "no py frames",
                "creations in CPython without Python frames",
            ),
            reason(
                self.mapping_reports,
                "maps lost",
                "mapping reports lost (frames may be unresolved)",
            ),
            reason(
                self.unanswered_unknown,
                "closes unknown",
                "connections closed at the limit not told answered or not (socket reused)",
            ),
        ]
        .into_iter()
        .filter(|r| r.count > 0)
    }

    /// The non-zero shortfalls in words ("3 stacks unreadable (no frames)").
    pub fn described(&self) -> Vec<String> {
        self.shortfalls()
            .map(|r| format!("{} {}", r.count, r.long))
            .collect()
    }

    /// Each total at least as large as in `other`: totals only grow, so the larger is the
    /// later one even when two snapshots arrive out of order.
    #[must_use]
    pub fn max(self, other: Self) -> Self {
        Self {
            ring_full: self.ring_full.max(other.ring_full),
            undecodable: self.undecodable.max(other.undecodable),
            stacks_unreadable: self.stacks_unreadable.max(other.stacks_unreadable),
            stacks_skipped: self.stacks_skipped.max(other.stacks_skipped),
            paths_unreadable: self.paths_unreadable.max(other.paths_unreadable),
            forks_not_followed: self.forks_not_followed.max(other.forks_not_followed),
            selected_not_traced: self.selected_not_traced.max(other.selected_not_traced),
            python_frames_missing: self.python_frames_missing.max(other.python_frames_missing),
            mapping_reports: self.mapping_reports.max(other.mapping_reports),
            unanswered_unknown: self.unanswered_unknown.max(other.unanswered_unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nonzero_shortfalls_are_described_and_the_ring_is_not_one() {
        let l = Losses {
            ring_full: 9,
            stacks_unreadable: 3,
            mapping_reports: 1,
            ..Losses::default()
        };
        assert_eq!(
            l.described(),
            [
                "3 stacks unreadable (no frames)",
                "1 mapping reports lost (frames may be unresolved)"
            ]
        );
        assert_eq!(l.events(), 9);
        assert!(Losses::default().described().is_empty());
    }

    /// A format-7 recording's `Losses` (nine fields, no `stacks_skipped`) followed by the next
    /// value: the older layout reads back with 0 stacks skipped and leaves the next value
    /// intact.
    #[test]
    fn losses_of_recordings_before_format_8_read_without_stacks_skipped() {
        // Postcard writes a struct as its fields in order: the same bytes as a tuple.
        let old: [u64; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        let bytes = postcard::to_stdvec(&(old, 4242u32)).unwrap();
        let (read, next): (Losses, u32) =
            reading_before_stacks_skipped(|| postcard::from_bytes(&bytes)).unwrap();
        assert_eq!(next, 4242);
        assert_eq!(
            read,
            Losses {
                ring_full: 1,
                undecodable: 2,
                stacks_unreadable: 3,
                stacks_skipped: 0,
                paths_unreadable: 4,
                forks_not_followed: 5,
                selected_not_traced: 6,
                python_frames_missing: 7,
                mapping_reports: 8,
                unanswered_unknown: 9,
            }
        );
        // Today's layout, read as today's.
        let now = Losses {
            stacks_skipped: 11,
            ..read
        };
        let bytes = postcard::to_stdvec(&(now, 4242u32)).unwrap();
        assert_eq!(postcard::from_bytes(&bytes), Ok((now, 4242u32)));
        // A JSON report from before the field reads it as 0.
        let mut json = serde_json::to_value(now).unwrap();
        json.as_object_mut().unwrap().remove("stacks_skipped");
        let json: Losses = serde_json::from_value(json).unwrap();
        assert_eq!(json.stacks_skipped, 0);
    }

    #[test]
    fn the_later_totals_win_whatever_the_order() {
        let early = Losses {
            ring_full: 5,
            undecodable: 2,
            ..Losses::default()
        };
        let late = Losses {
            ring_full: 7,
            stacks_unreadable: 1,
            ..Losses::default()
        };
        let both = Losses {
            ring_full: 7,
            undecodable: 2,
            stacks_unreadable: 1,
            ..Losses::default()
        };
        assert_eq!(early.max(late), both);
        assert_eq!(late.max(early), both);
    }
}
