//! Loading and attaching the kernel probes, and reading what they deliver. The only aya user.

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{BtfTracePoint, RawTracePoint, TracePoint},
};
use fdtrace_common::{
    COUNTERS, Counter, ExitStash, KernelLayout, NO_FIELD, PyProc, Traced, names, select,
};
use thiserror::Error;

use crate::layout::{self, ExitSource, LayoutError};

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
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(
        "this kernel cannot run fdtrace's probes: {0} (fdtrace needs Linux 5.11 or newer with BTF and the BPF ring buffer; tested on 6.1, 6.12 and 6.18)"
    )]
    Unsupported(String),
    #[error("the probes' {0} map is missing from the object")]
    MissingMap(&'static str),
    #[error("updating the probes' maps failed: {0}")]
    Map(#[from] aya::maps::MapError),
}

#[derive(Clone, Copy, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches, each named where it is set"
)]
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
    /// Take the paths older kernels need even where this one offers better: the raw
    /// tracepoint for `sys_exit` and `signal->live` for exits. For testing those paths on any
    /// kernel.
    pub fallbacks: bool,
    /// Load the probes' own diagnostics (aya-log) and log them (`--debug-probes`).
    pub debug: bool,
    /// Which selection maps the exec probe consults (`fdtrace_common::select` bits): set the
    /// bit of each kind of selector in use, then fill the maps with [`Probes::select_comm`]
    /// and [`Probes::select_cgroup`]. 0 adopts nothing.
    pub select: u32,
    /// Keep creations at call sites already unwound in the kernel, and their closes (see
    /// `fdtrace-ebpf/src/kept.rs`): off, every creation and close is sent (recordings).
    pub keep: bool,
}

/// The program type the `sys_exit` probe was loaded as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SysExitProgram {
    /// BTF-typed tracepoint: registers read with plain loads.
    TpBtf,
    /// Raw tracepoint: registers read with `bpf_probe_read_kernel`. Carries why tp_btf was not
    /// used (the kernel's refusal, or that fallbacks were asked for).
    RawTp { why: String },
}

/// What was chosen at load, for the log and `fdtrace --version --verbose`.
#[derive(Clone, Debug)]
pub struct ProbeChoices {
    pub sys_exit: SysExitProgram,
    pub exit: ExitSource,
    pub layout: KernelLayout,
}

impl std::fmt::Display for ProbeChoices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sys_exit {
            SysExitProgram::TpBtf => writeln!(f, "sys_exit probe: tp_btf (typed register loads)")?,
            SysExitProgram::RawTp { why } => writeln!(
                f,
                "sys_exit probe: raw_tp (registers read with bpf_probe_read_kernel; {why})"
            )?,
        }
        let l = &self.layout;
        writeln!(
            f,
            "sched_process_fork child_pid at {}, sched_process_exec filename at {}",
            l.fork_child_pid, l.exec_filename
        )?;
        match self.exit {
            ExitSource::RecordField => write!(
                f,
                "process exit: group_dead at {} in sched_process_exit",
                l.exit_group_dead
            ),
            ExitSource::SignalLive => write!(
                f,
                "process exit: task_struct.signal at {} -> signal_struct.live at {} (BTF)",
                l.task_signal, l.signal_live
            ),
        }?;
        write!(
            f,
            "\nclose races: task_struct.files at {} -> files_struct.fdt at {} -> fdtable.max_fds at {}, fd at {} (BTF)\nexec: task_struct.mm at {} -> mm_struct.start_code at {}, start_brk at {} (BTF)",
            l.task_files,
            l.files_fdt,
            l.fdt_max_fds,
            l.fdt_fd,
            l.task_mm,
            l.mm_start_code,
            l.mm_start_brk
        )?;
        if l.tcp_bytes_received == NO_FIELD {
            write!(f, "\nupstream exchanges: not followed (see the log)")
        } else {
            write!(
                f,
                "\nupstream exchanges: inet_sock_set_state skaddr at {}, states at {}/{}; sock.sk_err at {}, tcp_sock.bytes_sent at {}, bytes_received at {} (BTF)",
                l.state_skaddr,
                l.state_oldstate,
                l.state_newstate,
                l.sk_err,
                l.tcp_bytes_sent,
                l.tcp_bytes_received
            )
        }
    }
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            stack_bytes: fdtrace_common::STACK_DEFAULT,
            ring_bytes: 16 << 20,
            follow: true,
            stats: false,
            fallbacks: false,
            debug: false,
            select: 0,
            keep: true,
        }
    }
}

/// Second handles on the probes' Python and traced-process maps, for the thread that finds
/// interpreters in mapping reports: a CPython's registration must not wait behind the session's
/// symbolization of a batch, which takes seconds the first time (its first lines run meanwhile).
pub struct PythonRegistrar {
    python: HashMap<MapData, u32, PyProc>,
    traced: HashMap<MapData, u32, Traced>,
}

impl PythonRegistrar {
    /// Tells the probe where `pid`'s interpreter is, if the kernel still traces `pid` (one that
    /// has exited since must not come back to the map).
    pub fn register(&mut self, pid: u32, proc: PyProc) {
        let traced = self.traced.get(&pid, 0).is_ok();
        if traced {
            let _ = self.python.insert(pid, proc, 0);
        }
        log::debug!(
            "CPython runtime of {pid} at {:#x}: {}",
            proc.runtime,
            if traced {
                "registered"
            } else {
                "not traced (any more)"
            }
        );
    }
}

/// A second handle on a map the probes' object created.
fn second_handle(map: &aya::maps::Map) -> Result<aya::maps::Map, ProbeError> {
    let aya::maps::Map::HashMap(data) = map else {
        return Err(ProbeError::MissingMap("a hash map"));
    };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| {
        ProbeError::Map(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error: e,
        }))
    })?;
    Ok(aya::maps::Map::HashMap(MapData::from_fd(fd)?))
}

/// The loaded, attached probes.
pub struct Probes {
    ebpf: Ebpf,
    traced: HashMap<MapData, u32, Traced>,
    python: HashMap<MapData, u32, PyProc>,
    select_comms: HashMap<MapData, [u8; select::COMM_LEN], u8>,
    select_cgroups: HashMap<MapData, u64, u8>,
    counters: PerCpuArray<MapData, u64>,
    exits: HashMap<MapData, u32, ExitStash>,
    /// The maps of descriptors kept in the kernel.
    pub kept: crate::kept::KeptMaps,
    choices: ProbeChoices,
    registrar: Option<PythonRegistrar>,
    /// The probes' diagnostics (`--debug-probes`), drained into the log by `flush_logs`.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
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
    pub traced_full: u64,
    pub py_frames_missing: u64,
    pub not_adopted: u64,
    pub socket_reused: u64,
    pub kept: u64,
    pub keep_failed: u64,
    pub pairs_closed: u64,
    pub stack_skipped: u64,
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
        let tracefs = ensure_tracefs()?;
        let btf_path = Path::new("/sys/kernel/btf/vmlinux");
        if !btf_path.exists() {
            return Err(ProbeError::Unsupported(
                "it has no BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF)".into(),
            ));
        }
        let (mut kernel_layout, exit) = layout::detect(&tracefs, options.fallbacks)?;
        kernel_layout.debug = u32::from(options.debug);
        raise_memlock();
        // The tp_btf attach point needs the kernel's BTF, which aya's loader also parses
        // for itself (`EbpfLoader::new`, no way to share it): parse ours meanwhile on another
        // thread, each parse being about 45 ms of the start.
        let btf = (!options.fallbacks).then(|| std::thread::spawn(Btf::from_sys_fs));
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_STACK_BYTES, &options.stack_bytes, true)
            .override_global(names::GLOBAL_FOLLOW, &u32::from(options.follow), true)
            .override_global(names::GLOBAL_LAYOUT, &kernel_layout, true)
            .override_global(names::GLOBAL_SELECT, &options.select, true)
            .override_global(names::GLOBAL_KEEP, &u32::from(options.keep), true)
            // A quarter of the ring, whatever its size.
            .override_global(
                names::GLOBAL_WAKEUP_BYTES,
                &(u64::from(options.ring_bytes) / 4),
                true,
            )
            .map_max_entries(names::MAP_EVENTS, options.ring_bytes)
            .load(OBJECT)
            .map_err(|e| unsupported_or(kernel_error("object", &e)))?;
        // Before any program runs, so that no diagnostic is lost.
        let logger = if options.debug {
            Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(|e| kernel_error("aya-log", &e))?)
        } else {
            None
        };

        let btf = match btf {
            Some(btf) => btf
                .join()
                .map_err(|_| "reading the kernel's BTF panicked".to_string())
                .and_then(|btf| btf.map_err(|e| format!("reading the kernel's BTF: {e}"))),
            None => Err("fallbacks asked for".to_string()),
        };
        let sys_exit = match btf.as_ref() {
            Ok(btf) => load_typed(&mut ebpf, names::PROG_SYS_EXIT, btf),
            Err(why) => Err(why.clone()),
        };
        let sys_exit = match sys_exit {
            Ok(()) => SysExitProgram::TpBtf,
            Err(why) => {
                let prog: &mut RawTracePoint = program(&mut ebpf, names::PROG_SYS_EXIT_RAW)?;
                prog.load()
                    .map_err(|e| unsupported_or(kernel_error(names::PROG_SYS_EXIT_RAW, &e)))?;
                SysExitProgram::RawTp { why }
            }
        };
        // When keeping, the keeping program takes the tracepoint and tail-calls the main one
        // for what it did not keep. Of the same type as the main one: where that had to fall
        // back to the raw tracepoint, so must this.
        let keep = options.keep && {
            let raw = |ebpf: &mut Ebpf, name: &'static str| {
                program::<RawTracePoint>(ebpf, name)
                    .map_err(|e| e.to_string())
                    .and_then(|prog| prog.load().map_err(|e| e.to_string()))
            };
            let (keeper, main, tracepoint) = match (&sys_exit, btf.as_ref()) {
                (SysExitProgram::TpBtf, Ok(_)) => (names::PROG_KEEP, names::PROG_SYS_EXIT, None),
                _ => (
                    names::PROG_KEEP_RAW,
                    names::PROG_SYS_EXIT_RAW,
                    Some("sys_exit"),
                ),
            };
            // The close side first: alone it finds nothing to do, while creations kept with
            // no program to close them would be lost.
            let kept = raw(&mut ebpf, names::PROG_KEEP_CLOSE)
                .and_then(|()| attach(&mut ebpf, names::PROG_KEEP_CLOSE, Some("sys_enter")))
                .and_then(|()| match (tracepoint, btf.as_ref()) {
                    (None, Ok(btf)) => load_typed(&mut ebpf, keeper, btf),
                    _ => raw(&mut ebpf, keeper),
                })
                .and_then(|()| chain(&mut ebpf, main))
                .and_then(|()| attach(&mut ebpf, keeper, tracepoint));
            kept.map_err(|why| log::warn!("probes: descriptors are not kept in the kernel: {why}"))
                .is_ok()
        };
        if !keep {
            match &sys_exit {
                SysExitProgram::TpBtf => attach(&mut ebpf, names::PROG_SYS_EXIT, None),
                SysExitProgram::RawTp { .. } => {
                    attach(&mut ebpf, names::PROG_SYS_EXIT_RAW, Some("sys_exit"))
                }
            }
            .map_err(ProbeError::Unsupported)?;
        }
        for (name, tp) in [
            (names::PROG_FORK, "sched_process_fork"),
            (names::PROG_EXEC, "sched_process_exec"),
            (names::PROG_EXIT, "sched_process_exit"),
        ] {
            let prog: &mut TracePoint = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|e| unsupported_or(kernel_error(name, &e)))?;
            prog.attach("sched", tp)
                .map_err(|e| kernel_error(name, &e))?;
        }
        // Only where the layout was found: the probe reads nothing without it.
        if kernel_layout.tcp_bytes_received != NO_FIELD {
            let prog: &mut TracePoint = program(&mut ebpf, names::PROG_TCP_STATE)?;
            prog.load()
                .map_err(|e| unsupported_or(kernel_error(names::PROG_TCP_STATE, &e)))?;
            prog.attach("sock", "inet_sock_set_state")
                .map_err(|e| kernel_error(names::PROG_TCP_STATE, &e))?;
        }
        let choices = ProbeChoices {
            sys_exit,
            exit,
            layout: kernel_layout,
        };
        for line in choices.to_string().lines() {
            log::info!("probes: {line}");
        }

        let traced = ebpf
            .take_map(names::MAP_TRACED)
            .ok_or(ProbeError::MissingMap(names::MAP_TRACED))?;
        let python = ebpf
            .take_map(names::MAP_PYTHON)
            .ok_or(ProbeError::MissingMap(names::MAP_PYTHON))?;
        let registrar = PythonRegistrar {
            python: HashMap::try_from(second_handle(&python)?)?,
            traced: HashMap::try_from(second_handle(&traced)?)?,
        };
        let traced = HashMap::try_from(traced)?;
        let python = HashMap::try_from(python)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))
        };
        let select_comms = HashMap::try_from(take(&mut ebpf, names::MAP_SELECT_COMMS)?)?;
        let select_cgroups = HashMap::try_from(take(&mut ebpf, names::MAP_SELECT_CGROUPS)?)?;
        let exits = HashMap::try_from(take(&mut ebpf, names::MAP_EXITS)?)?;
        let kept = crate::kept::KeptMaps::new(
            HashMap::try_from(take(&mut ebpf, names::MAP_MEMOS)?)?,
            HashMap::try_from(take(&mut ebpf, names::MAP_KEPT)?)?,
            HashMap::try_from(take(&mut ebpf, names::MAP_PAIRS)?)?,
            HashMap::try_from(take(&mut ebpf, names::MAP_HOLDS)?)?,
            keep,
        );
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
            select_comms,
            select_cgroups,
            counters,
            exits,
            kept,
            choices,
            registrar: Some(registrar),
            logger,
            _stats: stats,
        })
    }

    /// The second handles for the mapping thread; call once.
    pub fn python_registrar(&mut self) -> Option<PythonRegistrar> {
        self.registrar.take()
    }

    /// What was chosen at load.
    pub fn choices(&self) -> &ProbeChoices {
        &self.choices
    }

    /// Moves the probes' diagnostics, if asked for, into the log.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
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
        self.traced.insert(
            pid,
            Traced {
                stack_lo,
                stack_hi,
                limit_hit_ns: 0,
            },
            0,
        )?;
        Ok(())
    }

    /// Moves the stack bounds of a traced `pid` that has executed a new program, only if the
    /// kernel still traces it: the exec record is read after the fact, and a process that has
    /// exited since must not be traced again (its pid may go to a stranger).
    pub fn retrace_exec(&mut self, pid: u32, stack: Option<(u64, u64)>) {
        const BPF_EXIST: u64 = 2;
        let (stack_lo, stack_hi) = stack.unwrap_or_default();
        let _ = self.traced.insert(
            pid,
            Traced {
                stack_lo,
                stack_hi,
                limit_hit_ns: 0,
            },
            BPF_EXIST,
        );
    }

    /// Tells the probe where `pid`'s CPython interpreter is (or that it has none).
    pub fn set_python(&mut self, pid: u32, proc: Option<PyProc>) {
        let _ = match proc {
            // Userspace learns of interpreters after the fact: one of a process that has exited
            // since (the exit probe removed it from both maps) must not come back.
            Some(_) if self.traced.get(&pid, 0).is_err() => return,
            Some(proc) => self.python.insert(pid, proc, 0),
            None => self.python.remove(&pid),
        };
    }

    /// Has the exec probe adopt processes that execute a program under this comm (the name
    /// cut to 15 bytes and NUL-padded, as the kernel keeps it). Needs the
    /// [`select::COMM`] bit in [`ProbeOptions::select`].
    pub fn select_comm(&mut self, comm: [u8; select::COMM_LEN]) -> Result<(), ProbeError> {
        self.select_comms.insert(comm, 1, 0)?;
        Ok(())
    }

    /// Has the exec probe adopt processes that execute a program in this cgroup v2 directory
    /// (its inode number) or below it. Needs the [`select::CGROUP`] bit.
    pub fn select_cgroup(&mut self, id: u64) -> Result<(), ProbeError> {
        self.select_cgroups.insert(id, 1, 0)?;
        Ok(())
    }

    /// Whether the kernel side traces `pid` now.
    pub fn is_traced(&self, pid: u32) -> bool {
        self.traced.get(&pid, 0).is_ok()
    }

    pub fn untrace(&mut self, pid: u32) {
        // Already gone when the exit probe removed it.
        let _ = self.traced.remove(&pid);
    }

    /// Processes the kernel side is tracing now (it adds forked children itself).
    pub fn traced(&self) -> Vec<u32> {
        self.traced.keys().filter_map(Result::ok).collect()
    }

    /// The table at exit of `pid` the exit probe kept because the ring was full, taken out of
    /// the map: (time of the exit, the table's size in descriptors, the bitmap read).
    pub fn take_exit(&mut self, pid: u32) -> Option<(u64, u64, Vec<u8>)> {
        let stash = self.exits.get(&pid, 0).ok()?;
        let _ = self.exits.remove(&pid);
        let bytes = (stash.bytes as usize).min(stash.open.len());
        Some((stash.ts_ns, stash.max_fds, stash.open[..bytes].to_vec()))
    }

    /// Processes the probe knows a CPython interpreter of.
    pub fn python_pids(&self) -> Vec<u32> {
        self.python.keys().filter_map(Result::ok).collect()
    }

    pub fn counters(&self) -> Counters {
        let sum = |c: Counter| -> u64 {
            self.counters
                .get(&(c as u32), 0)
                .map_or(0, |v| v.iter().sum())
        };
        debug_assert_eq!(COUNTERS, 12);
        Counters {
            ring_full: sum(Counter::RingFull),
            stack_read_failed: sum(Counter::StackReadFailed),
            stack_clamped: sum(Counter::StackClamped),
            aux_read_failed: sum(Counter::AuxReadFailed),
            traced_full: sum(Counter::TracedFull),
            py_frames_missing: sum(Counter::PyFramesMissing),
            not_adopted: sum(Counter::NotAdopted),
            socket_reused: sum(Counter::SocketReused),
            kept: sum(Counter::Kept),
            keep_failed: sum(Counter::KeepFailed),
            pairs_closed: sum(Counter::PairClosed),
            stack_skipped: sum(Counter::StackSkipped),
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

/// Loads and attaches the BTF-typed `sys_exit` program; on failure, says why in one line (the
/// verifier's first words), for the raw tracepoint to take over.
fn load_typed(ebpf: &mut Ebpf, name: &'static str, btf: &Btf) -> Result<(), String> {
    let prog: &mut BtfTracePoint = program(ebpf, name).map_err(|e| e.to_string())?;
    prog.load("sys_exit", btf).map_err(|e| {
        let err = kernel_error(name, &e);
        log::info!("probes: tp_btf {name} refused, falling back to raw_tp: {err}");
        format!("tp_btf refused: {err}")
    })
}

/// Attaches a loaded `sys_exit` program: BTF-typed, or on the raw tracepoint `raw`.
fn attach(ebpf: &mut Ebpf, name: &'static str, raw: Option<&str>) -> Result<(), String> {
    let attached = match raw {
        None => program::<BtfTracePoint>(ebpf, name)
            .map_err(|e| e.to_string())?
            .attach()
            .map(drop),
        Some(tracepoint) => program::<RawTracePoint>(ebpf, name)
            .map_err(|e| e.to_string())?
            .attach(tracepoint)
            .map(drop),
    };
    attached.map_err(|e| kernel_error(name, &e).to_string())
}

/// Puts the loaded `sys_exit` program `main` in the slot the keeping program tail-calls. The
/// slot holds it while `ebpf` keeps the array's descriptor (the kernel empties a program
/// array whose last user reference goes).
fn chain(ebpf: &mut Ebpf, main: &'static str) -> Result<(), String> {
    let fd = ebpf
        .program(main)
        .ok_or_else(|| format!("{main} is missing from the object"))?
        .fd()
        .map_err(|e| e.to_string())?
        .try_clone()
        .map_err(|e| e.to_string())?;
    let map = ebpf
        .map_mut(names::MAP_SYS_EXIT_NEXT)
        .ok_or_else(|| format!("{} is missing from the object", names::MAP_SYS_EXIT_NEXT))?;
    let mut next = ProgramArray::try_from(map).map_err(|e| e.to_string())?;
    next.set(0, &fd, 0)
        .map_err(|e| kernel_error(main, &e).to_string())
}

/// The oldest kernel whose helpers the probes all have: `bpf_task_pt_regs` came in 5.15 (the
/// ring buffer in 5.8, `bpf_get_current_task_btf` in 5.11).
const MIN_KERNEL: (u32, u32) = (5, 15);

/// The running kernel's (major, minor), from uname.
pub fn kernel_version() -> Option<(u32, u32, String)> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let release = release.trim().to_string();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, release))
}

/// A load failure on a kernel older than the probes need says that first: distributions
/// backport features, so an old version alone is no reason to refuse.
fn unsupported_or(err: ProbeError) -> ProbeError {
    match kernel_version() {
        Some((major, minor, release)) if (major, minor) < MIN_KERNEL => {
            ProbeError::Unsupported(format!(
                "Linux {release} is older than {}.{}, which the probes' helpers need ({err})",
                MIN_KERNEL.0, MIN_KERNEL.1
            ))
        }
        _ => err,
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
    log::debug!("probes: {program} refused: {detail}");
    ProbeError::Kernel {
        program,
        detail: verifier_summary(&detail),
    }
}

/// The lines of a load error that say why: the error itself and the verifier's last words.
/// The verifier's first lines can be a complaint it then ignores (6.1 logs "reg type
/// unsupported for arg#0" for every program whose context is a `void *`), so the reason is at
/// the end, before the statistics.
fn verifier_summary(detail: &str) -> String {
    let lines: Vec<&str> = detail
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| {
            !l.starts_with("processed ")
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
        })
        .collect();
    let Some((first, rest)) = lines.split_first() else {
        return String::new();
    };
    let tail = &rest[rest.len().saturating_sub(3)..];
    std::iter::once(*first)
        .chain(tail.iter().copied())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// aya's tracepoint attach reads event ids from tracefs, which may not be mounted. Returns
/// where it is.
fn ensure_tracefs() -> Result<std::path::PathBuf, ProbeError> {
    let dir = Path::new("/sys/kernel/tracing");
    for candidate in [dir, Path::new("/sys/kernel/debug/tracing")] {
        if candidate.join("events").exists() {
            return Ok(candidate.to_path_buf());
        }
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
    Ok(dir.to_path_buf())
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
