//! The CLI without root: `agentwall policy check`.

use std::process::Command;

fn check(path: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentwall"))
        .args(["policy", "check"])
        .arg(path)
        .output()
        .expect("run agentwall");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_policies_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let (ok, out, err) = check(&dir);
    assert!(ok, "{err}");
    assert!(out.contains("policy \"demo\""), "{out}");
    assert!(out.contains("policies valid"), "{out}");
}

#[test]
fn an_invalid_file_is_rejected_with_file_line_and_column() {
    let dir = std::env::temp_dir().join(format!("agentwall-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "name: bad\nagents:\n  cgroups: [agentwall/x]\negress:\n  - cidr: 10.0.0.0/8\n    ports: [\"90-80\"]\n",
    )
    .unwrap();
    let (ok, _, err) = check(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!ok, "an invalid policy passed the check");
    assert!(
        err.contains("bad.yaml:6:"),
        "no file:line:column in {err:?}"
    );
}
