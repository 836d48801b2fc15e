//! A live tracing session: probes → reader thread → tracer → model, with the periodic work
//! (ticks, loss accounting, reconciliation with /proc) that keeps the model true.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, Receiver},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::BytesMut;
use fdtrace_common::kind;

use crate::{
    clock::{WallClock, monotonic_ns},
    decode::{self, Record},
    kept,
    listeners::ListenerWatch,
    losses::Losses,
    mmap_events::{MapEvent, MmapWatcher},
    model::{Event, Model, Pid},
    probe::{ProbeOptions, Probes, PythonRegistrar, RingReader},
    procfs, python,
    report::Report,
    select::{self, Selection},
    stack::StackMemo,
    tracer::Tracer,
};

/// How often /proc is compared with the tables; a difference is corrected when two consecutive
/// comparisons agree on it.
const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// How often processes that match the selection without having executed a program since
/// tracing began (moved into a selected cgroup, renamed with prctl) are looked for. The exec
/// probe takes in every other one at once.
const RESCAN_EVERY: Duration = Duration::from_secs(2);
/// How often kept descriptors past their age and the kernel's pairs are taken.
const KEPT_EVERY: Duration = Duration::from_millis(250);
/// Bound of [`Session::unreadable`].
const UNREADABLE_MAX: usize = 4096;
/// When the traced processes hold more than this together, they are reconciled less often:
/// listing /proc/PID/fd costs about 1 us per descriptor.
const LARGE_TABLE: u64 = 100_000;
/// Decoded records share memory allocated this much at a time.
const ARENA_CHUNK: usize = 256 << 10;
/// Records the reader decodes into one batch.
const BATCH_RECORDS: usize = 4096;
/// Decoded records waiting for the tracer, in bytes. Past this the reader leaves records in
/// the ring, and when a burst outlasts the ring too the kernel counts what it could not store:
/// fdtrace's memory stays bounded and the loss is reported and reconciled, where an unbounded
/// queue grew by hundreds of MB during a burst from fifty processes (and glibc kept the pages).
/// It holds the first burst while the tracer symbolizes its first stacks, before the stack
/// memo can spare the reader the copies (100k records of a tight loop, 67 MB, in a debug build).
const QUEUED_BYTES_MAX: usize = 128 << 20;

pub struct Session {
    probes: Probes,
    pub tracer: Tracer,
    pub model: Model,
    pub clock: WallClock,
    records: Receiver<Batch>,
    shared: Arc<Shared>,
    records_since_trim: usize,
    reader: Option<JoinHandle<()>>,
    lost_seen: u64,
    last_tick: Instant,
    last_reconcile: Instant,
    reconciles: u64,
    /// Called with every event the model consumed (the recorder hooks in here).
    observer: Option<Observer>,
    /// Shared with the mapping thread, which drains it as reports come; the session also
    /// drains it after taking records (see `pump`).
    mappings: Arc<Mutex<MmapWatcher>>,
    /// /proc listings waiting until every record written before them has been consumed: a
    /// listing is compared with the model as of its own time, not with a model that lags
    /// behind the ring.
    listings: Vec<Item>,
    map_reports: Receiver<MapEvent>,
    map_thread: Option<JoinHandle<()>>,
    map_events: Vec<MapEvent>,
    /// The `--comm`/`--cgroup`/`--container` selection, when there is one: rescanned for.
    selection: Option<Selection>,
    last_rescan: Instant,
    /// Processes named by records that could not be read from /proc (gone already): not
    /// tried again for each of their records. Forgotten at their exit record.
    unreadable: HashSet<Pid>,
    /// The traced processes' listen queues, sampled on the tick (live views only: not in the
    /// model, so not in recordings).
    pub listeners: ListenerWatch,
    /// When the kernel's kept descriptors and pairs were last taken (see `crate::kept`).
    last_kept: Instant,
    /// `drained_until` as the last pump read it: every record written before it is applied.
    applied_until: u64,
}

type Observer = Box<dyn FnMut(&Event)>;

/// What the session and its ring reader thread share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    decode_errors: AtomicU64,
    /// Bytes of decoded records sent and not yet taken.
    queued_bytes: AtomicUsize,
    /// A monotonic time before which every record written to the ring has been sent to the
    /// session: the start of the last drain that emptied the ring.
    drained_until: AtomicU64,
}

/// Decoded records and what they cost in memory.
struct Batch {
    records: Vec<Record>,
    bytes: usize,
}

/// A record or a mapping report, merged in time order.
enum Item {
    Record(Record),
    Map(MapEvent),
    /// A /proc listing of a process's descriptors, taken at `ts`.
    Listing {
        pid: Pid,
        ts: u64,
        fds: Vec<crate::model::NewFd>,
    },
    /// A process the model thinks alive was gone from /proc at `ts`: once every record
    /// written before then is consumed and its exit was not among them, the exit record was
    /// lost (a full ring), and the process ends here.
    Gone {
        pid: Pid,
        ts: u64,
    },
}

impl Session {
    /// Loads and attaches the probes and starts draining them.
    pub fn start(options: ProbeOptions) -> anyhow::Result<Self> {
        let mut probes = Probes::load(options)?;
        let mut reader = probes.reader()?;
        let (tx, records) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let tracer = Tracer::new();
        let (shared_r, memo) = (shared.clone(), tracer.memo.clone());
        let reader = std::thread::Builder::new()
            .name("fdtrace-ring".into())
            .spawn(move || read_ring(&mut reader, &tx, &shared_r, &memo))
            .context("starting the ring buffer reader")?;
        let mappings = Arc::new(Mutex::new(MmapWatcher::new()));
        let (map_tx, map_reports) = mpsc::channel();
        let (registrar, shared_m, mappings_m) =
            (probes.python_registrar(), shared.clone(), mappings.clone());
        let map_thread = std::thread::Builder::new()
            .name("fdtrace-maps".into())
            .spawn(move || follow_mappings(&mappings_m, registrar, &map_tx, &shared_m))
            .context("starting the mapping report reader")?;
        Ok(Self {
            probes,
            tracer,
            model: Model::new(),
            clock: WallClock::measure(),
            records,
            shared,
            records_since_trim: 0,
            reader: Some(reader),
            lost_seen: 0,
            last_tick: Instant::now(),
            last_reconcile: Instant::now(),
            reconciles: 0,
            observer: None,
            mappings,
            listings: Vec::new(),
            map_reports,
            map_thread: Some(map_thread),
            map_events: Vec::new(),
            selection: None,
            last_rescan: Instant::now(),
            unreadable: HashSet::new(),
            listeners: ListenerWatch::default(),
            last_kept: Instant::now(),
            applied_until: 0,
        })
    }

    pub fn set_observer(&mut self, observer: Observer) {
        self.observer = Some(observer);
    }

    /// Starts tracing an existing process (and, in the kernel, every child it forks from now).
    pub fn add(&mut self, pid: Pid) -> anyhow::Result<()> {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            anyhow::bail!("no process with pid {pid}");
        }
        self.probes.trace(pid, procfs::main_stack(pid))?;
        let event = self
            .tracer
            .attach(pid, monotonic_ns())
            .with_context(|| format!("reading /proc/{pid} (did it exit?)"))?;
        self.sync_python();
        self.apply(&event);
        Ok(())
    }

    /// Traces the processes `selection` picks by comm and cgroup: from now on the exec probe
    /// adopts each that starts matching (the session must have been started with
    /// [`Selection::probe_bits`] in its options), and those that match already are added
    /// with their descendants, like `--pid` ones. Returns those.
    pub fn select(&mut self, selection: &Selection) -> anyhow::Result<Vec<Pid>> {
        if !selection.selects_later() {
            return Ok(Vec::new());
        }
        // The maps first, then the scan: a process that executes in between is adopted by
        // the probe, one that did before is found by the scan, and neither is missed.
        for comm in &selection.comms {
            self.probes
                .select_comm(comm.key())
                .context("selecting processes by comm")?;
        }
        for cgroup in &selection.cgroups {
            self.probes
                .select_cgroup(cgroup.id)
                .context("selecting processes by cgroup")?;
        }
        self.selection = Some(selection.clone());
        self.last_rescan = Instant::now();
        let added = self.add_matching();
        log::info!(
            "selecting {}: {} process(es) match now, {added:?}",
            selection.describe_later(),
            added.len()
        );
        Ok(added)
    }

    /// Adds the processes matching the selection that are not traced yet, with their
    /// descendants. Those the kernel traces already (adopted at exec, or forked by a traced
    /// parent) are left to their records, which arrive in order.
    fn add_matching(&mut self) -> Vec<Pid> {
        let Some(selection) = &self.selection else {
            return Vec::new();
        };
        let mut added = Vec::new();
        for pid in selection.matching_now(std::process::id()) {
            if self.knows(pid) || self.probes.is_traced(pid) {
                continue;
            }
            // It may have exited since the scan.
            if self.add(pid).is_ok() {
                added.push(pid);
                self.add_descendants(pid);
            }
        }
        added
    }

    /// Whether the model has `pid` as a live process.
    fn knows(&self, pid: Pid) -> bool {
        self.model
            .processes
            .get(&pid)
            .is_some_and(crate::model::Process::alive)
    }

    /// Starts tracing a process the records name but the model does not know: one the exec
    /// probe adopted (its exec record comes first), or one whose first records were lost (a
    /// fork record, to a full ring). It is read from /proc as [`Session::add`] reads one, so
    /// that its identity, limit and table are right; stamped with the record's time, so its
    /// later records apply after. Returns whether it was attached.
    ///
    /// A creation between the record and the /proc listing is listed as inherited and then
    /// replaced by its own record (the model puts a creation over what held its number): it is
    /// open once, at its own call site, and the inherited entry it replaced counts as one
    /// close of the inherited site. Closes in between find nothing to close.
    fn attach_unknown(&mut self, pid: Pid, ts: u64, out: &mut Vec<Event>) -> bool {
        if self.unreadable.contains(&pid) {
            return false;
        }
        // When the process has exited and its pid gone to another since, the records are not
        // about that one.
        let event = if select::started_after(pid, ts) {
            None
        } else {
            self.tracer.attach(pid, ts).ok()
        };
        let Some(event) = event else {
            if self.unreadable.len() >= UNREADABLE_MAX {
                self.unreadable.clear();
            }
            self.unreadable.insert(pid);
            return false;
        };
        // The probe's stack clamp follows the new program's stack, as after a traced exec.
        self.probes.retrace_exec(pid, procfs::main_stack(pid));
        self.sync_python();
        log::debug!("attached {pid}, first seen in a record");
        self.apply(&event);
        out.push(event);
        true
    }

    /// Has the kernel report the mappings of `pid` and its descendants as they are made, for
    /// a process started by fdtrace and held before exec (it may exit before /proc can be read).
    pub fn watch_mappings(&mut self, pid: Pid) -> anyhow::Result<()> {
        self.mappings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .watch(pid)
            .context("opening perf mapping reports (perf_event_open)")
    }

    /// Also traces the processes `pid` has already forked, recursively.
    pub fn add_descendants(&mut self, pid: Pid) {
        for child in procfs::children(pid) {
            if self.add(child).is_ok() {
                self.add_descendants(child);
            }
        }
    }

    /// Passes interpreters the tracer found on to the probe.
    fn sync_python(&mut self) {
        for (pid, proc) in std::mem::take(&mut self.tracer.python_changes) {
            self.probes.set_python(pid, proc);
        }
    }

    fn apply(&mut self, event: &Event) {
        self.model.apply(event);
        if let Some(observer) = &mut self.observer {
            observer(event);
        }
    }

    /// A monotonic time before which every record the probes wrote has reached the session's
    /// queue. Read it, then [`Session::pump`] (which takes everything queued): the model has
    /// then caught up with that moment, such as a launched command's exit.
    pub fn drained_until(&self) -> u64 {
        self.shared.drained_until.load(Ordering::Acquire)
    }

    /// Consumes what the probes delivered, waiting up to `timeout` for it; then does the
    /// periodic work that is due. Returns the new events.
    pub fn pump(&mut self, timeout: Duration) -> Vec<Event> {
        // Every record written before this has reached the channel, which is emptied below.
        let drained = self.drained_until();
        let mut items: Vec<Item> = Vec::new();
        let mut next = self.records.recv_timeout(timeout).ok();
        while let Some(batch) = next {
            self.shared
                .queued_bytes
                .fetch_sub(batch.bytes, Ordering::Relaxed);
            self.records_since_trim += batch.records.len();
            items.extend(batch.records.into_iter().map(Item::Record));
            next = self.records.try_recv().ok();
        }
        // Mapping reports are drained after the records: whatever a record's stack needs was
        // mapped before the record was written, so it is in this drain or an earlier one.
        {
            // Under the lock, so that every report the mapping thread took before is in the
            // channel by now.
            let mut mappings = self.mappings.lock().unwrap_or_else(PoisonError::into_inner);
            self.map_events.extend(self.map_reports.try_iter());
            mappings.drain(&mut self.map_events);
        }
        // A launched CPython runs its first lines within milliseconds of mapping its
        // interpreter, while symbolizing the first stacks of this batch can take longer: tell
        // the probe about interpreters before working through the batch.
        for map in &self.map_events {
            self.tracer.early_python(map);
        }
        self.sync_python();
        items.extend(self.map_events.drain(..).map(Item::Map));
        let (due, later): (Vec<Item>, Vec<Item>) =
            std::mem::take(&mut self.listings).into_iter().partition(
                |l| matches!(l, Item::Listing { ts, .. } | Item::Gone { ts, .. } if *ts <= drained),
            );
        self.listings = later;
        items.extend(due);
        items.sort_by_key(|item| match item {
            Item::Record(rec) => rec.header.ts_ns,
            Item::Map(map) => map.ts(),
            Item::Listing { ts, .. } | Item::Gone { ts, .. } => *ts,
        });

        let mut out = Vec::new();
        // The process of the last record, known to the model: runs of records of one process
        // skip the lookup below.
        let mut known: Option<Pid> = None;
        for item in items {
            let rec = match item {
                Item::Record(rec) => rec,
                Item::Map(map) => {
                    self.tracer.mapping(&map);
                    // A new mapping drops the process's memos: the probe's go at once.
                    self.sync_memos();
                    self.sync_python();
                    continue;
                }
                Item::Listing { pid, ts, fds } => {
                    // The listing saw the kept descriptors open then: the model must have them.
                    self.take_kept(Some(pid), ts, &mut out);
                    self.probes.kept.release(pid, ts);
                    self.apply(&Event::Reconciled { pid, ts, fds });
                    continue;
                }
                Item::Gone { pid, ts } => {
                    out.extend(self.exit_lost(pid, ts));
                    continue;
                }
            };
            let (pid, ts) = (rec.header.tgid, rec.header.ts_ns);
            if rec.header.kind == kind::EXIT {
                // Its pid may come back as another process's.
                self.unreadable.remove(&pid);
                known = None;
            } else if known != Some(pid) {
                if self.knows(pid) {
                    known = Some(pid);
                } else if self.attach_unknown(pid, ts, &mut out) {
                    known = Some(pid);
                    if rec.header.kind == kind::EXEC {
                        // The attach read the new program's identity and table: the exec
                        // itself (closing the old program's close-on-exec descriptors)
                        // happened before.
                        continue;
                    }
                }
            }
            if let Some(before) = whole_table_at(&rec) {
                // This record needs the process's whole table as of its time: the kept
                // descriptors come out of the kernel first (and its pairs, before an exit).
                self.take_kept(Some(pid), before, &mut out);
                if rec.header.kind == kind::EXIT {
                    self.take_pairs(&mut out);
                } else {
                    self.probes.kept.release(pid, before);
                }
            }
            let mut events = self.tracer.translate(&rec);
            if rec.header.kind == kind::EXIT && rec.aux.is_empty() {
                // The exit made it without its table, which waits in the probe's map.
                if let Some((_, max_fds, open)) = self.probes.take_exit(pid) {
                    let table = crate::tracer::exit_table(pid, ts, max_fds, &open);
                    events.insert(0, table);
                }
            }
            for event in events {
                if let Event::Exec { pid, .. } = &event {
                    // The new image has a new stack: the probe's clamp must follow.
                    self.probes.retrace_exec(*pid, procfs::main_stack(*pid));
                }
                self.apply(&event);
                out.push(event);
            }
            if rec.header.kind == kind::EXIT {
                self.probes.kept.forget_process(pid);
            }
            self.sync_memos();
            if !self.tracer.python_changes.is_empty() {
                self.sync_python();
            }
        }
        self.applied_until = drained;
        self.periodic(&mut out);
        out
    }

    /// Passes the memos the tracer made or dropped on to the probe, in order: a process's
    /// memos dropped after a mapping change must not take newer ones with them.
    fn sync_memos(&mut self) {
        for pid in std::mem::take(&mut self.tracer.forgotten_memos) {
            self.probes.kept.forget_memos(pid);
        }
        for (key, memo) in std::mem::take(&mut self.tracer.kernel_memos) {
            self.probes.kept.install(key, &memo);
        }
    }

    /// Applies `pid`'s (everyone's with `None`) kept descriptors created before `before`, as
    /// the creations they are.
    fn take_kept(&mut self, pid: Option<Pid>, before: u64, out: &mut Vec<Event>) {
        for rec in self.probes.kept.take(pid, before) {
            for event in self.tracer.translate(&rec) {
                self.apply(&event);
                out.push(event);
            }
        }
    }

    /// Applies the pairs the kernel counted since the last time.
    fn take_pairs(&mut self, out: &mut Vec<Event>) {
        let ts = monotonic_ns();
        for pairs in self.probes.kept.new_pairs() {
            let event = Event::Balanced {
                pid: pairs.pid,
                ts,
                stack: pairs.stack,
                syscall: pairs.syscall,
                count: pairs.count,
                lifetimes: pairs.lifetimes,
            };
            self.apply(&event);
            out.push(event);
        }
    }

    /// Takes what the kernel keeps that the views must show: kept descriptors older than
    /// [`kept::AGE_NS`] whose earlier records are all applied, those of processes under a
    /// hold whose moment passed without its record (lost to a full ring), and the pairs.
    fn take_aged(&mut self, out: &mut Vec<Event>) {
        let applied = self.applied_until;
        for (pid, since) in self.probes.kept.holds() {
            if since <= applied {
                self.take_kept(Some(pid), since, out);
                self.probes.kept.release(pid, since);
            }
        }
        let before = applied.min(monotonic_ns().saturating_sub(kept::AGE_NS));
        self.take_kept(None, before, out);
        self.take_pairs(out);
    }

    /// Brings the model level with the kernel for a report: every kept descriptor whose
    /// earlier records are applied, and every pair.
    pub fn settle(&mut self) {
        let mut out = Vec::new();
        self.pump(Duration::from_millis(20));
        self.take_kept(None, self.applied_until, &mut out);
        self.take_pairs(&mut out);
        let c = self.probes.counters();
        log::info!(
            "kept in the kernel: {} creations, {} of them closed there; {} sent for want of room",
            c.kept,
            c.pairs_closed,
            c.keep_failed
        );
    }

    fn periodic(&mut self, out: &mut Vec<Event>) {
        self.probes.flush_logs();
        if self.last_kept.elapsed() >= KEPT_EVERY {
            self.last_kept = Instant::now();
            self.take_aged(out);
        }
        let losses = self.losses();
        let lost = losses.events();
        let new_loss = lost > self.lost_seen;
        if new_loss {
            self.apply(&Event::Lost {
                count: lost - self.lost_seen,
            });
            self.lost_seen = lost;
        }
        if losses != self.model.losses {
            self.apply(&Event::Losses(losses));
        }
        // The tick carries the time up to which every record is applied, not the clock: a
        // reader behind a storm is seconds late, and at the clock's time a creation that
        // displaced a number would give up on the racing close still waiting in the ring (a
        // 6.12 guest counted "reused" corrections, this among the possible causes). While the
        // reader has not caught up since the last tick, there is no new time to tick at.
        if self.last_tick.elapsed() >= Duration::from_secs(1)
            && self.applied_until > self.model.last_tick_ns()
        {
            self.last_tick = Instant::now();
            self.apply(&Event::Tick {
                ts: self.applied_until,
            });
            let alive = self.alive_pids();
            self.listeners.sample(&alive, monotonic_ns());
            if self.records_since_trim >= BATCH_RECORDS {
                self.records_since_trim = 0;
                release_freed_memory();
            }
        }
        if self.selection.is_some() && self.last_rescan.elapsed() >= RESCAN_EVERY {
            self.last_rescan = Instant::now();
            for pid in self.add_matching() {
                log::info!("{pid} matches the selection without an exec: traced from now");
            }
        }
        if new_loss || self.last_reconcile.elapsed() >= RECONCILE_EVERY {
            self.last_reconcile = Instant::now();
            self.reconciles += 1;
            self.reconcile();
        }
    }

    fn alive_pids(&self) -> Vec<Pid> {
        self.model
            .processes
            .values()
            .filter(|p| p.alive())
            .map(|p| p.pid)
            .collect()
    }

    fn reconcile(&mut self) {
        let alive = self.alive_pids();
        // The budget is for all processes together: fifty processes of 20k descriptors cost
        // as much to list as one of a million.
        let total: u64 = alive.iter().map(|&pid| self.model.open_count(pid)).sum();
        if total >= LARGE_TABLE && !self.reconciles.is_multiple_of(15) {
            return;
        }
        // A listing still waiting for its turn makes another one pointless.
        if !self.listings.is_empty() {
            return;
        }
        for pid in alive {
            let ts = monotonic_ns();
            // Closes of kept descriptors from now on are sent until the listing is applied.
            self.probes.kept.hold(pid, ts);
            match procfs::fds(pid) {
                Ok(fds) => self.listings.push(Item::Listing { pid, ts, fds }),
                Err(_) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                    self.listings.push(Item::Gone { pid, ts });
                }
                Err(_) => {}
            }
        }
    }

    /// Ends `pid`, gone by `ts` (from /proc, or waitpid), when every record written before
    /// then is consumed and its exit was not among them: the exit record was lost to a full
    /// ring. Its table at exit comes from the probe's map when the probe could keep it there.
    pub fn exit_lost(&mut self, pid: Pid, ts: u64) -> Vec<Event> {
        if !self
            .model
            .processes
            .get(&pid)
            .is_some_and(crate::model::Process::alive)
        {
            return Vec::new();
        }
        let mut events = Vec::new();
        self.take_kept(Some(pid), u64::MAX, &mut events);
        self.take_pairs(&mut events);
        let taken = events.len();
        let ts = if let Some((exited, max_fds, open)) = self.probes.take_exit(pid) {
            events.push(crate::tracer::exit_table(pid, exited, max_fds, &open));
            exited
        } else {
            log::warn!("pid {pid} exited; its exit record and table were lost (ring full)");
            ts
        };
        let end = events.len();
        events.push(Event::Exited {
            pid,
            ts,
            code: None,
        });
        // The kept ones and the pairs are applied already.
        for event in &events[taken..=end] {
            self.apply(event);
        }
        self.probes.kept.forget_process(pid);
        events
    }

    /// Records a process's exit status learned from waitpid.
    pub fn set_exit_code(&mut self, pid: Pid, code: i32) {
        self.model.set_exit_code(pid, code);
    }

    pub fn any_alive(&self) -> bool {
        self.model
            .processes
            .values()
            .any(crate::model::Process::alive)
    }

    pub fn counters(&self) -> crate::probe::Counters {
        self.probes.counters()
    }

    /// What the probes, the mapping reports and the decoder could not do so far.
    fn losses(&self) -> Losses {
        let c = self.probes.counters();
        Losses {
            ring_full: c.ring_full,
            undecodable: self.shared.decode_errors.load(Ordering::Relaxed),
            stacks_unreadable: c.stack_read_failed,
            stacks_skipped: c.stack_skipped,
            paths_unreadable: c.aux_read_failed,
            forks_not_followed: c.traced_full,
            selected_not_traced: c.not_adopted,
            python_frames_missing: c.py_frames_missing,
            mapping_reports: self
                .mappings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .lost,
            unanswered_unknown: c.socket_reused,
        }
    }

    /// Each non-zero shortfall in words, for the views to show next to the events lost.
    pub fn shortfalls(&self) -> Vec<String> {
        self.model.losses.described()
    }

    /// The pids the kernel's traced-process and Python maps hold now.
    pub fn kernel_pids(&self) -> (Vec<u32>, Vec<u32>) {
        (self.probes.traced(), self.probes.python_pids())
    }

    pub fn probe_cost(&self) -> crate::probe::ProbeCost {
        self.probes.cost()
    }

    pub fn report(&self) -> Report {
        let mut report = Report::build(&self.model, &self.tracer.stacks, &self.clock);
        report.name_listeners();
        report
    }
}

/// When `rec` needs its process's whole table as of its time, the time before which kept
/// descriptors must be in the model first: a fork copies the table, an exec closes the
/// close-on-exec ones, close_range some, an EMFILE/ENFILE blames it, and an exit ends it.
fn whole_table_at(rec: &Record) -> Option<u64> {
    use fdtrace_common::syscalls as sc;
    const CLONE_THREAD: u64 = 0x0001_0000;
    let h = &rec.header;
    match h.kind {
        kind::EXIT => Some(u64::MAX),
        kind::EXEC => Some(h.ts_ns),
        kind::FORK if h.args[1] & CLONE_THREAD == 0 => Some(h.ts_ns),
        kind::SYSCALL | kind::STACKED if h.ret == -sc::EMFILE || h.ret == -sc::ENFILE => {
            Some(h.ts_ns)
        }
        kind::SYSCALL if h.nr == sc::CLOSE_RANGE => Some(h.ts_ns),
        _ => None,
    }
}

/// The reader thread: decodes what the probes wrote, in batches, until `stop`.
///
/// It sleeps between drains, longer when little came: a wakeup costs tens of microseconds in
/// a VM, and draining every 2 ms took 2.5% of a CPU with nothing to read, on machines where
/// the traced server wants every cycle. A burst cannot overrun the ring meanwhile: the probes
/// wake the reader once a quarter of it is full.
fn read_ring(
    reader: &mut RingReader,
    tx: &mpsc::Sender<Batch>,
    shared: &Shared,
    memo: &RwLock<StackMemo>,
) {
    let mut wait = Duration::from_millis(2);
    let mut arena = BytesMut::new();
    let mut peer_queues = crate::listeners::PeerQueues::default();
    while !shared.stop.load(Ordering::Relaxed) {
        if shared.queued_bytes.load(Ordering::Relaxed) >= QUEUED_BYTES_MAX {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        reader.wait(wait);
        let mut drained = 0;
        let started = monotonic_ns();
        loop {
            let mut batch = Batch {
                records: Vec::new(),
                bytes: 0,
            };
            // Held for one batch: the tracer writes only when it unwound something new.
            let known = memo.read().unwrap_or_else(PoisonError::into_inner);
            let n = reader.drain(BATCH_RECORDS, |bytes| {
                if arena.capacity() < bytes.len() {
                    arena.reserve(ARENA_CHUNK.max(bytes.len()));
                }
                let recognize = |pid, regs, stack: &[u8]| known.get(pid, regs, stack);
                match decode::decode_into(bytes, &mut arena, recognize) {
                    Ok(mut rec) => {
                        crate::tracer::mark_backlog_full(&mut rec, &mut peer_queues);
                        batch.bytes += rec.heap_bytes();
                        batch.records.push(rec);
                    }
                    Err(_) => {
                        shared.decode_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            drop(known);
            drained += batch.bytes;
            if !batch.records.is_empty() {
                shared
                    .queued_bytes
                    .fetch_add(batch.bytes, Ordering::Relaxed);
                if tx.send(batch).is_err() {
                    return;
                }
            }
            if n < BATCH_RECORDS {
                // After the send: a session that reads this time has the batches too.
                shared.drained_until.store(started, Ordering::Release);
                break;
            }
            if shared.queued_bytes.load(Ordering::Relaxed) >= QUEUED_BYTES_MAX {
                break;
            }
        }
        wait = match drained {
            0 => Duration::from_millis(25),
            n if n < (1 << 20) => Duration::from_millis(10),
            _ => Duration::from_millis(2),
        };
    }
}

/// The mapping thread: forwards mapping reports as they come, and tells the probe about a
/// CPython interpreter the moment its mapping is reported. The session could only do that
/// between batches, and its first symbolization of a batch can take seconds in a debug build,
/// while a script runs its first lines 20-40 ms after mapping its interpreter.
fn follow_mappings(
    mappings: &Mutex<MmapWatcher>,
    mut registrar: Option<PythonRegistrar>,
    tx: &mpsc::Sender<MapEvent>,
    shared: &Shared,
) {
    let mut events = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let fds = {
            let mappings = mappings.lock().unwrap_or_else(PoisonError::into_inner);
            mappings
                .wake_fd()
                .into_iter()
                .chain(mappings.fds())
                .collect::<Vec<_>>()
        };
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: valid pollfds; the descriptors stay open while the watcher lives (we hold an
        // Arc on it), and a closed one only makes poll report it.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 50) };
        {
            let mut mappings = mappings.lock().unwrap_or_else(PoisonError::into_inner);
            mappings.drain(&mut events);
            for event in &events {
                if tx.send(event.clone()).is_err() {
                    return;
                }
            }
        }
        let Some(registrar) = registrar.as_mut() else {
            events.clear();
            continue;
        };
        for event in events.drain(..) {
            if let MapEvent::Map { pid, mapping, .. } = event
                && python::version_of(&mapping.path).is_some()
                && let Some(found) =
                    python::detect(pid, &mapping.path, mapping.start, mapping.offset)
            {
                registrar.register(pid, found.proc);
            }
        }
    }
}

/// Hands the heap's free pages back to the kernel after a burst. glibc keeps freed memory for
/// reuse, and a burst's decoded records sit between long-lived table chunks, so the heap
/// cannot shrink from its top: without this 18 MB stayed resident after 1M creations. Costs
/// under a millisecond for a 100 MB heap.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        if let Some(thread) = self.map_thread.take() {
            let _ = thread.join();
        }
    }
}
