//! Loading and attaching the kernel probes, and reading what they deliver. The only aya user.

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, TracePoint},
};
use fdtrace_common::{COUNTERS, Counter, PyProc, Traced, names};
use thiserror::Error;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fdtrace.bpf.o"));

/// What can go wrong before tracing starts, each with the one line a user needs.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("loading eBPF probes needs root, or CAP_BPF and CAP_PERFMON: run it with sudo")]
    NotPrivileged,
    #[error(
        "tracefs is not mounted at /sys/kernel/tracing and mounting it failed ({0}): mount -t tracefs tracefs /sys/kernel/tracing"
    )]
    NoTracefs(std::io::Error),
    #[error(
        "this fdtrace was built without its eBPF probes (FDTRACE_SKIP_EBPF=1): rebuild it with `cargo xtask build`"
    )]
    NotBuilt,
    #[error("the kernel refused the {program} probe: {detail}")]
    Kernel {
        program: &'static str,
        detail: String,
    },
    #[error("the probes' {0} map is missing from the object")]
    MissingMap(&'static str),
    #[error("updating the traced-process map failed: {0}")]
    Map(#[from] aya::maps::MapError),
}

#[derive(Clone, Copy, Debug)]
pub struct ProbeOptions {
    /// Bytes of user stack copied at each creation and failure (0: no stacks).
    pub stack_bytes: u32,
    /// Ring buffer size in bytes (a power of two).
    pub ring_bytes: u32,
    /// Trace the children traced processes fork.
    pub follow: bool,
    /// Turn on the kernel's BPF run-time statistics, for a view that shows the probes' cost.
    /// They time every run of every BPF program on the machine (two clock reads per syscall
    /// here), so only the live terminal UI asks for them.
    pub stats: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            stack_bytes: fdtrace_common::STACK_DEFAULT,
            ring_bytes: 16 << 20,
            follow: true,
            stats: false,
        }
    }
}

/// The loaded, attached probes.
pub struct Probes {
    ebpf: Ebpf,
    traced: HashMap<MapData, u32, Traced>,
    python: HashMap<MapData, u32, PyProc>,
    counters: PerCpuArray<MapData, u64>,
    // Keeps kernel BPF run-time statistics on while we live, when asked for.
    _stats: Option<OwnedFd>,
}

/// Totals of the probes' per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub ring_full: u64,
    pub stack_read_failed: u64,
    pub stack_clamped: u64,
    pub aux_read_failed: u64,
}

/// The probes' own cost so far, from the kernel's BPF statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeCost {
    pub runs: u64,
    pub run_time: Duration,
}

impl Probes {
    pub fn load(options: ProbeOptions) -> Result<Self, ProbeError> {
        if OBJECT.is_empty() {
            return Err(ProbeError::NotBuilt);
        }
        ensure_tracefs()?;
        raise_memlock();
        // The tp_btf attach point needs the kernel's BTF, which aya's loader also parses
        // for itself (`EbpfLoader::new`, no way to share it): parse ours meanwhile on another
        // thread, each parse being about 45 ms of the start.
        let btf = std::thread::spawn(Btf::from_sys_fs);
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_STACK_BYTES, &options.stack_bytes, true)
            .override_global(names::GLOBAL_FOLLOW, &u32::from(options.follow), true)
            // A quarter of the ring, whatever its size.
            .override_global(
                names::GLOBAL_WAKEUP_BYTES,
                &(u64::from(options.ring_bytes) / 4),
                true,
            )
            .map_max_entries(names::MAP_EVENTS, options.ring_bytes)
            .load(OBJECT)
            .map_err(|e| kernel_error("object", &e))?;

        let btf = btf
            .join()
            .map_err(|_| ProbeError::Kernel {
                program: names::PROG_SYS_EXIT,
                detail: "reading the kernel's BTF panicked".into(),
            })?
            .map_err(|e| ProbeError::Kernel {
                program: names::PROG_SYS_EXIT,
                detail: format!("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {e}"),
            })?;
        let prog: &mut BtfTracePoint = program(&mut ebpf, names::PROG_SYS_EXIT)?;
        prog.load("sys_exit", &btf)
            .map_err(|e| kernel_error(names::PROG_SYS_EXIT, &e))?;
        prog.attach()
            .map_err(|e| kernel_error(names::PROG_SYS_EXIT, &e))?;
        for (name, tp) in [
            (names::PROG_FORK, "sched_process_fork"),
            (names::PROG_EXEC, "sched_process_exec"),
            (names::PROG_EXIT, "sched_process_exit"),
        ] {
            let prog: &mut TracePoint = program(&mut ebpf, name)?;
            prog.load().map_err(|e| kernel_error(name, &e))?;
            prog.attach("sched", tp)
                .map_err(|e| kernel_error(name, &e))?;
        }

        let traced = HashMap::try_from(
            ebpf.take_map(names::MAP_TRACED)
                .ok_or(ProbeError::MissingMap(names::MAP_TRACED))?,
        )?;
        let python = HashMap::try_from(
            ebpf.take_map(names::MAP_PYTHON)
                .ok_or(ProbeError::MissingMap(names::MAP_PYTHON))?,
        )?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(names::MAP_COUNTERS)
                .ok_or(ProbeError::MissingMap(names::MAP_COUNTERS))?,
        )?;
        let stats = options
            .stats
            .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).ok())
            .flatten();
        Ok(Self {
            ebpf,
            traced,
            python,
            counters,
            _stats: stats,
        })
    }

    /// The ring buffer reader; call once.
    pub fn reader(&mut self) -> Result<RingReader, ProbeError> {
        let map = self
            .ebpf
            .take_map(names::MAP_EVENTS)
            .ok_or(ProbeError::MissingMap(names::MAP_EVENTS))?;
        Ok(RingReader {
            ring: RingBuf::try_from(map)?,
        })
    }

    /// Starts tracing `pid`; `stack` bounds its main thread's stack mapping when known.
    pub fn trace(&mut self, pid: u32, stack: Option<(u64, u64)>) -> Result<(), ProbeError> {
        let (stack_lo, stack_hi) = stack.unwrap_or_default();
        self.traced.insert(pid, Traced { stack_lo, stack_hi }, 0)?;
        Ok(())
    }

    /// Tells the probe where `pid`'s CPython interpreter is (or that it has none).
    pub fn set_python(&mut self, pid: u32, proc: Option<PyProc>) {
        let _ = match proc {
            Some(proc) => self.python.insert(pid, proc, 0),
            None => self.python.remove(&pid),
        };
    }

    pub fn untrace(&mut self, pid: u32) {
        // Already gone when the exit probe removed it.
        let _ = self.traced.remove(&pid);
    }

    /// Processes the kernel side is tracing now (it adds forked children itself).
    pub fn traced(&self) -> Vec<u32> {
        self.traced.keys().filter_map(Result::ok).collect()
    }

    pub fn counters(&self) -> Counters {
        let sum = |c: Counter| -> u64 {
            self.counters
                .get(&(c as u32), 0)
                .map_or(0, |v| v.iter().sum())
        };
        debug_assert_eq!(COUNTERS, 4);
        Counters {
            ring_full: sum(Counter::RingFull),
            stack_read_failed: sum(Counter::StackReadFailed),
            stack_clamped: sum(Counter::StackClamped),
            aux_read_failed: sum(Counter::AuxReadFailed),
        }
    }

    /// Run count and time of all probes, when the kernel's BPF statistics are on.
    pub fn cost(&self) -> ProbeCost {
        let mut cost = ProbeCost::default();
        for (_, prog) in self.ebpf.programs() {
            if let Ok(info) = prog.info() {
                cost.runs += info.run_count();
                cost.run_time += info.run_time();
            }
        }
        cost
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| ProbeError::Kernel {
        program: name,
        detail: "missing from the object".into(),
    })?;
    prog.try_into().map_err(|e| kernel_error(name, &e))
}

/// Maps a load or attach failure to one line; permission problems get the privilege advice.
fn kernel_error(program: &'static str, err: &dyn std::error::Error) -> ProbeError {
    let mut detail = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        detail = format!("{detail}: {s}");
        source = s.source();
    }
    if detail.contains("Operation not permitted")
        || detail.contains("EPERM")
        || detail.contains("os error 1)")
    {
        return ProbeError::NotPrivileged;
    }
    // The verifier log is long; the first line after the error says what matters.
    let detail = detail.lines().take(3).collect::<Vec<_>>().join(" | ");
    ProbeError::Kernel { program, detail }
}

/// aya's tracepoint attach reads event ids from tracefs, which may not be mounted.
fn ensure_tracefs() -> Result<(), ProbeError> {
    let dir = Path::new("/sys/kernel/tracing");
    if dir.join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in literal");
    let (src, target, fstype) = (c("tracefs"), c("/sys/kernel/tracing"), c("tracefs"));
    // SAFETY: valid C strings; a plain mount with no data.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EPERM) {
            return Err(ProbeError::NotPrivileged);
        }
        return Err(ProbeError::NoTracefs(err));
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK. Later ones use the memory cgroup,
/// and without CAP_SYS_RESOURCE the raise fails harmlessly: ignore it.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a plain setrlimit.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) };
}

/// Drains the ring buffer. Records are submitted without wakeups (see the probes' maps.rs), so
/// the reader polls on a short timeout; the kernel wakes it early when the ring fills up.
pub struct RingReader {
    ring: RingBuf<MapData>,
}

impl RingReader {
    /// Waits up to `timeout` for data.
    pub fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let _ = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    }

    /// Hands up to `limit` available records to `f`; returns how many.
    pub fn drain(&mut self, limit: usize, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while n < limit
            && let Some(item) = self.ring.next()
        {
            f(&item);
            n += 1;
        }
        n
    }
}

/// Whether the current process could plausibly load probes; for an early, clear message.
pub fn privileged() -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    // CAP_BPF (39) and CAP_PERFMON (38) in the effective set.
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    eff & (1 << 39) != 0 && eff & (1 << 38) != 0
}
