//! `agentwall audit`: verify an audit log's hash chain and signed checkpoints, make a key; and
//! the `run` flags of the audit log (docs/audit-log.md).

use std::{
    cell::RefCell,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::sinks::{
    chain::{self, Anchor, Checker, Line, Signer},
    segments, AuditOptions, Fsync,
};

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Check an audit log: exit 0 when intact, else name the first edited, deleted, inserted,
    /// reordered or truncated line (file:line) and exit 1.
    Verify(VerifyArgs),
    /// Make an Ed25519 checkpoint key: OUT (private, 0600, for `run --audit-key`) and OUT.pub
    /// (the verifier key, for `audit verify --key`).
    Keygen(KeygenArgs),
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The verifier key `NAME+HASH+KEY` (as `keygen` prints), or a file holding it (OUT.pub).
    #[arg(long)]
    key: Option<String>,
    /// An HMAC key file (as given to `run --audit-hmac-key`).
    #[arg(long)]
    hmac_key: Option<PathBuf>,
    /// The files in order, oldest first; or the live file alone, which stands for its rotated
    /// files (PATH.00000001, ...) then itself.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args)]
pub struct KeygenArgs {
    /// The private key file to write (refused if it exists).
    #[arg(long)]
    out: PathBuf,
    /// The key's name, which is also the checkpoints' origin line [default:
    /// agentwall-audit/<hostname>].
    #[arg(long)]
    name: Option<String>,
    /// Write an HMAC-SHA256 key (32 random bytes, as hex) instead.
    #[arg(long)]
    hmac: bool,
}

/// `agentwall run`'s audit log flags.
#[derive(Args, Debug)]
pub struct AuditRunArgs {
    /// Rotate the audit log once it holds this much ("100MiB", "1GB", "0": never by size).
    #[arg(long, value_parser = parse_size, default_value = "100MiB")]
    audit_rotate_size: u64,
    /// Rotate the audit log once this old ("1h", "0": never by age).
    #[arg(long, value_parser = parse_age, default_value = "24h")]
    audit_rotate_age: Duration,
    /// Rotated audit files kept; older ones are removed, each logged and counted (0: keep all).
    #[arg(long, default_value_t = crate::sinks::DEFAULT_KEEP)]
    audit_keep: usize,
    /// When audit lines reach the disk: batch (fsync after each batch of records),
    /// interval:DURATION, or never (left to the kernel).
    #[arg(long, default_value = "batch")]
    audit_fsync: Fsync,
    /// How often a signed checkpoint is written (also at each rotation and at shutdown).
    #[arg(long, value_parser = parse_every, default_value = "10s")]
    audit_checkpoint_every: Duration,
    /// Ed25519 private key file (`agentwall audit keygen`): checkpoints are signed notes that
    /// anyone with the public key can check.
    #[arg(long)]
    audit_key: Option<PathBuf>,
    /// HMAC-SHA256 key file: checkpoints also carry an HMAC (checkable only by its holders).
    #[arg(long)]
    audit_hmac_key: Option<PathBuf>,
}

impl AuditRunArgs {
    pub fn options(&self) -> Result<AuditOptions> {
        let mut signers = Vec::new();
        if let Some(p) = &self.audit_key {
            let text = read_secret(p)?;
            signers.push(
                Signer::parse_ed25519(&String::from_utf8_lossy(&text))
                    .with_context(|| format!("--audit-key {}", p.display()))?,
            );
        }
        if let Some(p) = &self.audit_hmac_key {
            signers.push(
                Signer::hmac(&read_secret(p)?)
                    .with_context(|| format!("--audit-hmac-key {}", p.display()))?,
            );
        }
        Ok(AuditOptions {
            rotate_size: self.audit_rotate_size,
            rotate_age: self.audit_rotate_age,
            keep: self.audit_keep,
            fsync: self.audit_fsync,
            checkpoint_every: self.audit_checkpoint_every,
            signers: Arc::new(signers),
        })
    }
}

fn read_secret(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading the key file {}", p.display()))
}

/// A size: bytes, or with a suffix K/M/G (1000s) or KiB/MiB/GiB (1024s).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 100MiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "k" | "kB" => 1000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (B, K, M, G, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too large"))
}

fn parse_age(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_every(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("{s:?}: must not be zero")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

pub fn run(cmd: AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::Verify(a) => verify(a),
        AuditCmd::Keygen(a) => keygen(a),
    }
}

fn verify(a: VerifyArgs) -> Result<()> {
    let mut checkers = Vec::new();
    if let Some(k) = &a.key {
        let text = match std::fs::read_to_string(k) {
            Ok(t) => t,
            Err(_) if k.contains('+') => k.clone(),
            Err(e) => bail!("--key {k}: {e}"),
        };
        checkers.push(Checker::parse_verifier(&text).with_context(|| format!("--key {k}"))?);
    }
    if let Some(p) = &a.hmac_key {
        checkers.push(
            Checker::hmac(&read_secret(p)?)
                .with_context(|| format!("--hmac-key {}", p.display()))?,
        );
    }
    let files = match a.files.as_slice() {
        [one] => {
            let all = segments(one).with_context(|| format!("listing {}", one.display()))?;
            if all.is_empty() {
                bail!("{}: no such file", one.display());
            }
            all
        }
        many => many.to_vec(),
    };
    let failed = RefCell::new(None);
    let lines = files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| match std::fs::read(f) {
            Ok(bytes) => lines_of(i, &bytes),
            Err(e) => {
                failed
                    .borrow_mut()
                    .get_or_insert(format!("{}: {e}", f.display()));
                Vec::new()
            }
        });
    let result = chain::verify(&checkers, lines);
    if let Some(e) = failed.into_inner() {
        bail!("reading {e}");
    }
    let sum = match result {
        Ok(s) => s,
        Err(p) => bail!(
            "{}:{}: {}: {}",
            files[p.file].display(),
            p.line,
            p.kind,
            p.detail
        ),
    };
    let at = |(f, l): (usize, u64)| format!("{}:{l}", files[f].display());
    let mut out = std::io::stdout().lock();
    let keys: Vec<_> = checkers.iter().map(Checker::name).collect();
    writeln!(
        out,
        "intact: {} files, {} records, {} checkpoints, {} signatures verified{}",
        files.len(),
        sum.records,
        sum.checkpoints,
        sum.signatures,
        if keys.is_empty() {
            " (no --key: signatures not checked; an unsigned chain can be recomputed by anyone)"
                .to_string()
        } else {
            format!(" (keys: {})", keys.join(", "))
        }
    )?;
    let first = files[0].display();
    writeln!(
        out,
        "chain: {}",
        match sum.anchor {
            Anchor::Empty => "empty".to_string(),
            Anchor::Genesis => format!("from the start of the log ({first}:1)"),
            Anchor::Checkpoint { count, signed } => format!(
                "from the {}checkpoint at {first}:1 ({count} earlier lines are in files not given)",
                if signed { "signed " } else { "unsigned " }
            ),
            Anchor::Unverified => format!(
                "from {first}:1, taken as is (it continues files not given; its own content is \
                 not checked)"
            ),
        }
    )?;
    match sum.last_checkpoint {
        Some(cp) if sum.tail == 0 => writeln!(out, "tail: ends with a checkpoint ({})", at(cp))?,
        Some(cp) => writeln!(
            out,
            "tail: {} records after the last checkpoint ({}) are covered by the chain only: \
             lines deleted from the end after it cannot be detected",
            sum.tail,
            at(cp)
        )?,
        None => writeln!(
            out,
            "tail: no checkpoint: every record is covered by the chain only"
        )?,
    }
    if !checkers.is_empty() && sum.signatures == 0 && sum.records > 0 {
        bail!("a key was given but no checkpoint is signed by it");
    }
    Ok(())
}

/// A file's lines; a last line without its newline is partial.
fn lines_of(file: usize, bytes: &[u8]) -> Vec<Line> {
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut number = 0;
    while !rest.is_empty() {
        number += 1;
        let (line, partial, next) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], false, &rest[i + 1..]),
            None => (rest, true, &rest[rest.len()..]),
        };
        out.push(Line {
            file,
            number,
            bytes: line.to_vec(),
            partial,
        });
        rest = next;
    }
    out
}

fn keygen(a: KeygenArgs) -> Result<()> {
    let write = |path: &Path, mode: u32, text: &str| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))
    };
    if a.hmac {
        let mut key = [0u8; 32];
        chain::getrandom(&mut key)?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        write(&a.out, 0o600, &format!("{hex}\n"))?;
        println!("HMAC key written to {}", a.out.display());
        return Ok(());
    }
    let name = match a.name {
        Some(n) => n,
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_else(|_| "localhost".into());
            format!("agentwall-audit/{}", host.trim())
        }
    };
    let (private, verifier) = chain::generate(&name)?;
    let mut public = a.out.as_os_str().to_owned();
    public.push(".pub");
    let public = PathBuf::from(public);
    write(&a.out, 0o600, &format!("{private}\n"))?;
    write(&public, 0o644, &format!("{verifier}\n"))?;
    println!("{verifier}");
    eprintln!(
        "private key: {} (for run --audit-key); verifier key: {} (for audit verify --key)",
        a.out.display(),
        public.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Run {
        #[command(flatten)]
        audit: AuditRunArgs,
    }

    #[test]
    fn run_flags_make_the_options_and_load_the_keys() {
        let dir = std::env::temp_dir().join(format!("agentwall-cli-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("k");
        keygen(KeygenArgs {
            out: key.clone(),
            name: Some("t/audit".into()),
            hmac: false,
        })
        .unwrap();
        assert!(
            keygen(KeygenArgs {
                out: key.clone(),
                name: None,
                hmac: false
            })
            .is_err(),
            "an existing key is not overwritten"
        );
        let hmac = dir.join("h");
        keygen(KeygenArgs {
            out: hmac.clone(),
            name: None,
            hmac: true,
        })
        .unwrap();
        let o = Run::try_parse_from([
            "run",
            "--audit-rotate-size",
            "1MiB",
            "--audit-rotate-age",
            "1h",
            "--audit-keep",
            "3",
            "--audit-fsync",
            "interval:1s",
            "--audit-checkpoint-every",
            "5s",
            "--audit-key",
            key.to_str().unwrap(),
            "--audit-hmac-key",
            hmac.to_str().unwrap(),
        ])
        .unwrap()
        .audit
        .options()
        .unwrap();
        assert_eq!(
            (
                o.rotate_size,
                o.rotate_age,
                o.keep,
                o.fsync,
                o.checkpoint_every
            ),
            (
                1 << 20,
                Duration::from_secs(3600),
                3,
                Fsync::Interval(Duration::from_secs(1)),
                Duration::from_secs(5)
            )
        );
        let names: Vec<_> = o.signers.iter().map(Signer::name).collect();
        assert_eq!(names, ["t/audit", chain::HMAC_NAME]);
        let d = Run::try_parse_from(["run"])
            .unwrap()
            .audit
            .options()
            .unwrap();
        assert_eq!(
            (d.rotate_size, d.keep, d.fsync, d.signers.len()),
            (100 << 20, 10, Fsync::Batch, 0)
        );
        // A public key where the private one belongs is refused, naming the flag.
        let e = Run::try_parse_from(["run", "--audit-key", &format!("{}.pub", key.display())])
            .unwrap()
            .audit
            .options()
            .unwrap_err();
        assert!(format!("{e:#}").contains("--audit-key"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_age("0"), Ok(Duration::ZERO));
        assert!(parse_every("0s").is_err());
    }
}
