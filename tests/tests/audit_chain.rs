//! The audit log is tamper-evident: a real controller writes a hash-chained log with signed
//! checkpoints, rotated by size into PATH.<n>; `agentwall audit verify` passes the intact set
//! and, for each kind of tampering (an edited byte, a deleted, inserted or swapped line, a file
//! cut mid-line, a forged checkpoint, a rewrite with the chain recomputed), exits non-zero naming
//! the file and line. The chain continues across a controller restart.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use agentwall::sinks::{
    chain::{self, Link, NoteBody, Signer},
    segments, AuditOptions,
};
use agentwall_tests::{
    audit::Tmpfs,
    denied, one_port_policy, probe_in, sibling_exe, tcp_server,
    wait::{dir_of, until_answer, until_async},
    Harness,
};
use anyhow::{ensure, Context, Result};

fn temp_dir(tag: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("agentwall-chain-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// `agentwall audit ARGS`: (exit ok, stdout, stderr).
fn audit(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(sibling_exe("agentwall")?)
        .arg("audit")
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// (decision records, sum of lost counts) over whole lines of the audit log's files so far.
fn tally(log: &Path) -> Result<(u64, u64)> {
    let (mut decisions, mut lost) = (0, 0);
    for f in segments(log)? {
        let text = std::fs::read(&f)?;
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for l in text[..whole]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            let v: serde_json::Value = serde_json::from_slice(l)
                .with_context(|| format!("{}: {}", f.display(), String::from_utf8_lossy(l)))?;
            if v["kind"] == "decision" {
                decisions += 1;
            }
            lost += v["lost"].as_u64().unwrap_or(0);
        }
    }
    Ok((decisions, lost))
}

/// A key made by `agentwall audit keygen`: (private key file, verifier key file).
fn keygen(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    let key = dir.join(name.replace('/', "-"));
    let (ok, out, err) = audit(&["keygen", "--out", key.to_str().unwrap(), "--name", name])?;
    ensure!(ok, "keygen: {out} {err}");
    let public = PathBuf::from(format!("{}.pub", key.display()));
    let text = std::fs::read_to_string(&public)?;
    ensure!(
        out.trim() == text.trim() && text.starts_with(&format!("{name}+")),
        "keygen printed {out:?}, wrote {text:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "the private key is {mode:o}");
    Ok((key, public))
}

fn signer(key: &Path) -> Result<Signer> {
    Ok(Signer::parse_ed25519(&std::fs::read_to_string(key)?)?)
}

/// Runs a controller on `log` until `min_files` files exist and every attempt of a busy agent
/// is written; stops it (the shutdown checkpoint).
async fn write_log(log: &Path, opts: AuditOptions, ms: u64) -> Result<u64> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let h = Harness::start_with(&one_port_policy(tcp.port()), |o| {
        o.audit_log = Some(log.to_path_buf());
        o.audit = opts;
    })
    .await?;
    let (before, lost_before) = tally(log)?;
    let out = probe_in(&h.agent, &[format!("loop:{tcp},{},{ms}", denied(tcp))])?;
    ensure!(out[0].ok, "{out:?}");
    let attempts = out[0].value as u64;
    ensure!(attempts > 300, "only {attempts} attempts");
    until_async(
        "every attempt in the log",
        Duration::from_secs(10),
        &[dir_of(log)],
        || {
            let (d, l) = tally(log)?;
            Ok((d + l >= before + lost_before + attempts).then_some(()))
        },
    )
    .await?;
    h.stop().await?;
    Ok(attempts)
}

/// A copy of the log's files in a new directory; returns the copy's live path and its files.
fn copy_set(log: &Path, dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    for f in segments(log)? {
        let to = dir.join(f.file_name().context("a file name")?);
        std::fs::copy(&f, &to)?;
        files.push(to);
    }
    Ok((dir.join(log.file_name().context("a file name")?), files))
}

fn read_lines(f: &Path) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read(f)?;
    Ok(text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

fn write_lines(f: &Path, lines: &[Vec<u8>]) -> Result<()> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    Ok(std::fs::write(f, out)?)
}

/// Rewrites the chain values of every line from `files[i]` line `from` (0-based) on, as a forger
/// without the key can.
fn rechain(files: &[PathBuf], i: usize, from: usize) -> Result<()> {
    let mut prev: Option<Link> = None;
    for (k, f) in files.iter().enumerate().skip(i) {
        let mut lines = read_lines(f)?;
        for (n, l) in lines.iter_mut().enumerate() {
            if k == i && n < from {
                prev = chain::split(l).map(|(_, c)| c);
                continue;
            }
            let (body, _) = chain::split(l).context("a chained line")?;
            let mut obj = body.to_vec();
            obj.push(b'}');
            let mut out = Vec::new();
            let p = prev.unwrap_or(chain::GENESIS);
            prev = Some(chain::seal_into(&mut out, &p, &obj)?);
            out.pop();
            *l = out;
        }
        write_lines(f, &lines)?;
    }
    Ok(())
}

/// `verify` fails naming `file:line: kind`.
fn assert_found(case: &str, live: &Path, key: &Path, file: &Path, line: usize, kind: &str) {
    let (ok, out, err) = audit(&[
        "verify",
        "--key",
        key.to_str().unwrap(),
        live.to_str().unwrap(),
    ])
    .unwrap();
    let want = format!("{}:{line}: {kind}", file.display());
    assert!(
        !ok && err.contains(&want),
        "{case}: expected a failure naming {want:?}\nstdout: {out}\nstderr: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intact_rotated_log_verifies_and_each_tampering_is_named() -> Result<()> {
    let dir = temp_dir("tamper")?;
    let (key, public) = keygen(&dir, "test.agentwall/audit")?;
    let log = dir.join("log").join("audit.jsonl");
    let opts = AuditOptions {
        rotate_size: 48 * 1024,
        keep: 0,
        signers: Arc::new(vec![signer(&key)?]),
        ..AuditOptions::default()
    };
    let attempts = write_log(&log, opts, 1500).await?;

    // Rotated by size several times, named PATH.<8 digits> in order, then PATH.
    let files = segments(&log)?;
    ensure!(files.len() >= 4, "only {} files: {files:?}", files.len());
    for (i, f) in files[..files.len() - 1].iter().enumerate() {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, format!("audit.jsonl.{:08}", i + 1));
    }
    let (decisions, lost) = tally(&log)?;
    assert_eq!(decisions + lost, attempts);

    // Intact: with the key, and without it (then it says the signatures were not checked).
    let (ok, out, err) = audit(&[
        "verify",
        "--key",
        public.to_str().unwrap(),
        log.to_str().unwrap(),
    ])?;
    assert!(ok, "{out} {err}");
    assert!(
        out.contains(&format!("intact: {} files", files.len()))
            && out.contains("from the start of the log")
            && out.contains("tail: ends with a checkpoint"),
        "{out}"
    );
    let mut args = vec!["verify".to_string(), "--key".into()];
    args.push(std::fs::read_to_string(&public)?.trim().to_string());
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = audit(&args)?;
    assert!(ok, "files listed, key given inline: {out} {err}");
    let (ok, out, err) = audit(&["verify", log.to_str().unwrap()])?;
    assert!(ok && out.contains("no --key"), "{out} {err}");
    // Another key: its signatures are missing.
    let (_, other_public) = keygen(&dir, "someone.else/audit")?;
    let (ok, _, err) = audit(&[
        "verify",
        "--key",
        other_public.to_str().unwrap(),
        log.to_str().unwrap(),
    ])?;
    assert!(
        !ok && err.contains("not signed by the key someone.else/audit"),
        "{err}"
    );

    // Line 1 of a middle file is its opening checkpoint, lines 2.. records.
    let m = 1;
    let work = dir.join("work");
    let line_of = |files: &[PathBuf], n: usize| -> Result<Vec<u8>> {
        Ok(read_lines(&files[m])?[n - 1].clone())
    };
    ensure!(
        chain::is_checkpoint(&line_of(&files, 1)?) && !chain::is_checkpoint(&line_of(&files, 8)?),
        "the middle file's layout"
    );

    // An edited byte: the record says "allowed" where it said "blocked" (or the reverse).
    let (live, set) = copy_set(&log, &work)?;
    let mut lines = read_lines(&set[m])?;
    let text = String::from_utf8(lines[4].clone())?;
    let edited = if text.contains("\"action\":\"blocked\"") {
        text.replace("\"action\":\"blocked\"", "\"action\":\"allowed\"")
    } else {
        text.replace("\"action\":\"allowed\"", "\"action\":\"blocked\"")
    };
    ensure!(edited != text, "no action in {text}");
    lines[4] = edited.into_bytes();
    write_lines(&set[m], &lines)?;
    assert_found("edit", &live, &public, &set[m], 5, "edited");

    // A deleted line.
    let (live, set) = copy_set(&log, &work)?;
    let mut lines = read_lines(&set[m])?;
    lines.remove(4);
    write_lines(&set[m], &lines)?;
    assert_found("delete", &live, &public, &set[m], 5, "deleted");

    // An inserted line (a copy of a later record).
    let (live, set) = copy_set(&log, &work)?;
    let mut lines = read_lines(&set[m])?;
    let copy = lines[7].clone();
    lines.insert(4, copy);
    write_lines(&set[m], &lines)?;
    assert_found("insert", &live, &public, &set[m], 5, "inserted");

    // Two lines swapped.
    let (live, set) = copy_set(&log, &work)?;
    let mut lines = read_lines(&set[m])?;
    lines.swap(4, 5);
    write_lines(&set[m], &lines)?;
    assert_found("swap", &live, &public, &set[m], 5, "reordered");

    // A file cut in the middle of a line.
    let (live, set) = copy_set(&log, &work)?;
    let lines = read_lines(&set[m])?;
    let keep: usize = lines[..4].iter().map(|l| l.len() + 1).sum::<usize>() + 20;
    let f = std::fs::OpenOptions::new().write(true).open(&set[m])?;
    f.set_len(keep as u64)?;
    assert_found("truncate", &live, &public, &set[m], 5, "truncated");

    // A checkpoint whose count was changed: its signature no longer verifies.
    let (live, set) = copy_set(&log, &work)?;
    let mut lines = read_lines(&set[m])?;
    let cp = String::from_utf8(lines[0].clone())?;
    let note = chain::note_of(&lines[0]).context("a note")?;
    let forged = cp.replacen(
        &format!("\\n{}\\n", note.count),
        &format!("\\n{}\\n", note.count + 1),
        1,
    );
    ensure!(forged != cp, "count not found in {cp}");
    lines[0] = forged.into_bytes();
    write_lines(&set[m], &lines)?;
    assert_found(
        "forged count",
        &live,
        &public,
        &set[m],
        1,
        "forged checkpoint",
    );

    // A checkpoint signed by another key, chained correctly: not signed by the key.
    let (live, set) = copy_set(&log, &work)?;
    let mut lines = read_lines(&set[m])?;
    let (other, _) = keygen(&dir, "forger/audit")?;
    let note = chain::note_of(&lines[0]).context("a note")?;
    let text = chain::sign_note(&note, &[signer(&other)?]);
    let mut obj = chain::checkpoint_object("2026-01-01T00:00:00Z", &text);
    obj.pop();
    let mut out = Vec::new();
    chain::seal_into(&mut out, &note.head, &obj)?;
    out.pop();
    lines[0] = out;
    write_lines(&set[m], &lines)?;
    rechain(&set, m, 1)?;
    assert_found("other key", &live, &public, &set[m], 1, "forged checkpoint");

    // A record rewritten with every chain value after it recomputed: the next checkpoint
    // (the file's closing one) no longer matches.
    let (live, set) = copy_set(&log, &work)?;
    let mut lines = read_lines(&set[m])?;
    let text = String::from_utf8(lines[4].clone())?;
    lines[4] = text
        .replacen("\"seq\":", "\"forged\":true,\"seq\":", 1)
        .into_bytes();
    write_lines(&set[m], &lines)?;
    rechain(&set, m, 4)?;
    let closing = read_lines(&set[m])?.len();
    assert_found(
        "rechained",
        &live,
        &public,
        &set[m],
        closing,
        "forged checkpoint",
    );

    // A whole middle file removed.
    let (live, set) = copy_set(&log, &work)?;
    std::fs::remove_file(&set[m])?;
    let (ok, _, err) = audit(&[
        "verify",
        "--key",
        public.to_str().unwrap(),
        live.to_str().unwrap(),
    ])?;
    assert!(
        !ok && err.contains(&format!("{}:1:", set[m + 1].display())),
        "a missing file: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_and_the_numbering_continue_across_a_restart() -> Result<()> {
    let dir = temp_dir("restart")?;
    let (key, public) = keygen(&dir, "test.agentwall/restart")?;
    let log = dir.join("audit.jsonl");
    let opts = AuditOptions {
        rotate_size: 64 * 1024,
        keep: 0,
        checkpoint_every: Duration::from_millis(200),
        signers: Arc::new(vec![signer(&key)?]),
        ..AuditOptions::default()
    };
    write_log(&log, opts.clone(), 500).await?;
    let first = segments(&log)?;
    write_log(&log, opts, 500).await?;
    let second = segments(&log)?;
    ensure!(second.len() > first.len(), "{first:?} then {second:?}");
    for f in &first[..first.len() - 1] {
        ensure!(second.contains(f), "{} renamed or removed", f.display());
    }
    let (ok, out, err) = audit(&[
        "verify",
        "--key",
        public.to_str().unwrap(),
        log.to_str().unwrap(),
    ])?;
    assert!(
        ok && out.contains("from the start of the log"),
        "{out} {err}"
    );
    // NOTE: a NOTE body names the chain head: the last line is the shutdown checkpoint.
    let last = read_lines(&log)?.pop().context("a last line")?;
    let note: NoteBody = chain::note_of(&last).context("the last line is a checkpoint")?;
    assert_eq!(note.origin, "test.agentwall/restart");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_the_chain_and_it_verifies_once_writes_succeed() -> Result<()> {
    let dir = temp_dir("full")?;
    let (key, public) = keygen(&dir, "test.agentwall/full")?;
    let fs = Tmpfs::mount("chain-full", 1 << 20, false)?;
    let log = fs.path("audit.jsonl");
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let h = Harness::start_with(&one_port_policy(tcp.port()), |o| {
        o.audit_log = Some(log.clone());
        o.ring_bytes = Some(16 * 1024);
        o.audit = AuditOptions {
            checkpoint_every: Duration::from_millis(100),
            signers: Arc::new(vec![signer(&key).expect("the key")]),
            ..AuditOptions::default()
        };
    })
    .await?;
    let out = probe_in(&h.agent, &[format!("tcp:{tcp}")])?;
    assert!(out[0].ok, "{out:?}");
    until_async(
        "the first record",
        Duration::from_secs(5),
        &[dir_of(&log)],
        || Ok((tally(&log)?.0 == 1).then_some(())),
    )
    .await?;
    // Writes (records and checkpoints) fail while the disk is full, and are retried.
    let filler = fs.fill("filler")?;
    let out = probe_in(&h.agent, &[format!("loop:{tcp},{},1000", denied(tcp))])?;
    let attempts = 1 + out[0].value as u64;
    let handle = h.handle.as_ref().context("running")?;
    until_answer("failed writes", Duration::from_secs(5), || async {
        let s = handle.status().await?["audit_log"].clone();
        Ok((s["failed_attempts"].as_u64() >= Some(3)).then_some(()))
    })
    .await?;
    std::fs::remove_file(&filler)?;
    until_async(
        "every attempt",
        Duration::from_secs(10),
        &[dir_of(&log)],
        || {
            let (d, l) = tally(&log)?;
            Ok((d + l >= attempts).then_some(()))
        },
    )
    .await?;
    h.stop().await?;
    let (d, l) = tally(&log)?;
    assert_eq!(d + l, attempts);
    let (ok, out, err) = audit(&[
        "verify",
        "--key",
        public.to_str().unwrap(),
        log.to_str().unwrap(),
    ])?;
    assert!(
        ok && out.contains("from the start of the log"),
        "{out} {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
