//! Where the last controller of this boot stopped writing: the last record of the audit log.
//! A restarted controller continues its sequence (no gap, no number used twice) and does not
//! write again the one decision a crash can leave both written and still in the ring (the ring's
//! consumer position moves just after each record is written).

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use super::Decision;

/// How much of a file's end is read to find its last records.
const TAIL_BYTES: u64 = 256 * 1024;

/// What the audit log says about the last controller of this boot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The seq of the last record written in this boot (0: none).
    pub last_seq: u64,
    /// The last line, when it is a decision: the kernel event it came from.
    pub last_decision: Option<EventId>,
}

/// A kernel decision event, as exactly as a record names it: one thread makes one decision per
/// hook at a time, and the kernel's clock is in ns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId {
    pub ktime_ns: u64,
    pub tid: u32,
    pub hook: String,
}

impl EventId {
    /// Whether `d` is this event.
    pub fn is(&self, d: &Decision) -> bool {
        d.boot_ns == self.ktime_ns && d.tid == self.tid && d.hook == self.hook
    }
}

/// Reads the newest audit file of `path` (the live file, else the newest rotated `path.<n>`) for
/// the last record of boot `boot_id`. Nothing found (no file, another boot, unreadable): start
/// afresh.
pub fn from_audit_log(path: &Path, boot_id: &str) -> Resume {
    for file in newest_first(path) {
        if let Some(r) = last_record(&file, boot_id) {
            return r;
        }
    }
    Resume::default()
}

/// The live file, then rotated ones (`path.<digits>`), newest first.
fn newest_first(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return out;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut rotated: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name();
            let suffix = n.to_str()?.strip_prefix(name)?.strip_prefix('.')?;
            let k = suffix
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| suffix.parse().ok())??;
            Some((k, e.path()))
        })
        .collect();
    rotated.sort_unstable_by_key(|(k, _)| std::cmp::Reverse(*k));
    out.extend(rotated.into_iter().map(|(_, p)| p));
    out
}

/// The last record with a seq in a file (lines without one, such as checkpoints, are passed
/// over); None when the file has none, or its last one is of another boot.
fn last_record(file: &Path, boot_id: &str) -> Option<Resume> {
    let mut f = File::open(file).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut tail = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut tail).ok()?;
    // Only whole lines: a partial last line was never written.
    let end = tail.iter().rposition(|b| *b == b'\n')?;
    let mut last = true;
    for line in tail[..end].split(|b| *b == b'\n').rev() {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            last = false;
            continue;
        };
        // A native line, or an OCSF one (`--format ocsf`: the same values, elsewhere).
        let ocsf = v.get("class_uid").is_some();
        let at = |native: &str, other: &str| {
            if ocsf {
                v.pointer(other).cloned()
            } else {
                v.pointer(native).cloned()
            }
            .unwrap_or_default()
        };
        let Some(seq) = at("/seq", "/metadata/sequence").as_u64() else {
            last = false;
            continue;
        };
        if at("/boot_id", "/device/boot_uid").as_str() != Some(boot_id) {
            return None;
        }
        let last_decision =
            (last && at("/kind", "/metadata/event_code") == "decision").then(|| EventId {
                ktime_ns: at("/decision/ktime_ns", "/unmapped/ktime_ns")
                    .as_u64()
                    .unwrap_or(0),
                tid: at("/decision/tid", "/actor/process/tid")
                    .as_u64()
                    .unwrap_or(0) as u32,
                hook: at("/decision/hook", "/unmapped/hook")
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            });
        return Some(Resume {
            last_seq: seq,
            last_decision,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("aw-resume-{}-{}", std::process::id(), line!()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const DECISION: &str = r#"{"seq":41,"boot_id":"b1","kind":"decision","decision":{"ktime_ns":7,"tid":9,"hook":"connect4"}}"#;

    #[test]
    fn the_last_record_of_this_boot_is_found_past_lines_without_seq() {
        let d = dir();
        let p = d.join("audit.jsonl");
        std::fs::write(
            &p,
            format!("{DECISION}\n{{\"kind\":\"checkpoint\"}}\n{{\"seq\":4"),
        )
        .unwrap();
        // The decision is not the last line: it was consumed from the ring after it.
        assert_eq!(
            from_audit_log(&p, "b1"),
            Resume {
                last_seq: 41,
                last_decision: None
            }
        );
        std::fs::write(&p, format!("{DECISION}\n")).unwrap();
        let r = from_audit_log(&p, "b1");
        assert_eq!(r.last_seq, 41);
        assert_eq!(
            r.last_decision,
            Some(EventId {
                ktime_ns: 7,
                tid: 9,
                hook: "connect4".into()
            })
        );
        // The same read off an OCSF line.
        std::fs::write(
            &p,
            "{\"class_uid\":4001,\"metadata\":{\"sequence\":9,\"event_code\":\"decision\"},\
             \"device\":{\"boot_uid\":\"b1\"},\"unmapped\":{\"ktime_ns\":5,\"hook\":\"sendmsg4\"},\
             \"actor\":{\"process\":{\"tid\":3}}}\n",
        )
        .unwrap();
        assert_eq!(
            from_audit_log(&p, "b1"),
            Resume {
                last_seq: 9,
                last_decision: Some(EventId {
                    ktime_ns: 5,
                    tid: 3,
                    hook: "sendmsg4".into()
                })
            }
        );
        std::fs::write(&p, format!("{DECISION}\n")).unwrap();
        // Another boot starts afresh.
        assert_eq!(from_audit_log(&p, "b2"), Resume::default());
        // An empty live file: the newest rotated one tells.
        std::fs::write(d.join("audit.jsonl.00000002"), format!("{DECISION}\n")).unwrap();
        std::fs::write(
            d.join("audit.jsonl.00000001"),
            "{\"seq\":1,\"boot_id\":\"b1\",\"kind\":\"lost\"}\n",
        )
        .unwrap();
        std::fs::write(&p, "").unwrap();
        assert_eq!(from_audit_log(&p, "b1").last_seq, 41);
        let _ = std::fs::remove_dir_all(&d);
    }
}
