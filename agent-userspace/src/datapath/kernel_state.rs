//! What the kernel enforces right now, read back from it (not from the controller's memory):
//! the pinned links and whether each is still attached. `status` shows it, so pins removed or
//! links detached behind the controller's back are visible.

use std::{io, os::fd::AsRawFd, path::Path};

use serde::Serialize;

/// One program's link as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkState {
    pub program: &'static str,
    /// Its pin exists in the pin directory (always false when nothing is pinned).
    pub pinned: bool,
    /// The link is attached: a cgroup link with a live cgroup, or a held/pinned tracing link.
    pub attached: bool,
}

/// The kernel side of `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KernelState {
    /// Programs and maps are pinned (enforcement outlives the controller).
    pub pinned: bool,
    pub links: Vec<LinkState>,
}

impl KernelState {
    /// Why the kernel does not enforce what the controller means it to (empty: it does).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for l in &self.links {
            if self.pinned && !l.pinned {
                out.push(format!("the link of {} is not pinned", l.program));
            }
            if !l.attached {
                out.push(format!("{} is not attached", l.program));
            }
        }
        out
    }
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the cgroup member of its union (aligned to 8).
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
    _rest: [u64; 6],
}

/// Whether the link pinned at `path` is attached: a cgroup link whose cgroup is gone or that
/// was detached reports cgroup id 0. Err when the pin cannot be opened.
pub fn pinned_link_attached(path: &Path) -> io::Result<bool> {
    let fd = super::sys::obj_get(path)?;
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD with a valid fd and an info buffer of the length given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.link_type != BPF_LINK_TYPE_CGROUP || info.cgroup_id != 0)
}
