//! The cgroup2 hierarchy: where it is mounted, cgroup ids, levels, creating and joining cgroups.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 file system in /proc/self/mountinfo (agentwall needs the unified hierarchy)"
    )]
    NoCgroup2,
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(#[from] procfs::ProcError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not inside the cgroup2 hierarchy at {1}")]
    Outside(PathBuf, PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where cgroup2 is mounted, read from /proc/self/mountinfo (never assumed: a hybrid layout
/// has it at /sys/fs/cgroup/unified, a unified one at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let infos = procfs::process::Process::myself()?.mountinfo()?;
    infos
        .into_iter()
        .find(|m| m.fs_type == "cgroup2" && m.root == "/")
        .map(|m| m.mount_point)
        .ok_or(CgroupError::NoCgroup2)
}

/// The cgroup id the kernel reports for `path` (`bpf_get_current_cgroup_id`) is the inode number
/// of its directory in cgroupfs.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(path).map_err(io_err(path))?.ino())
}

/// A cgroup path relative to the cgroup2 root, in `a/b/c` form (no leading slash).
pub fn relative(root: &Path, path: &Path) -> Result<String, CgroupError> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| CgroupError::Outside(path.to_path_buf(), root.to_path_buf()))?;
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(CgroupError::Outside(path.to_path_buf(), root.to_path_buf()));
    }
    Ok(rel.to_string_lossy().into_owned())
}

/// Level of a cgroup below the root: the root is 0, `a` is 1, `a/b` is 2. The kernel's
/// `bpf_get_current_ancestor_cgroup_id(level)` counts the same way.
pub fn level(rel: &str) -> u32 {
    rel.split('/').filter(|c| !c.is_empty()).count() as u32
}

/// Creates a cgroup (and its parents) when missing.
pub fn create(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(io_err(path))
}

/// Moves process `pid` into the cgroup at `path` (0 means the calling process).
pub fn move_pid(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .and_then(|mut f| f.write_all(pid.to_string().as_bytes()))
        .map_err(io_err(&procs))
}

/// Every cgroup below `root` (not the root itself), as relative paths, depth first.
pub fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        // A cgroup can vanish while we walk: skip what we cannot read.
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let p = e.path();
                if let Ok(rel) = relative(root, &p) {
                    out.push(rel);
                }
                stack.push(p);
            }
        }
    }
    out
}

/// The cgroup of a process, relative to the cgroup2 root, from /proc/PID/cgroup ("0::/path").
pub fn of_pid(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_count_components() {
        assert_eq!(level(""), 0);
        assert_eq!(level("agentwall"), 1);
        assert_eq!(level("agentwall/demo"), 2);
        assert_eq!(level("a/b/c/"), 3);
    }

    #[test]
    fn relative_rejects_paths_outside_the_root() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            relative(root, Path::new("/sys/fs/cgroup/agentwall/demo")).unwrap(),
            "agentwall/demo"
        );
        assert!(relative(root, Path::new("/tmp/x")).is_err());
        assert!(relative(root, Path::new("/sys/fs/cgroup/../x")).is_err());
    }
}
