//! The few bpf() commands aya 0.14 does not offer: opening a pinned object, pinning a raw link,
//! swapping a link's program, and loading and attaching a program with an attach type aya does
//! not know (the Unix-socket hooks).

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

// enum bpf_cmd in include/uapi/linux/bpf.h.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// enum bpf_prog_type
pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// enum bpf_attach_type
pub const BPF_CGROUP_UNIX_CONNECT: u32 = 49;
pub const BPF_CGROUP_UNIX_SENDMSG: u32 = 50;

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The BPF_PROG_LOAD part of `union bpf_attr`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}
const _: () = assert!(size_of::<ProgLoadAttr>() == 72);

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a repr(C) bpf_attr prefix for `cmd`, valid for its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Takes ownership of a descriptor the kernel just returned.
fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: a new descriptor from a successful bpf() call, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens a pinned object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// Pins an object at `path` (BPF_OBJ_PIN).
pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Replaces a link's program in one step (BPF_LINK_UPDATE): the hook never runs neither.
pub fn link_update(link: impl AsFd, prog: impl AsFd) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: prog.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Attaches `prog` to `target` (a cgroup) with a bpf link (BPF_LINK_CREATE); links coexist with
/// every other program on the cgroup.
pub fn link_create(prog: impl AsFd, target: impl AsFd, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_fd().as_raw_fd() as u32,
        target_fd: target.as_fd().as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Loads a relocated program (BPF_PROG_LOAD). On a verifier refusal the error carries the end
/// of the verifier's log.
pub fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    insns: &[u8],
) -> io::Result<OwnedFd> {
    const INSN_BYTES: usize = 8;
    let license = CString::new("GPL").expect("no NUL");
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: (insns.len() / INSN_BYTES) as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(first) => {
            // Again with the verifier's log, to say why.
            let mut log = vec![0u8; 1 << 20];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            if let Ok(fd) = bpf(BPF_PROG_LOAD, &mut attr) {
                return Ok(owned(fd));
            }
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(io::Error::new(
                first.kind(),
                format!("{first}; verifier: {}", tail.join(" | ")),
            ))
        }
    }
}
