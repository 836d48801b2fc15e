//! Ring buffer records → [`Record`]s, read field by field with the layout from fdtrace-common.

use bytes::{Buf as _, Bytes, BytesMut};
use fdtrace_common::{
    AUX_MAX, CODE_COPIES, CODE_RECORD, EXIT_FDS_MAX, PY_BYTES, PY_FRAMES_MAX, PyFrame,
    RecordHeader, STACK_SKIPPED, STACKED_FIXED, StackHeader, UPSTREAM_ADDR_MAX, UpstreamRecord,
    kind,
};
use thiserror::Error;

/// A record as the probes wrote it, with the stack copy still raw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub header: RecordHeader,
    /// Present on descriptor creations and EMFILE/ENFILE failures.
    pub stack: Option<StackCapture>,
    /// Path, peer address or descriptor pair, by syscall (see `fdtrace_common::syscalls::Aux`).
    pub aux: Bytes,
    /// CPython frames of the calling thread, innermost first (CPython processes only).
    pub py: Vec<PyFrame>,
}

impl Record {
    /// What the record holds in memory: itself and its share of the arena.
    pub fn heap_bytes(&self) -> usize {
        size_of::<Self>()
            + self.aux.len()
            + self.stack.as_ref().map_or(0, |s| s.bytes.len())
            + self.py.len() * size_of::<PyFrame>()
    }
}

/// The user registers at the syscall and a copy of the stack from `sp` upwards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackCapture {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Empty when `known` is set.
    pub bytes: Bytes,
    /// The stack id the reader recognized this capture as (see `stack::StackMemo`).
    pub known: Option<u32>,
    /// The probe sent no stack because its ring was more than half full: only `ip` is known.
    pub skipped: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("record kind {0} is unknown")]
    UnknownKind(u32),
    #[error("stacked record claims {claimed} bytes but carries {len}")]
    BadLength { claimed: usize, len: usize },
}

const HEADER: usize = size_of::<RecordHeader>();

/// Decodes one record, copying what it holds into fresh memory.
pub fn decode(buf: &[u8]) -> Result<Record, DecodeError> {
    decode_into(buf, &mut BytesMut::new(), |_, _, _| None)
}

/// Decodes one record; its variable parts (aux, stack copy) are copied into `arena` and
/// shared from there. Decoding a batch into one arena makes one allocation for thousands of
/// records, where a `Vec` each for aux and stack made two per record (a quarter of fdtrace's
/// time under nginx went to malloc and free). Only the used part of a record is copied: the
/// probes reserve ring records in size classes. A native stack `recognize` knows, by (pid,
/// (ip, sp, bp), stack bytes), is not copied at all: the record carries its stack id.
pub fn decode_into(
    ring: &[u8],
    arena: &mut BytesMut,
    recognize: impl FnOnce(u32, (u64, u64, u64), &[u8]) -> Option<u32>,
) -> Result<Record, DecodeError> {
    let len = ring.len();
    if len < HEADER {
        return Err(DecodeError::Short(len));
    }
    let mut buf = ring;
    let header = RecordHeader {
        kind: buf.get_u32_ne(),
        nr: buf.get_u32_ne(),
        tgid: buf.get_u32_ne(),
        tid: buf.get_u32_ne(),
        ts_ns: buf.get_u64_ne(),
        ret: buf.get_i64_ne(),
        args: std::array::from_fn(|_| buf.get_u64_ne()),
    };
    match header.kind {
        kind::EXIT => {
            // The open-descriptor bitmap, when the probe had room for it.
            let bytes = (header.args[0] as usize).min(EXIT_FDS_MAX);
            if bytes > 0 && len >= HEADER + bytes {
                arena.extend_from_slice(&ring[HEADER..HEADER + bytes]);
            }
            Ok(Record {
                header,
                stack: None,
                aux: arena.split().freeze(),
                py: Vec::new(),
            })
        }
        kind::SYSCALL | kind::FORK => Ok(Record {
            header,
            stack: None,
            aux: Bytes::new(),
            py: Vec::new(),
        }),
        kind::STACKED | kind::EXEC => {
            if len < STACKED_FIXED {
                return Err(DecodeError::BadLength {
                    claimed: STACKED_FIXED,
                    len,
                });
            }
            let regs = StackHeader {
                ip: buf.get_u64_ne(),
                sp: buf.get_u64_ne(),
                bp: buf.get_u64_ne(),
                stack_len: buf.get_u32_ne(),
                aux_len: buf.get_u32_ne(),
                py_count: buf.get_u32_ne(),
                flags: buf.get_u32_ne(),
            };
            let py_bytes = if regs.py_count > 0 { PY_BYTES } else { 0 };
            let stack_len = regs.stack_len as usize;
            let claimed = STACKED_FIXED + py_bytes + stack_len;
            if len < claimed {
                return Err(DecodeError::BadLength { claimed, len });
            }
            let aux_len = (regs.aux_len as usize).min(AUX_MAX);
            let mut py_section = &ring[STACKED_FIXED..STACKED_FIXED + py_bytes];
            let py = (0..(regs.py_count as usize).min(PY_FRAMES_MAX))
                .map(|_| PyFrame {
                    code: py_section.get_u64_ne(),
                    instr: py_section.get_u64_ne(),
                })
                .collect();
            let aux_at = HEADER + size_of::<StackHeader>();
            let stack_at = STACKED_FIXED + py_bytes;
            let stack = &ring[stack_at..stack_at + stack_len];
            let registers = (regs.ip, regs.sp, regs.bp);
            let known = (header.kind == kind::STACKED && regs.py_count == 0)
                .then(|| recognize(header.tgid, registers, stack))
                .flatten();
            arena.extend_from_slice(&ring[aux_at..aux_at + aux_len]);
            if known.is_none() {
                arena.extend_from_slice(stack);
            }
            let mut copied = arena.split().freeze();
            let stack_bytes = copied.split_off(aux_len);
            let stack = (header.kind == kind::STACKED).then_some(StackCapture {
                ip: regs.ip,
                sp: regs.sp,
                bp: regs.bp,
                bytes: stack_bytes,
                known,
                skipped: regs.flags & STACK_SKIPPED != 0,
            });
            Ok(Record {
                header,
                stack,
                aux: copied,
                py,
            })
        }
        kind::CODE => {
            if len < CODE_RECORD {
                return Err(DecodeError::BadLength {
                    claimed: CODE_RECORD,
                    len,
                });
            }
            // The copies, in the arena like a path: `aux` holds them whole, and the header's
            // args say how much of each is meaningful.
            arena.extend_from_slice(&ring[HEADER..CODE_RECORD]);
            Ok(Record {
                header,
                stack: None,
                aux: arena.split().freeze(),
                py: Vec::new(),
            })
        }
        kind::UPSTREAM => {
            let claimed = size_of::<UpstreamRecord>();
            if len < claimed {
                return Err(DecodeError::BadLength { claimed, len });
            }
            // The address tried, in `aux` like an accept's peer.
            let addr_len = (buf.get_u32_ne() as usize).min(UPSTREAM_ADDR_MAX);
            let at = HEADER + 8;
            arena.extend_from_slice(&ring[at..at + addr_len]);
            Ok(Record {
                header,
                stack: None,
                aux: arena.split().freeze(),
                py: Vec::new(),
            })
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// The copies a [`kind::CODE`] record carries, each with the address it was read from:
/// the code object's start, its name, its file name and its line table (see
/// [`fdtrace_common::CODE_COPIES`]). Empty ones (a failed read) are left out.
pub fn code_copies(rec: &Record) -> Vec<(u64, &[u8])> {
    let a = &rec.header.args;
    let lens = [
        a[4] as u32,
        (a[4] >> 32) as u32,
        a[5] as u32,
        (a[5] >> 32) as u32,
    ];
    let addresses = [a[0], a[1], a[2], a[3]];
    let mut at = 0;
    let mut copies = Vec::with_capacity(4);
    for ((&cap, len), address) in CODE_COPIES.iter().zip(lens).zip(addresses) {
        let len = (len as usize).min(cap);
        if let Some(bytes) = rec.aux.get(at..at + len)
            && len > 0
        {
            copies.push((address, bytes));
        }
        at += cap;
    }
    copies
}

/// The inverse of [`decode`], for tests and synthetic sources.
pub fn encode(record: &Record) -> Vec<u8> {
    let h = &record.header;
    let mut out = Vec::with_capacity(STACKED_FIXED);
    for v in [h.kind, h.nr, h.tgid, h.tid] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    out.extend_from_slice(&h.ts_ns.to_ne_bytes());
    out.extend_from_slice(&h.ret.to_ne_bytes());
    for a in h.args {
        out.extend_from_slice(&a.to_ne_bytes());
    }
    let empty = StackCapture::default();
    let stack = match (&record.stack, h.kind) {
        (Some(stack), _) => Some(stack),
        (None, kind::EXEC) => Some(&empty),
        (None, _) => None,
    };
    if let Some(stack) = stack {
        for v in [stack.ip, stack.sp, stack.bp] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        let flags = if stack.skipped { STACK_SKIPPED } else { 0 };
        for v in [
            stack.bytes.len() as u32,
            record.aux.len() as u32,
            record.py.len() as u32,
            flags,
        ] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        let mut aux = [0u8; AUX_MAX];
        aux[..record.aux.len()].copy_from_slice(&record.aux);
        out.extend_from_slice(&aux);
        if !record.py.is_empty() {
            let mut py = [PyFrame::default(); PY_FRAMES_MAX];
            py[..record.py.len()].copy_from_slice(&record.py);
            for f in py {
                out.extend_from_slice(&f.code.to_ne_bytes());
                out.extend_from_slice(&f.instr.to_ne_bytes());
            }
        }
        out.extend_from_slice(&stack.bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u32) -> RecordHeader {
        RecordHeader {
            kind,
            nr: 257,
            tgid: 10,
            tid: 11,
            ts_ns: 99,
            ret: 3,
            args: [1, 2, 3, 4, 5, 6],
        }
    }

    /// A stacked record: registers 1, 2, 3 and 40 bytes of stack.
    fn stacked(aux: &'static [u8], py: Vec<PyFrame>) -> Record {
        Record {
            header: header(kind::STACKED),
            stack: Some(StackCapture {
                ip: 1,
                sp: 2,
                bp: 3,
                bytes: Bytes::from(vec![7; 40]),
                known: None,
                skipped: false,
            }),
            aux: Bytes::from_static(aux),
            py,
        }
    }

    #[test]
    fn stacked_round_trips() {
        let py = vec![
            PyFrame {
                code: 0x1001,
                instr: 0x2000,
            },
            PyFrame {
                code: 0x3000,
                instr: 0x4000,
            },
        ];
        let rec = stacked(b"/etc/hostname", py);
        assert_eq!(decode(&encode(&rec)).unwrap(), rec);
    }

    #[test]
    fn a_stack_skipped_under_load_is_told_from_stacks_off() {
        let mut rec = stacked(b"/dev/null", vec![]);
        let stack = rec.stack.as_mut().unwrap();
        stack.bytes = Bytes::new();
        stack.skipped = true;
        let decoded = decode(&encode(&rec)).unwrap();
        assert!(decoded.stack.as_ref().unwrap().skipped);
        assert_eq!(decoded, rec);
        rec.stack.as_mut().unwrap().skipped = false;
        assert!(!decode(&encode(&rec)).unwrap().stack.unwrap().skipped);
    }

    #[test]
    fn a_recognized_stack_is_not_copied() {
        let rec = stacked(b"/x", vec![]);
        let mut arena = BytesMut::new();
        let decoded = decode_into(&encode(&rec), &mut arena, |pid, regs, stack| {
            assert_eq!((pid, regs, stack.len()), (10, (1, 2, 3), 40));
            Some(5)
        })
        .unwrap();
        let stack = decoded.stack.unwrap();
        assert_eq!((stack.known, stack.bytes.len()), (Some(5), 0));
        assert_eq!(&decoded.aux[..], b"/x");
    }

    #[test]
    fn header_only_round_trips() {
        let rec = Record {
            header: header(kind::SYSCALL),
            stack: None,
            aux: Bytes::new(),
            py: vec![],
        };
        assert_eq!(encode(&rec).len(), HEADER);
        assert_eq!(decode(&encode(&rec)).unwrap(), rec);
    }

    #[test]
    fn truncated_and_unknown_are_refused() {
        assert_eq!(decode(&[0; 10]), Err(DecodeError::Short(10)));
        let mut rec = Record {
            header: header(kind::STACKED),
            stack: Some(StackCapture {
                bytes: Bytes::from(vec![1; 64]),
                ..Default::default()
            }),
            aux: Bytes::new(),
            py: vec![],
        };
        let bytes = encode(&rec);
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::BadLength { .. })
        ));
        rec.header.kind = 77;
        rec.stack = None;
        assert_eq!(decode(&encode(&rec)), Err(DecodeError::UnknownKind(77)));
    }
}
