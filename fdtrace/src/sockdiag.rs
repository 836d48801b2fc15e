//! TCP listeners with their backlog, from the kernel's sock_diag netlink interface (what
//! `ss -lnt` reads): /proc/net/tcp shows a listener's queue but not its backlog.
//!
//! The request asks for TCP sockets in LISTEN state of one address family; each answer is an
//! `inet_diag_msg`, whose `rqueue` is the listener's accept queue and `wqueue` its backlog
//! (include/uapi/linux/inet_diag.h, net/ipv4/inet_diag.c). Queries run in fdtrace's own network
//! namespace: the caller falls back to /proc for processes in another one.

use std::{io, net::Ipv4Addr, net::Ipv6Addr, os::fd::AsRawFd as _, os::fd::FromRawFd as _};

use crate::procfs::TcpListener;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const TCP_LISTEN: u32 = 10;
const NLMSG_HDRLEN: usize = 16;
/// `inet_diag_req_v2`: family, protocol, ext, pad (1 byte each), states (u32), then the
/// 48-byte `inet_diag_sockid`.
const REQ_LEN: usize = 4 + 4 + 48;
/// `inet_diag_msg`: family, state, timer, retrans, the sockid, expires, rqueue, wqueue, uid,
/// inode.
const MSG_LEN: usize = 4 + 48 + 5 * 4;

/// The TCP listeners of this network namespace, both address families.
pub fn tcp_listeners() -> io::Result<Vec<TcpListener>> {
    let mut out = query(libc::AF_INET as u8)?;
    out.extend(query(libc::AF_INET6 as u8)?);
    Ok(out)
}

fn query(family: u8) -> io::Result<Vec<TcpListener>> {
    // SAFETY: a plain socket call; the descriptor is owned by the File below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just created and owned by nothing else.
    let socket = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut request = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    request.extend(((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    request.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend(((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    request.extend(1u32.to_ne_bytes()); // sequence
    request.extend(0u32.to_ne_bytes()); // port id: the kernel's
    request.extend([family, libc::IPPROTO_TCP as u8, 0, 0]);
    request.extend((1u32 << TCP_LISTEN).to_ne_bytes());
    request.extend([0u8; 48]);
    // SAFETY: sending a buffer we own to a socket we own.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 << 10];
    loop {
        // SAFETY: receiving into a buffer we own.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut at = 0;
        let data = &buf[..n as usize];
        while at + NLMSG_HDRLEN <= data.len() {
            let len = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(data[at + 4..at + 6].try_into().unwrap());
            if len < NLMSG_HDRLEN || at + len > data.len() {
                return Err(io::Error::other("a truncated sock_diag answer"));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => return Err(io::Error::other("sock_diag refused the request")),
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(l) = parse(&data[at + NLMSG_HDRLEN..at + len]) {
                        out.push(l);
                    }
                }
                _ => {}
            }
            // Messages are 4-aligned.
            at += (len + 3) & !3;
        }
    }
}

/// One `inet_diag_msg`.
fn parse(msg: &[u8]) -> Option<TcpListener> {
    if msg.len() < MSG_LEN {
        return None;
    }
    let u32_at = |i: usize| u32::from_ne_bytes(msg[i..i + 4].try_into().unwrap());
    let port = u16::from_be_bytes([msg[4], msg[5]]);
    let src = &msg[8..24];
    let address = match msg[0] {
        f if i32::from(f) == libc::AF_INET => {
            format!("{}:{port}", Ipv4Addr::new(src[0], src[1], src[2], src[3]))
        }
        _ => {
            let bytes: [u8; 16] = src.try_into().ok()?;
            format!("[{}]:{port}", Ipv6Addr::from(bytes))
        }
    };
    // After family..retrans (4) and the sockid (48): expires, rqueue, wqueue, uid, inode.
    Some(TcpListener {
        address,
        queued: u64::from(u32_at(56)),
        backlog: u64::from(u32_at(60)),
        inode: u64::from(u32_at(68)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_of_ours_is_listed_with_its_backlog() {
        // SAFETY: plain socket calls on a descriptor this test owns.
        let (fd, port) = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            let mut len = size_of::<libc::sockaddr_in>() as u32;
            assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0);
            assert_eq!(libc::listen(fd, 7), 0);
            libc::getsockname(fd, (&raw mut addr).cast(), &raw mut len);
            (fd, u16::from_be(addr.sin_port))
        };
        let _waiting = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let found = tcp_listeners()
            .unwrap()
            .into_iter()
            .find(|l| l.address == format!("127.0.0.1:{port}"))
            .expect("our listener");
        assert_eq!((found.queued, found.backlog), (1, 7));
        assert!(found.inode > 0);
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(fd) };
    }
}
