//! `cargo xtask fuzz`: the cargo-fuzz (libFuzzer) targets of `fuzz/`, each for a bounded time.
//!
//! The targets run at once (libFuzzer is single-threaded; these machines have 2 cores),
//! each with a time limit (`-max_total_time`), a memory limit (`-rss_limit_mb`) and a limit per
//! input (`-timeout`, which catches hangs). Seeds come from `fuzz/corpus-seed/TARGET`
//! (committed); new inputs go to `fuzz/corpus/TARGET` (ignored by git, kept between runs);
//! a crash is written to `fuzz/artifacts/TARGET/` and fails the command with its path.
//!
//! The build is part of `cargo xtask test`, so it is made cheap: no sanitizer (the code under
//! test is safe Rust except one `read_unaligned`, whose bounds the `event_decode` target checks
//! itself), 16 codegen units, and opt-level 1 with line tables (fuzz/Cargo.toml). It is about
//! 2 minutes from scratch on these machines, seconds after that.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::util::{cargo, display, run, workspace_root};

/// Every fuzz target of `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 4] = [
    "policy_parse",
    "policy_compile",
    "event_decode",
    "dns_input",
];
/// Seconds per target of `cargo xtask fuzz`.
pub const DEFAULT_SECONDS: u64 = 20;
/// Seconds per target in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 15;
/// libFuzzer's `-rss_limit_mb`: a run that needs more memory is a failure.
const RSS_LIMIT_MB: u64 = 2048;
/// libFuzzer's `-timeout`: one input that takes longer is a failure (a hang).
const INPUT_TIMEOUT_SECONDS: u64 = 30;
/// `cargo fuzz build` and `cargo fuzz run` options; both must be the same, or `run` rebuilds.
const BUILD_OPTIONS: [&str; 4] = ["--sanitizer", "none", "--codegen-units", "16"];

/// What one target's run printed that matters.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    runs: Option<u64>,
    execs_per_sec: Option<u64>,
    new_units: Option<u64>,
    peak_rss_mb: Option<u64>,
    /// `Test unit written to PATH` (a crash, timeout or out-of-memory input).
    artifacts: Vec<String>,
}

/// Builds the targets, runs each for `seconds`, and fails if any of them found a problem.
pub fn fuzz(seconds: u64) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let fuzz_dir = workspace_root().join("fuzz");
    let start = Instant::now();
    run(cargo()
        .current_dir(workspace_root())
        .args(["+nightly", "fuzz", "build"])
        .args(BUILD_OPTIONS))
    .context("building the fuzz targets (is cargo-fuzz installed? `cargo xtask setup`)")?;
    let built = start.elapsed();
    println!("fuzz: targets built in {:.0}s", built.as_secs_f64());

    let logs = fuzz_dir.join("target/fuzz-logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    println!(
        "fuzz: running {} for {seconds}s each, at once (logs in {})",
        TARGETS.join(", "),
        logs.display()
    );
    let mut children: Vec<(&str, PathBuf, Child)> = Vec::new();
    for target in TARGETS {
        let log = logs.join(format!("{target}.log"));
        let child = spawn_target(&fuzz_dir, target, seconds, &log);
        match child {
            Ok(child) => children.push((target, log, child)),
            Err(e) => {
                for (_, _, mut c) in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e);
            }
        }
    }

    let mut failed = Vec::new();
    for (target, log, mut child) in children {
        let status = child
            .wait()
            .with_context(|| format!("waiting for the {target} fuzzer"))?;
        let text = fs::read(&log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let stats = parse_stats(&text);
        if status.success() && stats.artifacts.is_empty() {
            println!("fuzz: {target}: ok, {}", describe(&stats, seconds));
            continue;
        }
        // What the fuzzer said, without its progress lines: the panic message and backtrace.
        println!("fuzz: {target}: FAILED ({status}); its output, without progress lines:");
        for line in text.lines().filter(|l| !is_noise(l)) {
            println!("  | {line}");
        }
        if stats.artifacts.is_empty() {
            println!(
                "fuzz: {target}: no input was written; full log: {}",
                log.display()
            );
        }
        for artifact in &stats.artifacts {
            println!("fuzz: {target}: failing input: {artifact}");
            println!(
                "fuzz: {target}: reproduce: cargo +nightly fuzz run {} {target} {artifact}",
                BUILD_OPTIONS.join(" ")
            );
        }
        failed.push(target);
    }
    println!(
        "fuzz: done in {:.0}s ({:.0}s of it building)",
        start.elapsed().as_secs_f64(),
        built.as_secs_f64()
    );
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Starts one `cargo fuzz run`, its output (libFuzzer's is on stderr) going to `log`.
fn spawn_target(fuzz_dir: &Path, target: &str, seconds: u64, log: &Path) -> Result<Child> {
    let corpus = fuzz_dir.join("corpus").join(target);
    let seeds = fuzz_dir.join("corpus-seed").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    if !seeds.is_dir() {
        bail!("no seed corpus at {}", seeds.display());
    }
    let out = fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd: Command = cargo();
    cmd.current_dir(workspace_root())
        .args(["+nightly", "fuzz", "run"])
        .args(BUILD_OPTIONS)
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    println!("+ {}", display(&cmd));
    cmd.spawn()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))
}

/// The final statistics (`-print_final_stats=1`) and the inputs libFuzzer wrote.
fn parse_stats(log: &str) -> Stats {
    let mut stats = Stats::default();
    for line in log.lines() {
        let number = |prefix: &str| -> Option<u64> {
            line.strip_prefix(prefix)
                .and_then(|rest| rest.trim().parse().ok())
        };
        if let Some(n) = number("stat::number_of_executed_units:") {
            stats.runs = Some(n);
        } else if let Some(n) = number("stat::average_exec_per_sec:") {
            stats.execs_per_sec = Some(n);
        } else if let Some(n) = number("stat::new_units_added:") {
            stats.new_units = Some(n);
        } else if let Some(n) = number("stat::peak_rss_mb:") {
            stats.peak_rss_mb = Some(n);
        } else if let Some(i) = line.find("Test unit written to ") {
            let path = line[i + "Test unit written to ".len()..].trim();
            if !path.is_empty() {
                stats.artifacts.push(path.to_string());
            }
        }
    }
    stats
}

fn describe(stats: &Stats, seconds: u64) -> String {
    let or_unknown = |n: Option<u64>| n.map_or("?".to_string(), |n| n.to_string());
    format!(
        "{} runs in {seconds}s ({} execs/s), {} new inputs, peak RSS {} MB",
        or_unknown(stats.runs),
        or_unknown(stats.execs_per_sec),
        or_unknown(stats.new_units),
        or_unknown(stats.peak_rss_mb)
    )
}

/// libFuzzer's progress and bookkeeping lines, left out when a failure is shown.
fn is_noise(line: &str) -> bool {
    let line = line.trim_start();
    (line.starts_with('#') && line[1..].starts_with(|c: char| c.is_ascii_digit()))
        || line.starts_with("NEW_FUNC")
        || line.starts_with("stat::")
        || line.contains("# Uses: ")
        || line.starts_with("###### ")
        || line.starts_with("WARNING: Failed to find function \"__sanitizer_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSED: &str = "\
INFO: Seed: 2598687560
#2\tINITED cov: 31 ft: 32 corp: 1/1b exec/s: 0 rss: 50Mb
#8192\tpulse  cov: 1024 ft: 2000 corp: 100/2Kb lim: 4096 exec/s: 4096 rss: 50Mb
\tNEW_FUNC[1/1]: 0x55ae7a3acac1
\"\\000\\000\\000a\" # Uses: 21
###### Recommended dictionary. ######
Done 879513 runs in 21 second(s)
stat::number_of_executed_units: 879513
stat::average_exec_per_sec:     41881
stat::new_units_added:          485
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              50
";

    const CRASHED: &str = "\
thread '<unnamed>' panicked at fuzz_targets/policy_compile.rs:519:17:
assertion `left == right` failed
==1234== ERROR: libFuzzer: deadly signal
MS: 2 ChangeBit-InsertByte-; base unit: 0123
artifact_prefix='/w/fuzz/artifacts/policy_compile/'; Test unit written to /w/fuzz/artifacts/policy_compile/crash-abc
Base64: AAEC
";

    #[test]
    fn final_stats_are_read() {
        let stats = parse_stats(PASSED);
        assert_eq!(
            stats,
            Stats {
                runs: Some(879_513),
                execs_per_sec: Some(41_881),
                new_units: Some(485),
                peak_rss_mb: Some(50),
                artifacts: vec![],
            }
        );
        assert_eq!(
            describe(&stats, 15),
            "879513 runs in 15s (41881 execs/s), 485 new inputs, peak RSS 50 MB"
        );
        assert_eq!(
            describe(&Stats::default(), 15),
            "? runs in 15s (? execs/s), ? new inputs, peak RSS ? MB"
        );
    }

    #[test]
    fn crash_artifacts_are_found() {
        let stats = parse_stats(CRASHED);
        assert_eq!(
            stats.artifacts,
            ["/w/fuzz/artifacts/policy_compile/crash-abc"]
        );
        assert_eq!(stats.runs, None);
    }

    #[test]
    fn progress_lines_are_noise_and_panics_are_not() {
        let kept: Vec<&str> = PASSED.lines().filter(|l| !is_noise(l)).collect();
        assert_eq!(
            kept,
            ["INFO: Seed: 2598687560", "Done 879513 runs in 21 second(s)"]
        );
        assert!(CRASHED.lines().all(|l| !is_noise(l)));
    }

    #[test]
    fn targets_match_the_fuzz_manifest() {
        let manifest = fs::read_to_string(workspace_root().join("fuzz/Cargo.toml")).unwrap();
        let bins: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|name| *name != "agentwall-fuzz")
            .collect();
        assert_eq!(bins, TARGETS);
        for target in TARGETS {
            let seeds = workspace_root().join("fuzz/corpus-seed").join(target);
            assert!(
                fs::read_dir(&seeds).map(|d| d.count()).unwrap_or(0) > 0,
                "no seeds in {}",
                seeds.display()
            );
        }
    }
}
