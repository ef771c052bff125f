//! The exec tracker's view of this kernel (programs `exec_track`, `fork_track`, `exit_track` on
//! tp_btf/sched_process_{exec,fork,exit}): where the kernel keeps what they read, from its BTF,
//! and the executables of processes that exec'd before the programs were attached, from /proc.

use std::{ffi::OsStr, os::unix::ffi::OsStrExt};

use agent_common::{exe, ExePath, ProcLayout, EXE_PATH_MAX};
use aya::maps::{HashMap, MapData, MapError};

use super::btf::{self, BtfError};

/// The layout for the running kernel.
pub fn kernel_layout() -> Result<ProcLayout, BtfError> {
    let data = std::fs::read(btf::VMLINUX)
        .map_err(|e| BtfError::Read(btf::VMLINUX.into(), e.to_string()))?;
    layout_from(&data)
}

/// The layout from BTF data.
pub fn layout_from(btf_data: &[u8]) -> Result<ProcLayout, BtfError> {
    let bprm = btf::member_offsets(btf_data, "linux_binprm", &["filename"])?;
    let task = btf::member_offsets(btf_data, "task_struct", &["real_parent", "tgid", "pid"])?;
    Ok(ProcLayout {
        enabled: 1,
        bprm_filename: bprm[0],
        task_real_parent: task[0],
        task_tgid: task[1],
        task_pid: task[2],
        _reserved: 0,
    })
}

/// A map value for `path`: cut to fit (flagged), NUL-terminated, zero-filled.
pub fn exe_value(path: &[u8], flags: u32) -> ExePath {
    let mut v = ExePath {
        flags,
        _reserved: 0,
        path: [0; EXE_PATH_MAX],
    };
    let n = path.len().min(EXE_PATH_MAX - 1);
    v.path[..n].copy_from_slice(&path[..n]);
    if n < path.len() {
        v.flags |= exe::TRUNCATED;
    }
    v
}

/// Adds the executable of every process in /proc that the map does not know yet (it exec'd
/// before the programs were attached). An entry the programs wrote meanwhile is never replaced
/// (BPF_NOEXIST). Returns how many were added.
pub fn seed_from_proc(map: &mut HashMap<MapData, u32, ExePath>) -> Result<usize, MapError> {
    const BPF_NOEXIST: u64 = 1;
    let mut added = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Ok(0);
    };
    for e in dir.flatten() {
        let Some(tgid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // Kernel threads and processes gone since the listing have no exe.
        let Ok(path) = std::fs::read_link(e.path().join("exe")) else {
            continue;
        };
        let path: &OsStr = path.as_os_str();
        match map.insert(
            tgid,
            exe_value(path.as_bytes(), exe::FROM_PROC),
            BPF_NOEXIST,
        ) {
            Ok(()) => added += 1,
            // Already known (EEXIST), or the map is full (E2BIG): the programs' entries win.
            Err(MapError::SyscallError(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_kernels_layout() {
        let data = std::fs::read(btf::VMLINUX).expect("this kernel's BTF (exec tracking needs it)");
        let l = layout_from(&data).expect("layout");
        assert_eq!(l.enabled, 1);
        // pid and tgid are neighbours in task_struct.
        assert_eq!(l.task_tgid, l.task_pid + 4);
    }

    #[test]
    fn long_paths_are_cut_and_flagged() {
        let long = vec![b'a'; EXE_PATH_MAX + 10];
        let v = exe_value(&long, 0);
        assert_eq!(v.flags, exe::TRUNCATED);
        assert_eq!(v.path[EXE_PATH_MAX - 1], 0);
        let v = exe_value(b"/bin/sh", exe::FROM_PROC);
        assert_eq!(v.flags, exe::FROM_PROC);
        assert_eq!(&v.path[..8], b"/bin/sh\0");
    }
}
