//! The controller's JSON state files (runtime state, pending requests): read whole, written
//! atomically (a temporary file renamed over it) in a directory and a file only root can read,
//! since they name every agent's tasks, grants and reasons, and agents run as other users.

use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

/// Reads `path`; none yet is the default. `what` names the file in errors.
pub fn load<T: DeserializeOwned + Default>(path: &Path, what: &str) -> Result<T, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a {what}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes `value` to `path` atomically, root's only.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
        // Also when an earlier build made it with the umask's mode.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(err)?;
    }
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    std::io::Write::write_all(&mut f, &bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
