//! The policy directory's file rules: regular files only, no symlink out of it, and no more
//! than a short excerpt of any file in an error.

use std::path::{Path, PathBuf};

use super::{load_dir, raw, PolicyError};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let path = std::env::temp_dir().join(format!(
            "aw-policy-dir-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(path.join("policies")).unwrap();
        Dir(path)
    }

    fn policies(&self) -> PathBuf {
        self.0.join("policies")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn policy(name: &str) -> String {
    format!("name: {name}\nagents:\n  cgroups: [agentwall/{name}]\negress: []\n")
}

const HASH: &str = "S3CRETHASHabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

fn shadow() -> String {
    format!("root:$6${HASH}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
}

#[test]
fn a_symlink_out_of_the_directory_is_refused_unread() {
    let d = Dir::new("out");
    std::fs::write(d.0.join("shadow"), shadow()).unwrap();
    std::fs::write(d.policies().join("ok.yaml"), policy("ok")).unwrap();
    std::os::unix::fs::symlink(d.0.join("shadow"), d.policies().join("abs.yaml")).unwrap();
    std::os::unix::fs::symlink("../shadow", d.policies().join("rel.yaml")).unwrap();
    let e = load_dir(&d.policies()).unwrap_err();
    let msg = e.to_string();
    let PolicyError::Several(errors) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(errors.len(), 2, "{msg}");
    for (e, name) in errors.iter().zip(["abs.yaml", "rel.yaml"]) {
        assert!(
            matches!(e, PolicyError::OutsideDir { path, .. } if path.ends_with(name)),
            "{e:?}"
        );
    }
    assert!(
        msg.contains("rel.yaml: a symbolic link out of the policy directory (to \"../shadow\")"),
        "{msg}"
    );
    assert!(!msg.contains("S3CRET") && !msg.contains("root:"), "{msg}");
}

#[test]
fn links_between_the_directorys_own_entries_are_followed() {
    // A Kubernetes ConfigMap volume: name.yaml -> ..data/name.yaml, ..data -> ..<timestamp>.
    let d = Dir::new("configmap");
    let p = d.policies();
    std::fs::create_dir(p.join("..2024_01_01")).unwrap();
    std::fs::write(p.join("..2024_01_01/a.yaml"), policy("a")).unwrap();
    std::os::unix::fs::symlink("..2024_01_01", p.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/a.yaml", p.join("a.yaml")).unwrap();
    let set = load_dir(&p).unwrap();
    assert_eq!(set.policies.len(), 1);
    assert_eq!(set.policies[0].name, "a");
    assert_eq!(set.policies[0].source, p.join("a.yaml"));
}

#[test]
fn a_link_to_a_subdirectory_is_skipped_and_a_fifo_refused() {
    let d = Dir::new("special");
    let p = d.policies();
    std::fs::write(p.join("a.yaml"), policy("a")).unwrap();
    std::fs::create_dir(p.join("sub")).unwrap();
    std::os::unix::fs::symlink("sub", p.join("sub.yaml")).unwrap();
    assert_eq!(load_dir(&p).unwrap().policies.len(), 1);
    let fifo = std::ffi::CString::new(p.join("f.yaml").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let e = load_dir(&p).unwrap_err();
    assert!(e.to_string().ends_with("f.yaml: not a regular file"), "{e}");
}

#[test]
fn a_file_of_secrets_is_quoted_as_a_short_excerpt_at_most() {
    let d = Dir::new("excerpt");
    let p = d.policies();
    std::fs::write(p.join("copy.yaml"), shadow()).unwrap();
    let msg = load_dir(&p).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("{}:1:", p.join("copy.yaml").display())),
        "{msg}"
    );
    // At most MAX_EXCERPT_CHARS of the line: the hash's tail never.
    assert!(!msg.contains(&HASH[10..]), "{msg}");
    let longest_quote = msg
        .split(['`', '"'])
        .skip(1)
        .step_by(2)
        .map(|q| q.split("...(").next().unwrap_or("").chars().count())
        .max()
        .unwrap_or(0);
    assert!(longest_quote <= raw::MAX_EXCERPT_CHARS, "{msg}");
}

#[test]
fn excerpts_are_cut_in_library_messages() {
    let long = "k".repeat(100);
    let cut = raw::cut_excerpts(&format!("unknown field `{long}`, expected one of `name`"));
    assert_eq!(
        cut,
        format!(
            "unknown field `{}...(100 bytes)`, expected one of `name`",
            "k".repeat(raw::MAX_EXCERPT_CHARS)
        )
    );
    assert_eq!(
        raw::cut_excerpts(&format!("invalid type: string \"{long}")),
        format!(
            "invalid type: string \"{}...(100 bytes)",
            "k".repeat(raw::MAX_EXCERPT_CHARS)
        )
    );
    assert_eq!(raw::cut_excerpts("no quotes here"), "no quotes here");
}

#[test]
fn a_single_file_argument_is_read_as_given() {
    let d = Dir::new("single");
    let f = d.0.join("one.yaml");
    std::fs::write(&f, policy("one")).unwrap();
    let link = d.0.join("link.yaml");
    std::os::unix::fs::symlink(&f, &link).unwrap();
    // The operator named it: a link given on the command line is followed.
    assert_eq!(load_dir(Path::new(&link)).unwrap().policies[0].name, "one");
}
