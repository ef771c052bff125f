//! Exec tracking: which program each process runs, recorded when it execs (tracepoint
//! sched_process_exec) and forgotten when its thread-group leader exits, so a decision can name
//! the executable that made the call as the kernel saw it then, also for a process gone a
//! millisecond later or one that execs another program right after.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel,
        generated::{bpf_probe_read_kernel as probe_read_raw, bpf_probe_read_kernel_str},
    },
    programs::BtfTracePointContext,
};

use agent_common::{exe, proc, Event, ProcLayout, EXE_PATH_MAX};

use crate::maps::{EXES, EXE_SCRATCH};

/// Load-time constant: offsets in kernel structs, from the controller (which reads them from the
/// kernel's BTF). All zero, as built: nothing is tracked and every process is unknown.
#[unsafe(no_mangle)]
static PROC_LAYOUT: ProcLayout = ProcLayout {
    enabled: 0,
    bprm_filename: 0,
    task_real_parent: 0,
    task_tgid: 0,
    task_pid: 0,
    _reserved: 0,
};

/// A process the tracker could not record (a read failed, or the map is full): it stays
/// unknown, and records of its decisions say so (`proc::EXE_KNOWN` unset).
pub struct Untracked;

#[inline(always)]
fn layout() -> ProcLayout {
    // SAFETY: read of a load-time constant.
    unsafe { core::ptr::read_volatile(&PROC_LAYOUT) }
}

/// tp_btf/sched_process_exec(task, old_pid, bprm): the task has become its thread group's
/// leader and runs `bprm->filename` now.
pub fn on_exec(ctx: &BtfTracePointContext) -> Result<(), Untracked> {
    let l = layout();
    if l.enabled == 0 {
        return Ok(());
    }
    let bprm: u64 = ctx.arg(2);
    let value = EXE_SCRATCH.get_ptr_mut(0).ok_or(Untracked)?;
    // SAFETY: `value` is this CPU's scratch slot (programs do not migrate while running); the
    // helpers read kernel memory and fail instead of faulting; the string read writes at most
    // EXE_PATH_MAX bytes, the size of `path`, and zero-fills behind the NUL is done first.
    unsafe {
        let name = bpf_probe_read_kernel((bprm + l.bprm_filename as u64) as *const u64)
            .map_err(|_| Untracked)?;
        (*value).flags = 0;
        (*value)._reserved = 0;
        (*value).path = [0; EXE_PATH_MAX];
        let n = bpf_probe_read_kernel_str(
            (*value).path.as_mut_ptr() as *mut c_void,
            EXE_PATH_MAX as u32,
            name as *const c_void,
        );
        if n <= 0 {
            return Err(Untracked);
        }
        if n as usize >= EXE_PATH_MAX {
            (*value).flags = exe::TRUNCATED;
        }
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // A full map leaves the process unknown (records then say so). By reference: a copy
        // would not fit the stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let inserted = EXES.insert(tgid, &*value, 0);
        inserted.map_err(|_| Untracked)
    }
}

/// tp_btf/sched_process_exit(task, ...): forgets the process when its leader exits (a thread's
/// exit, or the old leader's during another thread's exec, which runs before the exec records).
pub fn on_exit() {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if id as u32 == tgid {
        let _ = EXES.remove(tgid);
    }
}

/// tp_btf/sched_process_fork(parent, child): a new process (not a thread) runs its parent's
/// program until it execs.
pub fn on_fork(ctx: &BtfTracePointContext) -> Result<(), Untracked> {
    let l = layout();
    if l.enabled == 0 {
        return Ok(());
    }
    let child: u64 = ctx.arg(1);
    // SAFETY: the helper reads kernel memory and fails instead of faulting.
    let (pid, tgid) = unsafe {
        match (
            bpf_probe_read_kernel((child + l.task_pid as u64) as *const u32),
            bpf_probe_read_kernel((child + l.task_tgid as u64) as *const u32),
        ) {
            (Ok(p), Ok(t)) => (p, t),
            _ => return Err(Untracked),
        }
    };
    if pid != tgid {
        return Ok(());
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // A parent the tracker does not know leaves the child unknown too.
    let Some(v) = EXES.get_ptr(parent) else {
        return Ok(());
    };
    // SAFETY: a live map value, copied by the helper. By reference: a copy would not fit the
    // stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let inserted = EXES.insert(tgid, unsafe { &*v }, 0);
    inserted.map_err(|_| Untracked)
}

/// Fills the process fields of an event being written: the caller's executable, its parent and
/// the parent's executable, as they are now.
///
/// # Safety
/// `e` points to a reserved ring record valid for an `Event`.
#[inline(always)]
pub unsafe fn fill(e: *mut Event, tgid: u32) {
    let l = layout();
    let mut flags = 0;
    let mut ppid = 0u32;
    if l.enabled != 0 {
        // SAFETY: the helpers read kernel memory and fail instead of faulting.
        let task = unsafe { bpf_get_current_task() };
        let parent =
            unsafe { bpf_probe_read_kernel((task + l.task_real_parent as u64) as *const u64) };
        if let Ok(parent) = parent {
            if let Ok(p) =
                unsafe { bpf_probe_read_kernel((parent + l.task_tgid as u64) as *const u32) }
            {
                ppid = p;
                flags |= proc::PPID_KNOWN;
            }
        }
    }
    // SAFETY: `e` is valid for an Event (the caller's contract); the copies read map values of
    // exactly EXE_PATH_MAX bytes of path.
    unsafe {
        flags |= copy_exe(
            core::ptr::addr_of_mut!((*e).exe) as *mut u8,
            tgid,
            proc::EXE_KNOWN,
            proc::EXE_TRUNCATED,
        );
        if flags & proc::PPID_KNOWN != 0 {
            flags |= copy_exe(
                core::ptr::addr_of_mut!((*e).parent_exe) as *mut u8,
                ppid,
                proc::PARENT_EXE_KNOWN,
                proc::PARENT_EXE_TRUNCATED,
            );
        } else {
            (*e).parent_exe[0] = 0;
        }
        (*e).ppid = ppid;
        (*e).proc_flags = flags;
    }
}

/// Copies the executable of `tgid` to `dst` (EXE_PATH_MAX bytes); returns `known` (and
/// `truncated`) when it is tracked. An unknown one is an empty string (the bytes behind the
/// NUL are unspecified).
///
/// # Safety
/// `dst` is valid for EXE_PATH_MAX bytes of a reserved ring record.
#[inline(always)]
unsafe fn copy_exe(dst: *mut u8, tgid: u32, known: u32, truncated: u32) -> u32 {
    if let Some(v) = EXES.get_ptr(tgid) {
        // SAFETY: `v` is a live map value; the helper copies EXE_PATH_MAX bytes of it.
        let rc = unsafe {
            probe_read_raw(
                dst as *mut c_void,
                EXE_PATH_MAX as u32,
                core::ptr::addr_of!((*v).path) as *const c_void,
            )
        };
        if rc == 0 {
            // SAFETY: as above.
            let t = unsafe { (*v).flags } & exe::TRUNCATED != 0;
            return known | if t { truncated } else { 0 };
        }
    }
    // SAFETY: the caller's contract.
    unsafe { *dst = 0 };
    0
}
