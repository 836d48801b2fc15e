//! Unwinds and symbolizes this test process's own stack, captured the way the probes capture
//! a traced one: ip, sp, bp and a copy of the bytes from sp up.

use std::hint::black_box;
use std::time::Instant;

use super::maps::parse_maps;
use super::{Frame, Lang, RawFrame, Symbolizer, Unwinder};

/// The most the probes copy by default is 4 KiB; take more so the test stack fits.
const COPY_LEN: u64 = 8192;

struct Capture {
    ip: u64,
    sp: u64,
    bp: u64,
    stack: Vec<u8>,
    /// The source line of the instruction at `ip`.
    line: u32,
}

/// Captures its own registers and stack; `ip` points into this function.
#[inline(never)]
fn stack_test_inner() -> Capture {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: reads three registers, touches no memory.
    let line = line!() + 2; // the line of `asm!`
    unsafe {
        std::arch::asm!(
            "lea {ip}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            ip = out(reg) ip,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nomem, nostack, preserves_flags),
        );
    }
    // Calls from here on use the stack below `sp` only; the frames above it, which the copy
    // holds, keep their return addresses and saved registers.
    let stack = copy_stack(sp);
    Capture {
        ip,
        sp,
        bp,
        stack,
        line,
    }
}

/// Calls `stack_test_inner`; returns its capture and the line of the call.
#[inline(never)]
fn stack_test_outer() -> (Capture, u32) {
    let capture = black_box(stack_test_inner());
    let line = line!() - 1;
    (capture, line)
}

/// Copies up to `COPY_LEN` bytes from `sp`, stopping at the end of the stack's mapping (the
/// test thread's stack is an anonymous mapping, and the page above it may be unmapped).
fn copy_stack(sp: u64) -> Vec<u8> {
    let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
    let mapping = maps
        .iter()
        .find(|m| (m.start..m.end).contains(&sp))
        .unwrap();
    let len = usize::try_from(COPY_LEN.min(mapping.end - sp)).unwrap();
    let mut stack = vec![0; len];
    let src = std::ptr::with_exposed_provenance::<u8>(usize::try_from(sp).unwrap());
    // SAFETY: [sp, sp + len) lies inside this thread's stack mapping, which is readable and
    // outlives the copy; nothing else writes the frames above this one meanwhile.
    unsafe { std::ptr::copy_nonoverlapping(src, stack.as_mut_ptr(), len) };
    stack
}

fn function(frame: &Frame) -> &str {
    frame.function.as_deref().unwrap_or_default()
}

fn position(frames: &[Frame], name: &str) -> usize {
    frames
        .iter()
        .position(|f| function(f).ends_with(name))
        .unwrap_or_else(|| panic!("no {name} in {frames:#?}"))
}

#[test]
fn unwinds_and_symbolizes_own_stack() {
    let (capture, call_line) = stack_test_outer();
    let pid = std::process::id();
    let mut unwinder = Unwinder::new();
    unwinder.refresh(pid).unwrap();
    let raw = unwinder.unwind(pid, capture.ip, capture.sp, capture.bp, &capture.stack);

    assert_eq!(raw[0].addr, capture.ip);
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    assert_eq!(raw[0].module.as_deref(), exe.to_str());

    let frames = Symbolizer::new().symbolize(&raw);
    let inner = position(&frames, "stack_test_inner");
    let outer = position(&frames, "stack_test_outer");
    let test = position(&frames, "unwinds_and_symbolizes_own_stack");
    assert_eq!((inner, outer, test), (0, 1, 2), "{frames:#?}");

    for (i, line) in [(inner, capture.line), (outer, call_line)] {
        let frame = &frames[i];
        assert!(
            frame.file.as_deref().unwrap().ends_with("tests.rs"),
            "{frame:?}"
        );
        assert!(
            frame.path.as_deref().unwrap().ends_with("stack/tests.rs"),
            "{frame:?}"
        );
        assert_eq!(frame.line, Some(line), "{frame:?}");
        assert_eq!(frame.module.as_deref(), exe.file_name().unwrap().to_str());
        assert_eq!(frame.lang, Lang::Native);
        assert!(!frame.inlined);
    }
    // The walk goes on through the test harness to the thread's start: the whole stack fit.
    assert!(frames.len() > 5, "{frames:#?}");
    assert!(
        frames
            .iter()
            .any(|f| function(f).contains("start_thread") || function(f) == "clone3"),
        "{frames:#?}"
    );
}

#[test]
fn reads_maps_on_first_use_and_shares_them_with_forked_children() {
    let (capture, _) = stack_test_outer();
    let pid = std::process::id();
    let mut unwinder = Unwinder::new();
    // No refresh: the first unwind reads the maps itself.
    let raw = unwinder.unwind(pid, capture.ip, capture.sp, capture.bp, &capture.stack);
    assert!(raw.len() > 5, "{raw:#?}");

    // No such process: a child must use its parent's maps, not read its own.
    let child = u32::MAX - 1;
    unwinder.fork(pid, child);
    let again = unwinder.unwind(child, capture.ip, capture.sp, capture.bp, &capture.stack);
    assert_eq!(raw, again);

    unwinder.forget(child);
    let gone = unwinder.unwind(child, capture.ip, capture.sp, capture.bp, &capture.stack);
    assert_eq!(
        gone,
        [RawFrame {
            module: None,
            file_offset: capture.ip,
            addr: capture.ip
        }]
    );
}

#[test]
fn stops_at_the_end_of_the_copy() {
    let (capture, _) = stack_test_outer();
    let pid = std::process::id();
    let mut unwinder = Unwinder::new();
    unwinder.refresh(pid).unwrap();
    let full = unwinder.unwind(pid, capture.ip, capture.sp, capture.bp, &capture.stack);

    let none = unwinder.unwind(pid, capture.ip, capture.sp, capture.bp, &[]);
    assert_eq!(none, full[..1]);

    // Cut the copy right after the outer function's return address: the walk keeps what it
    // can prove and stops there.
    let short = &capture.stack[..64.min(capture.stack.len())];
    let partial = unwinder.unwind(pid, capture.ip, capture.sp, capture.bp, short);
    assert!(!partial.is_empty() && partial.len() < full.len());
    assert_eq!(partial, full[..partial.len()]);
}

#[test]
fn unmapped_ip_has_no_module() {
    let pid = std::process::id();
    let mut unwinder = Unwinder::new();
    unwinder.refresh(pid).unwrap();
    let raw = unwinder.unwind(pid, 0x10, 0x1000, 0, &[]);
    assert_eq!(
        raw,
        [RawFrame {
            module: None,
            file_offset: 0x10,
            addr: 0x10
        }]
    );

    let frames = Symbolizer::new().symbolize(&raw);
    assert_eq!(frames.len(), 1);
    assert_eq!(
        (frames[0].function.as_ref(), frames[0].module.as_ref()),
        (None, None)
    );
    assert_eq!(frames[0].addr, 0x10);
}

/// Where `getpid` is in this process, and the mapping of libc it is in.
fn libc_getpid() -> (u64, crate::stack::maps::MapEntry) {
    // SAFETY: dlsym with a NUL-terminated name; the result is only used as a number.
    let getpid = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) } as u64;
    let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
    let libc = maps
        .into_iter()
        .find(|m| (m.start..m.end).contains(&getpid))
        .unwrap();
    (getpid, libc)
}

#[test]
fn symbolizes_libc_from_elf_symbols_and_caches() {
    let (getpid, libc) = libc_getpid();
    let raw = RawFrame {
        module: libc.path.clone(),
        file_offset: getpid - libc.start + libc.offset,
        addr: getpid,
    };
    let mut symbolizer = Symbolizer::new();
    let frames = symbolizer.symbolize(std::slice::from_ref(&raw));
    assert_eq!(frames.len(), 1, "{frames:#?}");
    assert!(function(&frames[0]).contains("getpid"), "{frames:#?}");
    assert!(frames[0].module.as_deref().unwrap().starts_with("libc.so"));
    assert_eq!(frames[0].offset, raw.file_offset);

    // Same object and offset in another process: the cached answer, at the new address.
    let elsewhere = RawFrame {
        addr: 0x1234,
        ..raw
    };
    let cached = symbolizer.symbolize(&[elsewhere]);
    assert_eq!(
        cached,
        [Frame {
            addr: 0x1234,
            ..frames[0].clone()
        }]
    );
}

#[test]
fn lang_serializes_lowercase() {
    assert_eq!(serde_json::to_string(&Lang::Python).unwrap(), "\"python\"");
    assert_eq!(
        serde_json::from_str::<Lang>("\"native\"").unwrap(),
        Lang::Native
    );
}

/// Prints unwinding throughput over this test's own stack (not a pass/fail check):
/// `cargo test -p fdtrace --release --lib stack::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark, prints stacks/s"]
fn throughput() {
    let (capture, _) = stack_test_outer();
    let pid = std::process::id();
    let mut unwinder = Unwinder::new();
    unwinder.refresh(pid).unwrap();
    let depth = unwinder
        .unwind(pid, capture.ip, capture.sp, capture.bp, &capture.stack)
        .len();
    let iterations = 1_000_000;
    let started = Instant::now();
    for _ in 0..iterations {
        let frames = unwinder.unwind(
            pid,
            capture.ip,
            capture.sp,
            capture.bp,
            black_box(&capture.stack),
        );
        black_box(frames);
    }
    let elapsed = started.elapsed();
    println!(
        "{depth} frames: {:.0} stacks/s ({:.0} ns/stack)",
        f64::from(iterations) / elapsed.as_secs_f64(),
        elapsed.as_nanos() as f64 / f64::from(iterations),
    );
}

#[test]
fn a_containers_module_is_read_only_from_the_path_given_for_it() {
    let (getpid, libc) = libc_getpid();
    let path = libc.path.as_deref().unwrap();
    // The same path in a container is another file: a name keyed by its identity.
    let module = super::namespaced_module(path, libc.dev, libc.inode);
    assert_eq!(super::display_path(&module), path);
    let raw = RawFrame {
        module: Some(module.clone()),
        file_offset: getpid - libc.start + libc.offset,
        addr: getpid,
    };
    let mut symbolizer = Symbolizer::new();
    // Without a path to read it by, the host's file of that name is not used.
    let unnamed = symbolizer.symbolize(std::slice::from_ref(&raw));
    assert_eq!(unnamed[0].function, None, "{unnamed:#?}");
    assert!(unnamed[0].module.as_deref().unwrap().starts_with("libc.so"));
    // Given one (the unwinder's kept descriptor of the container's file), it is.
    let mut other = Symbolizer::new();
    let named = other.symbolize_with(std::slice::from_ref(&raw), &|m| {
        (m == &*module).then(|| path.to_owned())
    });
    assert!(function(&named[0]).contains("getpid"), "{named:#?}");
}
