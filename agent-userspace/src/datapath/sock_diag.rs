//! sock_diag (NETLINK_SOCK_DIAG): the kernel's socket tables, asked by netlink. Used to destroy
//! an agent's sockets on revoke, and by the DNS proxy to learn which socket sent it a query (its
//! cookie: the key under which the kernel remembered the agent that asked).

use std::{
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `INET_DIAG_NOCOOKIE`: a lookup that does not check the cookie.
const NO_COOKIE: [u32; 2] = [u32::MAX, u32::MAX];

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct NlMsgHdr {
    pub len: u32,
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct SockId {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub iface: u32,
    pub cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct DiagReq {
    pub family: u8,
    pub protocol: u8,
    pub ext: u8,
    pub pad: u8,
    pub states: u32,
    pub id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct DiagMsg {
    pub family: u8,
    pub state: u8,
    pub timer: u8,
    pub retrans: u8,
    pub id: SockId,
    pub expires: u32,
    pub rqueue: u32,
    pub wqueue: u32,
    pub uid: u32,
    pub inode: u32,
}

#[repr(C)]
pub(crate) struct Request {
    pub hdr: NlMsgHdr,
    pub req: DiagReq,
}

pub(crate) fn addr_of(family: u8, raw: &[u8; 16]) -> IpAddr {
    if family == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let v6 = Ipv6Addr::from(*raw);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

pub(crate) fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(nl: &OwnedFd, ty: u16, flags: u16, req: &DiagReq) -> io::Result<()> {
    let msg = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            ty,
            flags,
            seq: 1,
            pid: 0,
        },
        req: *req,
    };
    // SAFETY: `msg` is plain data of the given size.
    let rc = unsafe {
        libc::send(
            nl.as_raw_fd(),
            &msg as *const Request as *const libc::c_void,
            size_of::<Request>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads netlink messages until `done` says stop; each message is (type, payload).
fn receive(
    nl: &OwnedFd,
    mut each: impl FnMut(u16, &[u8]) -> Option<io::Result<()>>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            libc::recv(
                nl.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= size_of::<NlMsgHdr>() {
            // SAFETY: at least a header's bytes; read unaligned.
            let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(rest.as_ptr() as *const _) };
            let len = hdr.len as usize;
            if len < size_of::<NlMsgHdr>() || len > rest.len() {
                return Err(io::Error::other("malformed netlink message"));
            }
            if let Some(done) = each(hdr.ty, &rest[size_of::<NlMsgHdr>()..len]) {
                return done;
            }
            rest = &rest[(len + 3) & !3..];
            if rest.len() < size_of::<NlMsgHdr>() {
                break;
            }
        }
    }
}

fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

pub(crate) fn dump(nl: &OwnedFd, req: &DiagReq) -> io::Result<Vec<DiagMsg>> {
    send(nl, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, req)?;
    let mut out = Vec::new();
    receive(nl, |ty, payload| match ty {
        NLMSG_DONE => Some(Ok(())),
        NLMSG_ERROR => Some(Err(io::Error::from_raw_os_error(-error_code(payload)))),
        SOCK_DIAG_BY_FAMILY if payload.len() >= size_of::<DiagMsg>() => {
            // SAFETY: enough bytes for the plain-data struct; read unaligned.
            out.push(unsafe { std::ptr::read_unaligned(payload.as_ptr() as *const DiagMsg) });
            None
        }
        _ => None,
    })?;
    Ok(out)
}

pub(crate) fn send_destroy(nl: &OwnedFd, req: &DiagReq) -> io::Result<()> {
    send(nl, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, req)?;
    receive(nl, |ty, payload| match ty {
        NLMSG_ERROR => Some(match error_code(payload) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(-e)),
        }),
        _ => None,
    })
}

/// The cookie of the socket at `local` whose peer is `remote` (`protocol` IPPROTO_TCP or
/// IPPROTO_UDP), in the calling thread's network namespace; None when there is none. An IPv4
/// tuple also finds an IPv6 socket talking through IPv4-mapped addresses.
pub fn cookie_of(
    nl: &OwnedFd,
    protocol: u8,
    local: SocketAddr,
    remote: SocketAddr,
) -> io::Result<Option<u64>> {
    let family = match local {
        SocketAddr::V4(_) => libc::AF_INET as u8,
        SocketAddr::V6(_) => libc::AF_INET6 as u8,
    };
    // The two lookups read the tuple from opposite ends: TCP as the socket's own (local, peer),
    // UDP as a datagram to it would arrive (from the peer, to the socket).
    let (src, dst) = if protocol == libc::IPPROTO_TCP as u8 {
        (local, remote)
    } else {
        (remote, local)
    };
    let req = DiagReq {
        family,
        protocol,
        states: u32::MAX,
        id: SockId {
            sport: src.port().to_be_bytes(),
            dport: dst.port().to_be_bytes(),
            src: raw_of(src.ip()),
            dst: raw_of(dst.ip()),
            iface: 0,
            cookie: NO_COOKIE,
        },
        ..Default::default()
    };
    send(nl, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, &req)?;
    let mut found = None;
    receive(nl, |ty, payload| match ty {
        NLMSG_ERROR => Some(match -error_code(payload) {
            0 => Ok(()),
            libc::ENOENT => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }),
        SOCK_DIAG_BY_FAMILY if payload.len() >= size_of::<DiagMsg>() => {
            // SAFETY: enough bytes for the plain-data struct; read unaligned.
            let m: DiagMsg =
                unsafe { std::ptr::read_unaligned(payload.as_ptr() as *const DiagMsg) };
            found = Some(u64::from(m.id.cookie[0]) | u64::from(m.id.cookie[1]) << 32);
            Some(Ok(()))
        }
        NLMSG_DONE => Some(Ok(())),
        _ => None,
    })?;
    Ok(found)
}

fn raw_of(ip: IpAddr) -> [u8; 16] {
    let mut raw = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => raw[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => raw = v6.octets(),
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_netlink_structs_have_the_kernel_sizes() {
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<DiagReq>(), 56);
        assert_eq!(size_of::<DiagMsg>(), 72);
        assert_eq!(size_of::<NlMsgHdr>(), 16);
    }

    #[test]
    fn addresses_read_as_the_family_says() {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(
            addr_of(libc::AF_INET as u8, &raw),
            IpAddr::from([127, 0, 0, 1])
        );
        let mapped = Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 1]).octets();
        assert_eq!(
            addr_of(libc::AF_INET6 as u8, &mapped),
            IpAddr::from([127, 0, 0, 1])
        );
    }
}
