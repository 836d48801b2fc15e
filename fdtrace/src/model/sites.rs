//! Call sites: the slab that holds them, the lifetime sketch and the growth samples each keeps.
//!
//! Sites come and go with processes: a shell that runs a million short commands makes a few
//! sites for each (the descriptors it inherits, the loader's opens) and they must not outlive
//! the process, or fdtrace grows by the child. So sites live in a slab whose freed slots are
//! reused, and what a site keeps costs nothing until it is needed: no lifetime buckets until a
//! descriptor closes, no growth samples until one is open at a tick.

use std::{collections::VecDeque, ops::Index};

use arcstr::ArcStr;

use super::{FdKind, Origin, Pid, SiteId, StackId};

const MAX_TARGETS: usize = 5;
/// Growth is fitted over this many one-second samples.
pub(super) const GROWTH_WINDOW: usize = 30;

/// Descriptors of one process created by one stack.
#[derive(Clone, Debug)]
pub struct CallSite {
    pub pid: Pid,
    pub stack: StackId,
    pub kind: FdKind,
    pub origin: Origin,
    pub open: u64,
    pub opened: u64,
    pub closed: u64,
    /// Lifetimes of closed descriptors, from the first one.
    lifetimes: Option<Box<Lifetimes>>,
    /// A few distinct recent targets, oldest first, for display; descriptors share these.
    targets: Vec<ArcStr>,
    /// Open descriptors at each of the model's recent ticks, from when one was first open.
    samples: Option<Box<Samples>>,
    /// Its process exited: it is kept only while descriptors or reports still refer to it.
    pub(super) gone: bool,
    /// An incident's blame names it.
    pub(super) pinned: bool,
    /// Descriptors of exited processes' snapshots that refer to it.
    pub(super) held: u32,
}

// Every process has a few: a shell's child has one per descriptor it inherits.
const _: () = assert!(size_of::<CallSite>() <= 80);

impl CallSite {
    pub(super) fn new(pid: Pid, stack: StackId, kind: FdKind, origin: Origin) -> Self {
        Self {
            pid,
            stack,
            kind,
            origin,
            open: 0,
            opened: 0,
            closed: 0,
            lifetimes: None,
            targets: Vec::new(),
            samples: None,
            gone: false,
            held: 0,
            pinned: false,
        }
    }

    /// Remembers `target` among the recent ones and returns the site's copy of it: the
    /// descriptors of a site mostly name the same few things (a leak of one file a million
    /// times), and sharing the string saves a heap block per descriptor.
    pub(super) fn note_target(&mut self, target: &str) -> ArcStr {
        if let Some(known) = self.targets.iter().find(|t| t.as_str() == target) {
            return known.clone();
        }
        if self.targets.len() == MAX_TARGETS {
            self.targets.remove(0);
        }
        let target = ArcStr::from(target);
        self.targets.push(target.clone());
        target
    }

    /// A few distinct targets of its recent descriptors, oldest first.
    pub fn targets(&self) -> &[ArcStr] {
        &self.targets
    }

    pub(super) fn record_lifetime(&mut self, micros: u64) {
        if !self.gone {
            self.lifetimes.get_or_insert_default().record(micros);
        }
    }

    /// `n` descriptors created and closed in the kernel, each about `micros` long.
    pub(super) fn record_pairs(&mut self, n: u32, micros: u64) {
        if !self.gone && n > 0 {
            self.lifetimes.get_or_insert_default().record_n(micros, n);
        }
    }

    /// Lifetime percentile of closed descriptors in milliseconds.
    pub fn lifetime_ms(&self, quantile: f64) -> Option<f64> {
        self.lifetimes
            .as_ref()?
            .quantile(quantile)
            .map(|micros| micros as f64 / 1000.0)
    }

    /// Takes this tick's sample, if the site has had something open since sampling began.
    pub(super) fn sample(&mut self) {
        if self.gone || (self.open == 0 && self.samples.is_none()) {
            return;
        }
        let open = u32::try_from(self.open).unwrap_or(u32::MAX);
        self.samples.get_or_insert_with(Box::default).push(open);
    }

    /// (tick time, open) pairs: the samples are the last ones of `ticks`, taken at each.
    pub(super) fn samples<'a>(
        &'a self,
        ticks: &'a VecDeque<u64>,
    ) -> impl Iterator<Item = (u64, u64)> + Clone + 'a {
        let samples = self.samples.as_deref();
        let len = samples.map_or(0, |s| usize::from(s.len));
        let skip = ticks.len().saturating_sub(len);
        ticks
            .iter()
            .skip(skip)
            .zip(samples.into_iter().flat_map(Samples::iter))
            .map(|(&ts, open)| (ts, u64::from(open)))
    }

    /// The process exited: what only views of live processes need goes.
    pub(super) fn retire_with_process(&mut self) {
        self.gone = true;
        self.samples = None;
        self.lifetimes = None;
        self.targets = Vec::new();
    }

    /// Its process exited.
    pub fn gone(&self) -> bool {
        self.gone
    }

    pub(super) fn unreferenced(&self) -> bool {
        self.gone && self.open == 0 && self.held == 0 && !self.pinned
    }
}

/// The last [`GROWTH_WINDOW`] samples, oldest first: a fixed ring rather than a deque of
/// `(time, value)` pairs, since every site is sampled at the same ticks (the model keeps
/// their times once) and 100k sites with 30 pairs each were 48 MB.
#[derive(Clone, Debug, Default)]
struct Samples {
    values: [u32; GROWTH_WINDOW],
    start: u8,
    len: u8,
}

impl Samples {
    fn push(&mut self, value: u32) {
        let (start, len) = (usize::from(self.start), usize::from(self.len));
        if len < GROWTH_WINDOW {
            self.values[(start + len) % GROWTH_WINDOW] = value;
            self.len += 1;
        } else {
            self.values[start] = value;
            self.start = u8::try_from((start + 1) % GROWTH_WINDOW).unwrap_or(0);
        }
    }

    fn iter(&self) -> impl Iterator<Item = u32> + Clone + '_ {
        (0..usize::from(self.len))
            .map(|i| self.values[(usize::from(self.start) + i) % GROWTH_WINDOW])
    }
}

/// Microseconds below which each value has its own bucket.
const EXACT_BELOW: u64 = 128;
/// Buckets per doubling above that: a bucket spans at most 1/64 of its values (1.6%).
const SUB_BUCKETS: u64 = 64;
/// Longer lifetimes count as a day.
const MAX_LIFETIME_US: u64 = 86_400_000_000;

/// Lifetimes in microseconds as counts in log-linear buckets (HdrHistogram's layout at two
/// significant digits), sparse: only buckets that counted something take memory, 8 bytes
/// each, where a dense HdrHistogram over 1 us..1 day took 31 KiB for every site.
#[derive(Clone, Debug, Default)]
struct Lifetimes {
    /// (bucket, count), ascending by bucket.
    buckets: Vec<(u16, u32)>,
    total: u64,
}

fn bucket_of(micros: u64) -> u16 {
    let v = micros.clamp(1, MAX_LIFETIME_US);
    let index = if v < EXACT_BELOW {
        v
    } else {
        let octave = u64::from(v.ilog2());
        let shift = octave - 6;
        SUB_BUCKETS * (octave - 6) + (v >> shift)
    };
    u16::try_from(index).expect("a day of microseconds is under 2048 buckets")
}

/// The middle of a bucket's values.
fn bucket_value(bucket: u16) -> u64 {
    let index = u64::from(bucket);
    if index < EXACT_BELOW {
        return index;
    }
    let shift = index / SUB_BUCKETS - 1;
    let mantissa = index - SUB_BUCKETS * shift;
    let low = mantissa << shift;
    low + ((1 << shift) >> 1)
}

impl Lifetimes {
    fn record(&mut self, micros: u64) {
        self.record_n(micros, 1);
    }

    fn record_n(&mut self, micros: u64, n: u32) {
        let bucket = bucket_of(micros);
        let i = match self.buckets.binary_search_by_key(&bucket, |&(b, _)| b) {
            Ok(i) => i,
            Err(i) => {
                self.buckets.insert(i, (bucket, 0));
                i
            }
        };
        while self.buckets[i].1.checked_add(n).is_none() {
            // Four billion closes at one site: halve every count, which keeps the quantiles.
            for (_, count) in &mut self.buckets {
                *count = count.div_ceil(2);
            }
            self.total = self.buckets.iter().map(|&(_, c)| u64::from(c)).sum();
        }
        self.buckets[i].1 += n;
        self.total += u64::from(n);
    }

    fn quantile(&self, quantile: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((quantile.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(bucket, count) in &self.buckets {
            seen += u64::from(count);
            if seen >= rank {
                return Some(bucket_value(bucket));
            }
        }
        self.buckets.last().map(|&(b, _)| bucket_value(b))
    }
}

/// The call sites, by [`SiteId`]. Ids of freed sites are given to new ones, so an id is only
/// meaningful while something refers to its site (a descriptor, a snapshot, an incident).
#[derive(Debug, Default)]
pub struct Sites {
    slots: Vec<Option<CallSite>>,
    free: Vec<SiteId>,
    live: usize,
}

impl Sites {
    pub fn get(&self, id: SiteId) -> Option<&CallSite> {
        self.slots.get(id)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, id: SiteId) -> Option<&mut CallSite> {
        self.slots.get_mut(id)?.as_mut()
    }

    /// The sites there are, with their ids.
    pub fn iter(&self) -> impl Iterator<Item = (SiteId, &CallSite)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(id, s)| Some((id, s.as_ref()?)))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut CallSite> {
        self.slots.iter_mut().flatten()
    }

    /// How many sites there are.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub(super) fn insert(&mut self, site: CallSite) -> SiteId {
        self.live += 1;
        if let Some(id) = self.free.pop() {
            self.slots[id] = Some(site);
            return id;
        }
        self.slots.push(Some(site));
        self.slots.len() - 1
    }

    /// Frees a site nothing refers to any more.
    pub(super) fn free_if_unreferenced(&mut self, id: SiteId) -> bool {
        let Some(slot) = self.slots.get_mut(id) else {
            return false;
        };
        if !slot.as_ref().is_some_and(CallSite::unreferenced) {
            return false;
        }
        *slot = None;
        self.free.push(id);
        self.live -= 1;
        true
    }
}

impl Index<SiteId> for Sites {
    type Output = CallSite;

    fn index(&self, id: SiteId) -> &CallSite {
        self.get(id)
            .unwrap_or_else(|| panic!("call site {id} was freed: nothing may refer to it"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetime_buckets_are_contiguous_and_within_two_percent() {
        let mut last = bucket_of(1);
        for v in 2..200_000u64 {
            let b = bucket_of(v);
            assert!(b == last || b == last + 1, "{v}: {last} -> {b}");
            last = b;
            let mid = bucket_value(b);
            let error = mid.abs_diff(v) as f64 / v as f64;
            assert!(error <= 0.016, "{v} reads back as {mid}");
        }
        assert!(bucket_of(u64::MAX) < 2048);
        assert_eq!(bucket_of(0), bucket_of(1));
    }

    #[test]
    fn quantiles_come_from_the_counts() {
        let mut l = Lifetimes::default();
        assert_eq!(l.quantile(0.5), None);
        for v in 1..=100 {
            l.record(v * 1000);
        }
        let p50 = l.quantile(0.5).unwrap();
        let p99 = l.quantile(0.99).unwrap();
        assert!(p50.abs_diff(50_000) <= 800, "{p50}");
        assert!(p99.abs_diff(99_000) <= 1_600, "{p99}");
        assert!(l.buckets.len() <= 100);
    }

    #[test]
    fn counts_halve_instead_of_overflowing() {
        let mut l = Lifetimes {
            buckets: vec![(bucket_of(10), u32::MAX), (bucket_of(1000), 3)],
            total: u64::from(u32::MAX) + 3,
        };
        l.record(10);
        assert_eq!(l.buckets[0].1, u32::MAX / 2 + 2);
        assert_eq!(l.quantile(0.5), Some(10));
    }

    #[test]
    fn the_ring_keeps_the_last_samples_in_order() {
        let mut s = Samples::default();
        for v in 0..45 {
            s.push(v);
        }
        let got: Vec<u32> = s.iter().collect();
        assert_eq!(got, (15..45).collect::<Vec<_>>());
    }

    #[test]
    fn freed_ids_are_reused() {
        let mut sites = Sites::default();
        let a = sites.insert(CallSite::new(1, 0, FdKind::File, Origin::Traced));
        let b = sites.insert(CallSite::new(1, 0, FdKind::Pipe, Origin::Traced));
        assert!(!sites.free_if_unreferenced(a), "its process is alive");
        sites.get_mut(a).unwrap().gone = true;
        assert!(sites.free_if_unreferenced(a));
        assert_eq!(sites.len(), 1);
        assert!(sites.get(a).is_none());
        let c = sites.insert(CallSite::new(2, 0, FdKind::File, Origin::Traced));
        assert_eq!(c, a);
        assert_eq!(sites.iter().map(|(id, _)| id).collect::<Vec<_>>(), [a, b]);
    }
}
