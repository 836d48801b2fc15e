//! Headroom (`--warn-at PERCENT`): which processes have crossed a share of their descriptor limit.
//!
//! The usual advice for the 502-behind-nginx incident (a middleware answering 503 near the
//! limit, a psutil check of the descriptor count) is a threshold below RLIMIT_NOFILE; this is
//! the same check made from outside the process. Pure functions over the [`Model`]: no I/O.
//!
//! [`crossed`] answers from the model alone (each process's peak, so a crossing between two
//! looks is never missed). [`Watch`] also remembers when each process first crossed, from the
//! events each pump delivered.

use std::collections::BTreeMap;

use crate::model::{Event, Model, Pid};

/// A process whose open descriptors reached `threshold` (`percent` of its soft limit).
#[derive(Clone, Debug, PartialEq)]
pub struct Crossing {
    pub pid: Pid,
    pub comm: String,
    /// The soft RLIMIT_NOFILE.
    pub limit: u64,
    /// Open descriptors at which the warning fires: `ceil(limit * percent / 100)`.
    pub threshold: u64,
    /// The most descriptors the process held while traced.
    pub peak_open: u64,
    /// What it holds now (at exit for a process that exited).
    pub open_now: u64,
    /// When it first held `threshold` (CLOCK_MONOTONIC ns), when a [`Watch`] saw it happen.
    pub first_ns: Option<u64>,
}

impl Crossing {
    /// "pid 81 (nginx) holds 820 descriptors, 80% of its limit 1024 (--warn-at 80%)".
    pub fn describe(&self, percent: f64) -> String {
        format!(
            "pid {} ({}) holds {} descriptors, {:.0}% of its limit {} (--warn-at {percent}%)",
            self.pid,
            self.comm,
            self.open_now,
            self.open_now as f64 * 100.0 / self.limit as f64,
            self.limit
        )
    }

    /// The peak as a share of the limit, in percent.
    pub fn peak_percent(&self) -> f64 {
        self.peak_open as f64 * 100.0 / self.limit as f64
    }
}

/// The descriptor count at which `percent` of `limit` is reached; `None` for an unlimited (or
/// unknown, 0) limit.
pub fn threshold(limit: u64, percent: f64) -> Option<u64> {
    if limit == 0 || limit == u64::MAX || !percent.is_finite() || percent <= 0.0 {
        return None;
    }
    // At least one descriptor: 0.1% of 64 still means "any descriptor at all" rather than never.
    Some(((limit as f64 * percent / 100.0).ceil() as u64).max(1))
}

/// Every process (alive or exited) whose peak reached `percent` of its soft limit, by pid.
/// `first_ns` is `None`: the model keeps no history; use a [`Watch`] for the time.
pub fn crossed(model: &Model, percent: f64) -> Vec<Crossing> {
    model
        .processes
        .values()
        .filter_map(|p| {
            let threshold = threshold(p.info.limit.soft, percent)?;
            (p.peak_open >= threshold).then(|| Crossing {
                pid: p.pid,
                comm: p.info.comm.clone(),
                limit: p.info.limit.soft,
                threshold,
                peak_open: p.peak_open,
                open_now: model.open_count(p.pid),
                first_ns: None,
            })
        })
        .collect()
}

/// Remembers when each process first crossed the threshold. Call [`Watch::observe`] after each
/// pump with the events it returned (already applied to the model).
#[derive(Clone, Debug)]
pub struct Watch {
    percent: f64,
    /// Each process's peak at the previous observation.
    peaks: BTreeMap<Pid, u64>,
    /// First crossing times.
    first: BTreeMap<Pid, u64>,
}

impl Watch {
    pub fn new(percent: f64) -> Self {
        Self {
            percent,
            peaks: BTreeMap::new(),
            first: BTreeMap::new(),
        }
    }

    pub fn percent(&self) -> f64 {
        self.percent
    }

    /// Notes the processes that crossed during `events` and returns them (each once, ever).
    ///
    /// The time is that of the event whose creations brought the count from the previous peak
    /// to the threshold: exact when the process closed nothing in between, otherwise the
    /// earliest moment the crossing can have happened. A process found over the threshold
    /// without such an event (seeded at attach, inherited at fork) gets the time of its latest
    /// event in `events`, or the model's latest time.
    pub fn observe(&mut self, model: &Model, events: &[Event]) -> Vec<Crossing> {
        let mut new = Vec::new();
        for mut crossing in crossed(model, self.percent) {
            if self.first.contains_key(&crossing.pid) {
                continue;
            }
            let before = self.peaks.get(&crossing.pid).copied().unwrap_or(0);
            let ts = crossing_time(events, crossing.pid, before, crossing.threshold)
                .or_else(|| last_time(events, crossing.pid))
                .unwrap_or(model.last_ns);
            self.first.insert(crossing.pid, ts);
            crossing.first_ns = Some(ts);
            new.push(crossing);
        }
        for p in model.processes.values() {
            self.peaks.insert(p.pid, p.peak_open);
        }
        new
    }

    /// Every crossing so far, with its first time.
    pub fn crossings(&self, model: &Model) -> Vec<Crossing> {
        crossed(model, self.percent)
            .into_iter()
            .map(|mut c| {
                c.first_ns = self.first.get(&c.pid).copied();
                c
            })
            .collect()
    }
}

/// The time of the creation in `events` that brings `pid` from `before` to `threshold`
/// descriptors, counting creations only.
fn crossing_time(events: &[Event], pid: Pid, before: u64, threshold: u64) -> Option<u64> {
    let mut count = before;
    for event in events {
        let (created, ts) = match event {
            Event::Opened {
                pid: p, ts, fds, ..
            } if *p == pid => (fds.len() as u64, *ts),
            Event::Duplicated { pid: p, ts, .. } | Event::Fetched { pid: p, ts, .. }
                if *p == pid =>
            {
                (1, *ts)
            }
            _ => continue,
        };
        count += created;
        if count >= threshold {
            return Some(ts);
        }
    }
    None
}

/// The time of the latest event in `events` about `pid`.
fn last_time(events: &[Event], pid: Pid) -> Option<u64> {
    events.iter().rev().find_map(|e| match e {
        Event::Attached { pid: p, ts, .. }
        | Event::Opened { pid: p, ts, .. }
        | Event::Duplicated { pid: p, ts, .. }
        | Event::Fetched { pid: p, ts, .. }
        | Event::Reconciled { pid: p, ts, .. }
        | Event::Exec { pid: p, ts, .. }
        | Event::Forked { child: p, ts, .. }
            if *p == pid =>
        {
            Some(*ts)
        }
        _ => None,
    })
}

/// Parses `--warn-at`: a percentage above 0 and at most 100 (a trailing `%` is accepted).
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if value > 0.0 && value <= 100.0 {
        Ok(value)
    } else {
        Err(format!("{value} is not a percentage in (0, 100]"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{FdKind, Limit, NewFd, ProcessInfo};

    const MS: u64 = 1_000_000;

    fn file(n: i32) -> NewFd {
        NewFd {
            fd: n,
            kind: FdKind::File,
            target: Arc::from("/etc/hostname"),
            cloexec: false,
        }
    }

    fn attached(pid: Pid, limit: u64, fds: i32) -> Event {
        Event::Attached {
            pid,
            ts: MS,
            info: ProcessInfo {
                ppid: 1,
                comm: "app".into(),
                exe: "/app".into(),
                limit: Limit {
                    soft: limit,
                    hard: limit,
                },
                ..ProcessInfo::default()
            },
            fds: (0..fds).map(file).collect(),
        }
    }

    fn opened(pid: Pid, ts: u64, n: i32) -> Event {
        Event::Opened {
            pid,
            tid: pid,
            ts,
            syscall: 257,
            fds: vec![file(n)],
            stack: 1,
        }
    }

    fn closed(pid: Pid, ts: u64, n: i32) -> Event {
        Event::Closed {
            pid,
            ts,
            fd: n,
            reopened: false,
        }
    }

    /// Applies `events` to `model` and lets `watch` look at them, as a pump does.
    fn pump(model: &mut Model, watch: &mut Watch, events: &[Event]) -> Vec<Crossing> {
        for e in events {
            model.apply(e);
        }
        watch.observe(model, events)
    }

    #[test]
    fn thresholds_round_up_and_skip_unlimited() {
        assert_eq!(threshold(64, 80.0), Some(52)); // 51.2
        assert_eq!(threshold(100, 50.0), Some(50));
        assert_eq!(threshold(1024, 100.0), Some(1024));
        assert_eq!(threshold(64, 0.1), Some(1));
        assert_eq!(threshold(u64::MAX, 80.0), None);
        assert_eq!(threshold(0, 80.0), None);
        assert_eq!(threshold(64, 0.0), None);
    }

    #[test]
    fn parses_percentages() {
        assert_eq!(parse_percent("80"), Ok(80.0));
        assert_eq!(parse_percent("92.5%"), Ok(92.5));
        assert!(parse_percent("0").is_err());
        assert!(parse_percent("101").is_err());
        assert!(parse_percent("most").is_err());
    }

    #[test]
    fn a_leak_crosses_at_the_open_that_reaches_the_threshold() {
        let (mut model, mut watch) = (Model::new(), Watch::new(50.0));
        // 3 open of 10: under 50%.
        assert!(pump(&mut model, &mut watch, &[attached(7, 10, 3)]).is_empty());
        let events: Vec<Event> = (3..8)
            .map(|n| opened(7, u64::from(n as u32) * MS, n))
            .collect();
        let new = pump(&mut model, &mut watch, &events);
        assert_eq!(new.len(), 1);
        let c = &new[0];
        // The 5th descriptor (fd 4, opened at 4 ms) is the one that reaches 5 = 50% of 10.
        assert_eq!(
            (c.pid, c.threshold, c.peak_open, c.open_now, c.first_ns),
            (7, 5, 8, 8, Some(4 * MS))
        );
        assert!((c.peak_percent() - 80.0).abs() < 1e-9);
        // Reported once; still listed with its time afterwards.
        assert!(pump(&mut model, &mut watch, &[opened(7, 9 * MS, 8)]).is_empty());
        assert_eq!(watch.crossings(&model)[0].first_ns, Some(4 * MS));
    }

    #[test]
    fn a_brief_crossing_between_two_looks_is_not_missed() {
        let (mut model, mut watch) = (Model::new(), Watch::new(80.0));
        pump(&mut model, &mut watch, &[attached(7, 10, 3)]);
        let mut events = Vec::new();
        for n in 3..8 {
            events.push(opened(7, u64::from(n as u32) * MS, n));
        }
        for n in 3..8 {
            events.push(closed(7, 10 * MS + u64::from(n as u32), n));
        }
        let new = pump(&mut model, &mut watch, &events);
        // Peaked at 8 of 10 (threshold 8) at the 5th open, then back to 3.
        assert_eq!(new.len(), 1);
        assert_eq!(
            (new[0].peak_open, new[0].open_now, new[0].first_ns),
            (8, 3, Some(7 * MS))
        );
        assert_eq!(crossed(&model, 80.0).len(), 1);
        assert!(crossed(&model, 81.0).is_empty());
    }

    #[test]
    fn over_the_threshold_at_attach_counts_from_the_attach() {
        let (mut model, mut watch) = (Model::new(), Watch::new(50.0));
        let new = pump(&mut model, &mut watch, &[attached(9, 4, 3)]);
        assert_eq!(new.len(), 1);
        assert_eq!((new[0].pid, new[0].first_ns), (9, Some(MS)));
    }

    #[test]
    fn processes_are_judged_against_their_own_limits() {
        let mut model = Model::new();
        for e in [
            attached(1, 10, 6),
            attached(2, 100, 6),
            attached(3, u64::MAX, 6),
        ] {
            model.apply(&e);
        }
        let pids: Vec<Pid> = crossed(&model, 50.0).iter().map(|c| c.pid).collect();
        assert_eq!(pids, vec![1]);
    }
}
