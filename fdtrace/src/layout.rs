//! The running kernel's layouts, as the probes need them: tracepoint record fields from
//! tracefs format files, and the two kernel struct members the exit probe reads on kernels
//! whose exit record lacks `group_dead`, from BTF. Nothing here is an offset copied from one
//! machine: where a field is missing the probes refuse to load, naming it.

use std::{fs, path::Path};

use fdtrace_common::{KernelLayout, NO_FIELD};
use thiserror::Error;

/// What the kernel did not tell us, each the one line a user on an odd kernel can send in.
#[derive(Debug, Error)]
pub enum LayoutError {
    #[error("reading the {tracepoint} tracepoint's format ({path}): {source}")]
    Format {
        tracepoint: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "this kernel's {tracepoint} tracepoint has no usable `{field}` field ({why}): fdtrace does not support this kernel yet"
    )]
    Field {
        tracepoint: &'static str,
        field: &'static str,
        why: String,
    },
    #[error("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {0}")]
    Btf(String),
    #[error(
        "the kernel's BTF has no {0}.{1}, which the probes read: fdtrace does not support this kernel yet"
    )]
    BtfMember(&'static str, &'static str),
}

/// One field of a tracepoint record, as its format file describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The declaration before the name, e.g. `pid_t` or `__data_loc char[]`.
    pub ty: String,
    pub offset: u32,
    pub size: u32,
}

/// Parses `field:TYPE NAME; offset:N; size:N; signed:N;` lines into (name, field).
pub fn parse_format(text: &str) -> Vec<(String, Field)> {
    text.lines()
        .filter_map(|line| {
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in line.trim().split(';') {
                let part = part.trim();
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d.trim());
                } else if let Some(o) = part.strip_prefix("offset:") {
                    offset = o.parse().ok();
                } else if let Some(s) = part.strip_prefix("size:") {
                    size = s.parse().ok();
                }
            }
            let decl = decl?;
            // The name is the last word, an array suffix (`comm[16]`) dropped.
            let (ty, name) = decl.rsplit_once(' ')?;
            let name = name.split('[').next()?;
            let ty = if decl.ends_with(']') && !ty.ends_with("[]") {
                format!("{ty}[]")
            } else {
                ty.to_string()
            };
            Some((
                name.to_string(),
                Field {
                    ty,
                    offset: offset?,
                    size: size?,
                },
            ))
        })
        .collect()
}

/// Reads a tracepoint's fields from tracefs (which the caller has made sure is mounted).
fn tracepoint_fields(
    tracefs: &Path,
    tracepoint: &'static str,
) -> Result<Vec<(String, Field)>, LayoutError> {
    let path = tracefs.join("events").join(tracepoint).join("format");
    let text = fs::read_to_string(&path).map_err(|source| LayoutError::Format {
        tracepoint,
        path: path.display().to_string(),
        source,
    })?;
    Ok(parse_format(&text))
}

/// A field that must exist with `size` bytes; `data_loc` asks for a `__data_loc` string.
fn required(
    fields: &[(String, Field)],
    tracepoint: &'static str,
    field: &'static str,
    size: u32,
    data_loc: bool,
) -> Result<u32, LayoutError> {
    let err = |why: String| LayoutError::Field {
        tracepoint,
        field,
        why,
    };
    let (_, f) = fields
        .iter()
        .find(|(name, _)| name == field)
        .ok_or_else(|| err("absent".into()))?;
    if f.size != size {
        return Err(err(format!("{} bytes, expected {size}", f.size)));
    }
    if data_loc != f.ty.starts_with("__data_loc") {
        return Err(err(format!("declared `{}`", f.ty)));
    }
    Ok(f.offset)
}

/// Which way the layout was found, for the log and `--version --verbose`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitSource {
    /// `group_dead` in the exit record (kernels since 6.16).
    RecordField,
    /// `task->signal->live`, offsets from BTF (older kernels, or forced for testing).
    SignalLive,
}

/// Reads every offset the probes use from the running kernel. `force_btf_exit` takes the
/// older kernels' path for the exit probe even where the record has the field, so that path
/// is tested on any kernel.
pub fn detect(
    tracefs: &Path,
    force_btf_exit: bool,
) -> Result<(KernelLayout, ExitSource), LayoutError> {
    const FORK: &str = "sched/sched_process_fork";
    const EXEC: &str = "sched/sched_process_exec";
    const EXIT: &str = "sched/sched_process_exit";
    let fork = tracepoint_fields(tracefs, FORK)?;
    let exec = tracepoint_fields(tracefs, EXEC)?;
    let exit = tracepoint_fields(tracefs, EXIT)?;
    let mut layout = KernelLayout {
        fork_child_pid: required(&fork, FORK, "child_pid", 4, false)?,
        exec_filename: required(&exec, EXEC, "filename", 4, true)?,
        exit_group_dead: NO_FIELD,
        ..KernelLayout::default()
    };
    let btf = fs::read("/sys/kernel/btf/vmlinux").map_err(|e| LayoutError::Btf(e.to_string()))?;
    let btf = BtfTypes::parse(&btf).map_err(LayoutError::Btf)?;
    let member = |name: &'static str, member: &'static str| {
        btf.member_offset(name, member)
            .ok_or(LayoutError::BtfMember(name, member))
    };
    layout.task_files = member("task_struct", "files")?;
    layout.files_fdt = member("files_struct", "fdt")?;
    layout.fdt_max_fds = member("fdtable", "max_fds")?;
    layout.fdt_fd = member("fdtable", "fd")?;
    layout.fdt_open_fds = member("fdtable", "open_fds")?;
    layout.task_mm = member("task_struct", "mm")?;
    layout.mm_start_code = member("mm_struct", "start_code")?;
    layout.mm_start_brk = member("mm_struct", "start_brk")?;
    tcp_layout(&btf, &mut layout);
    listen_layout(&btf, &mut layout);
    upstream_layout(&btf, &mut layout);
    exchange_layout(tracefs, &btf, &mut layout);
    let group_dead = exit.iter().any(|(name, _)| name == "group_dead");
    if group_dead && !force_btf_exit {
        layout.exit_group_dead = required(&exit, EXIT, "group_dead", 1, false)?;
        return Ok((layout, ExitSource::RecordField));
    }
    layout.task_signal = member("task_struct", "signal")?;
    layout.signal_live = member("signal_struct", "live")?;
    Ok((layout, ExitSource::SignalLive))
}

/// The offsets of `members` (struct, member), or None when the kernel's BTF lacks one: for
/// what the probes read only to say more, which works without them (logging `what` is off).
fn optional_members<const N: usize>(
    btf: &BtfTypes<'_>,
    members: [(&str, &str); N],
    what: &str,
) -> Option<[u32; N]> {
    let mut offsets = [0; N];
    for (offset, (name, member)) in offsets.iter_mut().zip(members) {
        let Some(found) = btf.member_offset(name, member) else {
            log::info!("probes: the kernel's BTF has no {name}.{member}: {what}");
            return None;
        };
        *offset = found;
    }
    Some(offsets)
}

/// The socket members the accept and close probes read to tell a connection closed
/// unanswered at the limit. `struct sock` begins with its `sock_common`, and `tcp_sock` with
/// its `sock`, so each offset counts from the same address.
fn tcp_layout(btf: &BtfTypes<'_>, layout: &mut KernelLayout) {
    let members = [
        ("file", "private_data"),
        ("socket", "sk"),
        ("sock", "sk_protocol"),
        ("tcp_sock", "copied_seq"),
        ("tcp_sock", "write_seq"),
        ("tcp_sock", "rcv_nxt"),
        ("sock_common", "skc_dport"),
    ];
    let off = "connections closed unanswered at the limit are not counted";
    let Some([private_data, sk, protocol, copied, write, rcv_nxt, dport]) =
        optional_members(btf, members, off)
    else {
        layout.tcp_copied_seq = NO_FIELD;
        return;
    };
    layout.file_private_data = private_data;
    layout.socket_sk = sk;
    layout.sk_protocol = protocol;
    layout.tcp_copied_seq = copied;
    layout.tcp_write_seq = write;
    layout.tcp_rcv_nxt = rcv_nxt;
    layout.sk_dport = dport;
}

/// The listening socket's members an accept failing at the limit reads.
fn listen_layout(btf: &BtfTypes<'_>, layout: &mut KernelLayout) {
    let members = [
        ("file", "private_data"),
        ("socket", "sk"),
        ("sock", "sk_ack_backlog"),
        ("sock", "sk_max_ack_backlog"),
        ("sock_common", "skc_family"),
        ("sock_common", "skc_rcv_saddr"),
        ("sock_common", "skc_num"),
    ];
    let off = "accept failures do not show the listen queue";
    let Some([private_data, sk, queued, backlog, family, saddr, num]) =
        optional_members(btf, members, off)
    else {
        layout.sk_ack_backlog = NO_FIELD;
        return;
    };
    layout.file_private_data = private_data;
    layout.socket_sk = sk;
    layout.sk_ack_backlog = queued;
    layout.sk_max_ack_backlog = backlog;
    layout.sk_family = family;
    layout.sk_rcv_saddr = saddr;
    layout.sk_num = num;
}

/// The socket members getsockopt(SO_ERROR) reads to name the peer of a failed non-blocking
/// connect (nginx's upstream failures).
fn upstream_layout(btf: &BtfTypes<'_>, layout: &mut KernelLayout) {
    let members = [
        ("file", "private_data"),
        ("socket", "sk"),
        ("sock_common", "skc_family"),
        ("sock_common", "skc_dport"),
        ("sock_common", "skc_daddr"),
        ("sock_common", "skc_v6_daddr"),
    ];
    let off = "failed non-blocking connects come without the address they tried";
    let Some([private_data, sk, family, dport, daddr, v6_daddr]) =
        optional_members(btf, members, off)
    else {
        layout.sk_daddr = NO_FIELD;
        return;
    };
    layout.file_private_data = private_data;
    layout.socket_sk = sk;
    layout.sk_family = family;
    layout.sk_dport = dport;
    layout.sk_daddr = daddr;
    layout.sk_v6_daddr = v6_daddr;
}

/// What the state probe reads to tell how an outbound connection ended: the socket's error
/// and byte counts from BTF, and the `sock/inet_sock_set_state` record's fields.
fn exchange_layout(tracefs: &Path, btf: &BtfTypes<'_>, layout: &mut KernelLayout) {
    const STATE: &str = "sock/inet_sock_set_state";
    let off = "upstream timeouts, resets and early closes are not reported";
    layout.tcp_bytes_received = NO_FIELD;
    let members = [
        ("file", "private_data"),
        ("socket", "sk"),
        ("sock", "sk_protocol"),
        ("sock", "sk_err"),
        ("tcp_sock", "bytes_sent"),
        ("tcp_sock", "bytes_received"),
    ];
    let Some([private_data, sk, protocol, err, sent, received]) =
        optional_members(btf, members, off)
    else {
        return;
    };
    let record = (|| {
        let fields = tracepoint_fields(tracefs, STATE)?;
        Ok::<_, LayoutError>([
            required(&fields, STATE, "skaddr", 8, false)?,
            required(&fields, STATE, "oldstate", 4, false)?,
            required(&fields, STATE, "newstate", 4, false)?,
            required(&fields, STATE, "protocol", 2, false)?,
        ])
    })();
    let [skaddr, oldstate, newstate, state_protocol] = match record {
        Ok(offsets) => offsets,
        Err(e) => {
            log::info!("probes: {e}: {off}");
            return;
        }
    };
    layout.file_private_data = private_data;
    layout.socket_sk = sk;
    layout.sk_protocol = protocol;
    layout.sk_err = err;
    layout.tcp_bytes_sent = sent;
    layout.tcp_bytes_received = received;
    layout.state_skaddr = skaddr;
    layout.state_oldstate = oldstate;
    layout.state_newstate = newstate;
    layout.state_protocol = state_protocol;
}

/// Just enough of a BTF blob to find struct members by name: the type section walked once,
/// keeping the structs and unions, and what their anonymous members lead to.
pub struct BtfTypes<'a> {
    strings: &'a [u8],
    /// Per type id (index; 0 is void): the struct or union's name offset and members, or None
    /// for every other kind.
    types: Vec<Option<Aggregate>>,
}

struct Aggregate {
    name: u32,
    /// (name offset, type id, bit offset).
    members: Vec<(u32, u32, u32)>,
}

// Kinds, from include/uapi/linux/btf.h.
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

impl<'a> BtfTypes<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, String> {
        let u32_at = |at: usize| -> Result<u32, String> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| format!("truncated at byte {at}"))
        };
        if data.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err("not little-endian BTF (bad magic)".into());
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_at = hdr_len + type_off;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or("string section out of bounds")?;
        let mut types = vec![None];
        let mut at = types_at;
        while at < types_at + type_len {
            let name = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 != 0;
            at += 12;
            let mut aggregate = None;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(m + 8)?;
                        // With kind_flag the high byte is a bitfield's size.
                        let bits = if kind_flag {
                            offset & 0x00ff_ffff
                        } else {
                            offset
                        };
                        members.push((u32_at(m)?, u32_at(m + 4)?, bits));
                    }
                    aggregate = Some(Aggregate { name, members });
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
                2 | 7..=12 | 16 | 18 => 0,
                other => return Err(format!("unknown BTF kind {other}")),
            };
            types.push(aggregate);
            at += extra;
        }
        Ok(Self { strings, types })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// The byte offset of `member` in the first struct named `name` that has it (vmlinux has
    /// one of each; modules' BTF is not read). Members of anonymous structs and unions inside
    /// it count as its own, as C sees them (mm_struct keeps its fields in one).
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        self.types
            .iter()
            .flatten()
            .filter(|a| a.name != 0 && self.name(a.name) == name.as_bytes())
            .find_map(|a| self.find_member(a, member.as_bytes(), 0))
            .map(|bits| bits / 8)
    }

    fn find_member(&self, aggregate: &Aggregate, member: &[u8], depth: u32) -> Option<u32> {
        for &(name, ty, bits) in &aggregate.members {
            if name != 0 && self.name(name) == member {
                return Some(bits);
            }
            if name == 0
                && depth < 8
                && let Some(Some(inner)) = self.types.get(ty as usize)
                && let Some(found) = self.find_member(inner, member, depth + 1)
            {
                return Some(bits + found);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORK_6_1: &str = "name: sched_process_fork
ID: 288
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;

print fmt: \"comm=%s pid=%d child_comm=%s child_pid=%d\", REC->parent_comm, REC->parent_pid, REC->child_comm, REC->child_pid
";

    const FORK_6_18: &str = "format:
\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
";

    #[test]
    fn fork_child_pid_moves_between_kernels_and_is_found_in_both() {
        let old = parse_format(FORK_6_1);
        let new = parse_format(FORK_6_18);
        let fork = "sched/sched_process_fork";
        assert_eq!(required(&old, fork, "child_pid", 4, false).unwrap(), 44);
        assert_eq!(required(&new, fork, "child_pid", 4, false).unwrap(), 20);
        let comm = old.iter().find(|(n, _)| n == "child_comm").unwrap();
        assert_eq!(comm.1.ty, "char[]");
        assert_eq!(comm.1.size, 16);
    }

    #[test]
    fn a_missing_or_resized_field_is_refused_by_name() {
        let fields = parse_format(FORK_6_18);
        let fork = "sched/sched_process_fork";
        let err = required(&fields, fork, "child_tgid", 4, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this kernel's sched/sched_process_fork tracepoint has no usable `child_tgid` field \
             (absent): fdtrace does not support this kernel yet"
        );
        let err = required(&fields, fork, "child_pid", 8, false).unwrap_err();
        assert!(err.to_string().contains("4 bytes, expected 8"), "{err}");
        let err = required(&fields, fork, "child_comm", 4, false).unwrap_err();
        assert!(err.to_string().contains("__data_loc"), "{err}");
    }

    #[test]
    fn this_kernels_layout_is_read() {
        // Skipped quietly only where tracefs is not readable (an unprivileged build machine);
        // the root tests load the probes with this layout on every kernel of the matrix.
        let tracefs = Path::new("/sys/kernel/tracing");
        if !tracefs.join("events/sched").exists() {
            eprintln!("tracefs not mounted: layout detection is exercised by the root tests");
            return;
        }
        let (auto, _) = detect(tracefs, false).unwrap();
        let (btf, source) = detect(tracefs, true).unwrap();
        assert_eq!(source, ExitSource::SignalLive);
        assert_eq!(auto.fork_child_pid, btf.fork_child_pid);
        assert!(btf.task_signal > 0 && btf.signal_live < 4096, "{btf:?}");
        // The sequence numbers are three different u32s somewhere inside tcp_sock.
        let seqs = [auto.tcp_copied_seq, auto.tcp_write_seq, auto.tcp_rcv_nxt];
        assert!(seqs.iter().all(|&s| s > 0 && s < 8192), "{auto:?}");
        assert!(seqs[0] != seqs[1] && seqs[1] != seqs[2] && seqs[0] != seqs[2]);
    }

    #[test]
    fn btf_of_a_tiny_struct() {
        // struct s { int a; long b; union { int c; }; } with its types, built by hand; the
        // anonymous union is type 2, s type 3.
        let strings = b"\0int\0s\0a\0b\0c\0";
        let mut types = Vec::new();
        let mut ty = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        ty(&[1, KIND_INT << 24, 4, 32]); // 1: int
        ty(&[0, (KIND_UNION << 24) | 1, 4, 11, 1, 0]); // 2: union { c @0 }
        ty(&[5, (KIND_STRUCT << 24) | 3, 24, 7, 1, 0, 9, 1, 64, 0, 2, 128]); // 3: s
        let mut blob = vec![0x9f, 0xeb, 1, 0];
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        let btf = BtfTypes::parse(&blob).unwrap();
        assert_eq!(btf.member_offset("s", "a"), Some(0));
        assert_eq!(btf.member_offset("s", "b"), Some(8));
        assert_eq!(
            btf.member_offset("s", "c"),
            Some(16),
            "through the anonymous union"
        );
        assert_eq!(btf.member_offset("s", "d"), None);
        assert_eq!(btf.member_offset("t", "a"), None);
    }
}
