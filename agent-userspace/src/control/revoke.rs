//! Revoke ends access: destroys an agent's established TCP connections and connected UDP
//! sockets to a destination with sock_diag SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY), in every
//! network namespace its processes use. Sockets are the agent's when a process of its cgroup
//! subtree holds them (by inode, from /proc/PID/fd).

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    io,
    net::IpAddr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
};

use agent_common::proto;

const TCP_LISTEN: u32 = 10;
const TCP_ESTABLISHED: u32 = 1;

use crate::datapath::sock_diag::{addr_of, dump, open, send_destroy, DiagReq};

/// What a revoked grant allowed: its destination, ports and protocols.
pub trait Target: Sync {
    fn covers(&self, addr: IpAddr, port: u16, protocol: u32) -> bool;
}

impl Target for super::grants::LiveGrant {
    fn covers(&self, addr: IpAddr, port: u16, protocol: u32) -> bool {
        super::grants::LiveGrant::covers(self, addr, port, protocol)
    }
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
