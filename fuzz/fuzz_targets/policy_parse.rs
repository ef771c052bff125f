//! Any bytes, as text, through the policy parser and, when they parse, the compiler.
//!
//! Never panics; an error names the file and stays short whatever the input quotes; a policy
//! that parses keeps the invariants the compiler and the controller rely on.

#![no_main]

use std::path::Path;

use agent_common::{proto, MAX_PORT_RULES};
use agentwall::policy::{compile, parse_policy, PolicySet};
use libfuzzer_sys::fuzz_target;

/// An error line: the path, `:line:column: `, and a message of at most about 1 KiB.
const MAX_ERROR_LINE: usize = 1200;

/// Cgroup paths every parsed selector is matched against (glob matching must stay cheap).
const CGROUPS: &[&str] = &[
    "agentwall/demo",
    "agentwall/research-7",
    "kubepods.slice/kubepods-besteffort.slice/pod1/cri-x.scope",
    "a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let source = Path::new("fuzz.yaml");
    let policy = match parse_policy(source, &text) {
        Ok(p) => p,
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.yaml"), "{shown}");
            assert!(
                shown.len() <= MAX_ERROR_LINE,
                "error of {} bytes: {}...",
                shown.len(),
                &shown[..shown.floor_char_boundary(200)]
            );
            if let Some((line, column)) = e.line_column() {
                assert!(line >= 1 && column >= 1, "{line}:{column}");
            }
            return;
        }
    };

    assert!(!policy.agents.is_empty());
    for (index, rule) in policy.rules.iter().enumerate() {
        assert_eq!(rule.id as usize, index);
        assert!(!rule.nets.is_empty(), "{rule}");
        assert!(!rule.ports.is_empty(), "{rule}");
        assert!(rule.ports.iter().all(|(lo, hi)| lo <= hi), "{rule}");
        assert!(
            rule.protocols != 0 && rule.protocols & !proto::ALL == 0,
            "{rule}"
        );
        assert!(
            rule.nets.iter().all(|n| n.addr() == n.network()),
            "host bits in {rule}"
        );
    }
    let _ = policy.to_string();
    let set = PolicySet {
        policies: vec![policy],
    };
    for cgroup in CGROUPS {
        let _ = set.find_for_cgroup(cgroup);
    }
    let policy = &set.policies[0];

    match compile(policy) {
        Ok(compiled) => {
            for (len, _, set) in &compiled.v4 {
                assert!(*len <= 32);
                assert!(set.count as usize <= MAX_PORT_RULES);
            }
            for (len, _, set) in &compiled.v6 {
                assert!(*len <= 128);
                assert!(set.count as usize <= MAX_PORT_RULES);
            }
            let _ = compiled.to_string();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
