//! Revoke ends access: destroys an agent's established TCP connections and connected UDP
//! sockets to a destination with sock_diag SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY), in every
//! network namespace its processes use. Sockets are the agent's when a process of its cgroup
//! subtree holds them (by inode, from /proc/PID/fd).

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

use agent_common::proto;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const TCP_ESTABLISHED: u32 = 1;

/// What a revoked grant allowed: its destination, ports and protocols.
pub trait Target: Sync {
    fn covers(&self, addr: IpAddr, port: u16, protocol: u32) -> bool;
}

impl Target for super::grants::LiveGrant {
    fn covers(&self, addr: IpAddr, port: u16, protocol: u32) -> bool {
        super::grants::LiveGrant::covers(self, addr, port, protocol)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    iface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
struct Request {
    hdr: NlMsgHdr,
    req: DiagReq,
}

/// Destroys the agent's sockets that `targets` cover; returns how many. The agent is the
/// cgroup directory `cgroup` (and everything below it).
pub fn destroy(cgroup: &Path, targets: &[&dyn Target]) -> io::Result<u64> {
    // Network namespace (by inode) -> (a /proc/PID/ns/net to enter, the agent's socket inodes).
    let mut by_ns: BTreeMap<u64, (std::path::PathBuf, HashSet<u64>)> = BTreeMap::new();
    for pid in pids_below(cgroup) {
        let ns = format!("/proc/{pid}/ns/net");
        let Ok(meta) = std::fs::metadata(&ns) else {
            continue;
        };
        let inodes = socket_inodes(pid);
        if inodes.is_empty() {
            continue;
        }
        by_ns
            .entry(meta.ino())
            .or_insert_with(|| (ns.clone().into(), HashSet::new()))
            .1
            .extend(inodes);
    }
    let own_ns = std::fs::metadata("/proc/self/ns/net")?.ino();
    let mut total = 0;
    for (ino, (ns_path, inodes)) in by_ns {
        total += if ino == own_ns {
            destroy_here(&inodes, targets)?
        } else {
            in_namespace(&ns_path, &inodes, targets)?
        };
    }
    Ok(total)
}

/// Runs the destruction in another network namespace, on a thread of its own (setns changes
/// only the calling thread, which ends right after).
fn in_namespace(ns: &Path, inodes: &HashSet<u64>, targets: &[&dyn Target]) -> io::Result<u64> {
    let ns_file = File::open(ns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a valid namespace fd; affects this thread only.
            if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            destroy_here(inodes, targets)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// The processes of a cgroup subtree.
fn pids_below(cgroup: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = vec![cgroup.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids
}

/// Inodes of the sockets a process holds.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// In the calling thread's namespace: dumps TCP and UDP sockets of both families, destroys the
/// agent's that a target covers.
fn destroy_here(inodes: &HashSet<u64>, targets: &[&dyn Target]) -> io::Result<u64> {
    let nl = open()?;
    let mut n = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for (protocol, bit, states) in [
            (libc::IPPROTO_TCP as u8, proto::TCP, !(1u32 << TCP_LISTEN)),
            (libc::IPPROTO_UDP as u8, proto::UDP, 1u32 << TCP_ESTABLISHED),
        ] {
            let req = DiagReq {
                family,
                protocol,
                states,
                ..Default::default()
            };
            for m in dump(&nl, &req)? {
                if !inodes.contains(&u64::from(m.inode)) {
                    continue;
                }
                let dst = addr_of(m.family, &m.id.dst);
                let port = u16::from_be_bytes(m.id.dport);
                if targets.iter().any(|t| t.covers(dst, port, bit)) {
                    let kill = DiagReq {
                        family: m.family,
                        protocol,
                        states: u32::MAX,
                        id: m.id,
                        ..Default::default()
                    };
                    match send_destroy(&nl, &kill) {
                        Ok(()) => n += 1,
                        // Closed meanwhile.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    Ok(n)
}

fn addr_of(family: u8, raw: &[u8; 16]) -> IpAddr {
    if family == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let v6 = Ipv6Addr::from(*raw);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

fn open() -> io::Result<OwnedFd> {
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

fn dump(nl: &OwnedFd, req: &DiagReq) -> io::Result<Vec<DiagMsg>> {
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

fn send_destroy(nl: &OwnedFd, req: &DiagReq) -> io::Result<()> {
    send(nl, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, req)?;
    receive(nl, |ty, payload| match ty {
        NLMSG_ERROR => Some(match error_code(payload) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(-e)),
        }),
        _ => None,
    })
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
