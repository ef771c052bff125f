//! The Unix-socket hooks, cgroup/connect_unix and cgroup/sendmsg_unix (Linux 6.7+), which aya 0.14
//! cannot load: it has no attach type for them. Their code is in the same object as the other
//! programs; aya-obj relocates it against the maps aya created for that object, and it is loaded
//! and attached here with the bpf() calls aya would make.

use std::{
    collections::HashSet,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use agent_common::names;
use aya::{maps::Map, Ebpf};
use thiserror::Error;

use super::{btf, sys};

/// The programs with their attach types.
pub const PROGRAMS: [(&str, u32); 2] = [
    (names::CONNECT_UNIX_PROGRAM, sys::BPF_CGROUP_UNIX_CONNECT),
    (names::SENDMSG_UNIX_PROGRAM, sys::BPF_CGROUP_UNIX_SENDMSG),
];

#[derive(Debug, Error)]
pub enum UnixHookError {
    #[error("reading the kernel's layout of struct bpf_sock_addr_kern: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("relocating the Unix-socket programs: {0}")]
    Object(String),
    #[error("the eBPF object has no program {0}")]
    Missing(&'static str),
    #[error("loading program {0}: {1}")]
    Load(&'static str, std::io::Error),
    #[error("attaching program {0}: {1}")]
    Attach(&'static str, std::io::Error),
}

/// Where the kernel keeps the caller's address and its length in `struct bpf_sock_addr_kern`,
/// the real context of a sock_addr program. `None`: this kernel has no Unix-socket hooks
/// (`uaddrlen` came with them, in 6.7).
pub fn kernel_context_offsets() -> Result<Option<(u64, u64)>, UnixHookError> {
    match btf::kernel_member_offsets("bpf_sock_addr_kern", &["uaddr", "uaddrlen"]) {
        Ok(v) => Ok(Some((v[0] as u64, v[1] as u64))),
        Err(btf::BtfError::NoMember(..)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// One loaded Unix-socket program.
pub struct UnixProgram {
    pub name: &'static str,
    pub attach_type: u32,
    pub fd: OwnedFd,
}

impl UnixProgram {
    /// Attaches to `cgroup` with a bpf link; the link detaches when its last descriptor and
    /// pin are gone.
    pub fn attach(&self, cgroup: impl AsFd) -> Result<OwnedFd, UnixHookError> {
        sys::link_create(&self.fd, cgroup, self.attach_type)
            .map_err(|e| UnixHookError::Attach(self.name, e))
    }
}

/// A descriptor for each kind of map the object defines (aya's `Map` has no generic accessor).
fn map_fd(map: &Map) -> Option<BorrowedFd<'_>> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::LpmTrie(m)
        | Map::PerCpuArray(m)
        | Map::RingBuf(m) => Some(m.fd().as_fd()),
        _ => None,
    }
}

/// Relocates the Unix-socket programs of `object` against the maps of `ebpf` (loaded from the
/// same object, maps not taken yet) and loads them.
pub fn load(object: &[u8], ebpf: &Ebpf) -> Result<Vec<UnixProgram>, UnixHookError> {
    let err = |e: &dyn std::fmt::Display| UnixHookError::Object(e.to_string());
    let mut obj = aya_obj::Object::parse(object).map_err(|e| err(&e))?;
    let specs = obj.maps.clone();
    let fds: Vec<(&str, i32)> = ebpf
        .maps()
        .filter_map(|(name, map)| map_fd(map).map(|fd| (name, fd.as_raw_fd())))
        .collect();
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_maps(
        fds.iter()
            .filter_map(|(name, fd)| specs.get(*name).map(|spec| (*name, *fd, spec))),
        &text_sections,
    )
    .map_err(|e| err(&e))?;
    obj.relocate_calls(&text_sections).map_err(|e| err(&e))?;
    PROGRAMS
        .iter()
        .map(|&(name, attach_type)| {
            let prog = obj.programs.get(name).ok_or(UnixHookError::Missing(name))?;
            let function = obj
                .functions
                .get(&prog.function_key())
                .ok_or(UnixHookError::Missing(name))?;
            let insns = &function.instructions;
            // SAFETY: bpf_insn is a plain 8-byte repr(C) struct; the slice covers exactly them.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    insns.as_ptr() as *const u8,
                    std::mem::size_of_val(insns.as_slice()),
                )
            };
            let fd = sys::prog_load(
                sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                attach_type,
                name,
                bytes,
            )
            .map_err(|e| UnixHookError::Load(name, e))?;
            Ok(UnixProgram {
                name,
                attach_type,
                fd,
            })
        })
        .collect()
}
