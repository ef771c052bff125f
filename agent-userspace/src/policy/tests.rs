//! Parsing and loading tests. Compilation is tested in `compile.rs`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use agent_common::proto::{ALL, TCP, UDP};
use agent_common::{mode, PortRule};

use super::*;

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn parse(text: &str) -> Result<Policy, PolicyError> {
    parse_policy(Path::new("policies/t.yaml"), text)
}

/// The error of an invalid policy as (line, column, message); panics if it parses.
fn error_at(text: &str) -> (u64, u64, String) {
    match parse(text) {
        Ok(p) => panic!("parsed but should not:\n{text}\n{p}"),
        Err(PolicyError::Invalid {
            line,
            column,
            message,
            ..
        }) => (line, column, message),
        Err(e) => panic!("unexpected error kind: {e:?}"),
    }
}

/// Asserts the error's location and that its message contains `needle`, and that `Display`
/// starts with `policies/t.yaml:line:column: `.
#[track_caller]
fn assert_error(text: &str, line: u64, column: u64, needle: &str) {
    let (l, c, message) = error_at(text);
    assert!(
        message.contains(needle),
        "message {message:?} does not contain {needle:?}"
    );
    assert_eq!((l, c), (line, column), "wrong location for {message:?}");
    let shown = parse(text).unwrap_err().to_string();
    assert_eq!(shown, format!("policies/t.yaml:{line}:{column}: {message}"));
}

const HEAD: &str = "name: t\nagents:\n  cgroups: [agentwall/t]\negress:\n";

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "agentwall-policy-{}-{tag}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn policy_text(name: &str, cgroup: &str) -> String {
    format!("name: {name}\nagents:\n  cgroups:\n    - {cgroup}\negress:\n  - cidr: 10.0.0.0/8\n")
}

// ---------------------------------------------------------------- the shipped policies

#[test]
fn demo_policy() {
    let p = load_file(&policies_dir().join("demo.yaml")).unwrap();
    assert_eq!(p.name, "demo");
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.mode.as_kernel(), mode::ENFORCE);
    assert_eq!(p.agents.len(), 1);
    assert_eq!(p.agents[0].pattern, "agentwall/demo");
    assert!(p.agents[0].is_literal());
    assert!(p.source.ends_with("demo.yaml"));
    let summary: Vec<_> = p
        .rules
        .iter()
        .map(|r| {
            (
                r.id,
                r.name.as_deref().unwrap(),
                r.nets.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                r.ports.clone(),
                r.protocols,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                0,
                "local-api",
                vec!["127.0.0.1/32".into()],
                vec![(8080, 8080)],
                TCP
            ),
            (
                1,
                "local-tools",
                vec!["127.0.0.1/32".into()],
                vec![(9000, 9010)],
                TCP
            ),
            (
                2,
                "local-mdns",
                vec!["127.0.0.1/32".into()],
                vec![(5353, 5353)],
                UDP
            ),
            (
                3,
                "local-api-v6",
                vec!["::1/128".into()],
                vec![(8080, 8080)],
                TCP
            ),
            (4, "tools-api", vec![], vec![(8443, 8443)], TCP),
        ]
    );
    // By name: the demo zone only.
    assert_eq!(p.rules[4].hosts.len(), 1);
    assert_eq!(p.rules[4].hosts[0].to_string(), "api.tools.demo");
    // Only loopback destinations.
    for rule in &p.rules {
        for net in &rule.nets {
            assert!(net.addr().is_loopback(), "{net} is not loopback");
        }
    }

    let c = compile(&p).unwrap();
    let pr = |lo, hi, protocols, rule_id| PortRule {
        port_lo: lo,
        port_hi: hi,
        protocols,
        rule_id,
    };
    assert_eq!(c.v4.len(), 1);
    let (len, addr, set) = &c.v4[0];
    assert_eq!((*len, *addr), (32, [127, 0, 0, 1]));
    assert_eq!(
        &set.rules[..set.count as usize],
        &[
            pr(5353, 5353, UDP, 2),
            pr(8080, 8080, TCP, 0),
            pr(9000, 9010, TCP, 1)
        ]
    );
    assert_eq!(c.v6.len(), 1);
    let (len, addr, set) = &c.v6[0];
    assert_eq!(*len, 128);
    assert_eq!(*addr, std::net::Ipv6Addr::LOCALHOST.octets());
    assert_eq!(&set.rules[..set.count as usize], &[pr(8080, 8080, TCP, 3)]);
    assert_eq!(
        p.unix,
        [UnixTarget::Path("/run/agentwall-demo/tools.sock".into())]
    );
    assert_eq!(c.unix.len(), 1);

    let set = load_dir(&policies_dir().join("demo.yaml")).unwrap();
    assert_eq!(set.policies.len(), 1);
    assert_eq!(set.find_for_cgroup("agentwall/demo").len(), 1);
    assert_eq!(set.find_for_cgroup("/agentwall/demo").len(), 1);
    assert!(set.find_for_cgroup("agentwall/demo2").is_empty());
    assert!(set.find_for_cgroup("agentwall").is_empty());
}

#[test]
fn example_policy() {
    let p = load_file(&policies_dir().join("example.yaml")).unwrap();
    assert_eq!(p.name, "example-research");
    assert_eq!(p.mode, Mode::Audit);
    assert_eq!(p.mode.as_kernel(), mode::AUDIT);
    let patterns: Vec<_> = p.agents.iter().map(|a| a.pattern.as_str()).collect();
    assert_eq!(
        patterns,
        [
            "agentwall/example",
            "agentwall/research-*",
            "kubepods.slice/**"
        ]
    );
    assert_eq!(
        p.agents.iter().map(|a| a.is_literal()).collect::<Vec<_>>(),
        [true, false, false]
    );
    assert_eq!(p.rules.len(), 6);
    assert_eq!(
        p.rules[5]
            .hosts
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>(),
        ["api.example.com", "*.storage.example.com"]
    );
    assert_eq!(p.dns.query_rate.map(|r| r.per_second), Some(50));
    assert_eq!(
        p.unix,
        [
            UnixTarget::Path("/run/nscd/socket".into()),
            UnixTarget::Directory("/run/agent-tools/".into()),
            UnixTarget::Abstract("tool-broker".into()),
        ]
    );
    assert_eq!(p.rules[0].ports, vec![(443, 443), (8000, 8099)]);
    assert_eq!(p.rules[1].nets.len(), 2);
    assert_eq!(p.rules[1].protocols, ALL);
    assert_eq!(p.rules[2].ports, vec![(0, 65535)]);
    assert_eq!(p.rules[2].protocols, ALL);
    assert_eq!(p.rules[3].name, None);
    assert_eq!(p.rules[4].ports, vec![(5000, 5010), (6000, 6000)]);

    // Only documentation ranges.
    let doc: Vec<ipnet::IpNet> = ["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let mapped_doc: ipnet::IpNet = "::ffff:198.51.100.0/120".parse().unwrap();
    for net in p.rules.iter().flat_map(|r| &r.nets) {
        assert!(
            doc.iter().any(|d| d.contains(net)) || mapped_doc.contains(net),
            "{net} is not a documentation range"
        );
    }

    let set = load_dir(&policies_dir().join("example.yaml")).unwrap();
    assert_eq!(set.find_for_cgroup("agentwall/research-7").len(), 1);
    assert!(set.find_for_cgroup("agentwall/research-7/child").is_empty());
    assert_eq!(
        set.find_for_cgroup("kubepods.slice/kubepods-besteffort.slice/pod1/cri-x.scope")
            .len(),
        1
    );
    assert!(set.find_for_cgroup("kubepods.slice").is_empty());
    assert!(set.find_for_cgroup("system.slice/ssh.service").is_empty());

    let c = compile(&p).unwrap();
    // The IPv4-mapped rule lands in v4, as 198.51.100.0/24; 198.51.100.53/32 carries both.
    let v4: Vec<_> = c.v4.iter().map(|(l, a, _)| (*l, *a)).collect();
    assert_eq!(
        v4,
        [
            (24, [192, 0, 2, 0]),
            (24, [198, 51, 100, 0]),
            (32, [198, 51, 100, 53])
        ]
    );
    let dns = &c.v4[2].2;
    assert_eq!(dns.count, 3);
    assert_eq!(c.v6.len(), 3);
    // Shown briefly.
    let shown = p.to_string();
    assert!(shown.contains("policy example-research (audit"), "{shown}");
    assert!(shown
        .contains("rule 1 (syslog): 198.51.100.53/32, 2001:db8::53/128, protocol any, port 514"));
    assert!(c.to_string().contains(
        "198.51.100.53/32: tcp+udp 514 (rule 1), udp 5000-5010 (rule 4), udp 6000 (rule 4)"
    ));
}

// ---------------------------------------------------------------- values

#[test]
fn defaults_and_forms() {
    let p = parse(&format!(
        "{HEAD}  - cidr: 10.0.0.0/8\n  - cidr: 10.1.2.3\n    ports: 443\n  - cidr: ::1\n    ports: \
         [\"80\", \" 81 - 82 \", 0x10, 65535]\n    protocol: udp\n  - cidrs: [::ffff:10.0.0.0/104, \
         fe80::/10]\n    ports: \"1000-2000\"\n"
    ))
    .unwrap();
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.rules.len(), 4);
    // Ports omitted: all ports; protocol omitted: any.
    assert_eq!(p.rules[0].ports, [(0, 65535)]);
    assert_eq!(p.rules[0].protocols, ALL);
    assert_eq!(p.rules[0].name, None);
    // A bare IPv4 address is /32, a bare IPv6 address /128; a single port is allowed.
    assert_eq!(p.rules[1].nets[0].to_string(), "10.1.2.3/32");
    assert_eq!(p.rules[1].ports, [(443, 443)]);
    assert_eq!(p.rules[2].nets[0].to_string(), "::1/128");
    assert_eq!(
        p.rules[2].ports,
        [(80, 80), (81, 82), (16, 16), (65535, 65535)]
    );
    assert_eq!(p.rules[2].protocols, UDP);
    assert_eq!(p.rules[3].nets.len(), 2);
    assert_eq!(p.rules[3].ports, [(1000, 2000)]);
    assert_eq!(
        p.rules.iter().map(|r| r.id).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );

    // A leading slash on a cgroup path is stripped; egress may be empty (deny everything).
    let p = parse("name: t\nmode: audit\nagents:\n  cgroups: [/a/b]\negress: []\n").unwrap();
    assert_eq!(p.agents[0].pattern, "a/b");
    assert_eq!(p.mode, Mode::Audit);
    assert!(p.rules.is_empty());
    assert!(compile(&p).unwrap().is_empty());
}

#[test]
fn anchors_are_fine_in_moderation() {
    // One port list used by many rules: not an alias bomb.
    let mut text =
        format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: &web [80, 443, \"8000-8080\"]\n");
    for i in 0..5000 {
        text.push_str(&format!(
            "  - cidr: 10.1.{}.{}\n    ports: *web\n",
            i / 256,
            i % 256
        ));
    }
    let p = parse(&text).unwrap();
    assert_eq!(p.rules.len(), 5001);
    assert_eq!(p.rules[5000].ports, [(80, 80), (443, 443), (8000, 8080)]);
}

#[test]
fn selectors() {
    let s = CgroupSelector::new("agentwall/research-*").unwrap();
    assert!(!s.is_literal());
    assert!(s.matches("agentwall/research-1"));
    assert!(!s.matches("agentwall/research-1/x"));
    assert!(!s.matches("agentwall/other"));
    let s = CgroupSelector::new("a/**/leaf").unwrap();
    assert!(s.matches("a/leaf"));
    assert!(s.matches("a/b/c/leaf"));
    assert!(!s.matches("a/b/c/leaf/x"));
    let s = CgroupSelector::new("a/b?/[xy]").unwrap();
    assert!(s.matches("a/b1/x"));
    assert!(!s.matches("a/b1/z"));
    assert!(!s.matches("a/b//x"));
    let s = CgroupSelector::new("/a.slice/b").unwrap();
    assert!(s.is_literal());
    assert_eq!(s.pattern, "a.slice/b");
    assert!(s.matches("a.slice/b"));
    assert!(!s.matches("a.slice/b/c"));
    assert!(!s.matches("a.slice"));
    for bad in [
        "", "/", "a/", "a//b", "a/../b", "./a", "a/**b", "a/[", "a\u{1b}b",
    ] {
        assert!(CgroupSelector::new(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn find_for_cgroup_returns_every_match_in_name_order() {
    let dir = TempDir::new("find");
    dir.write("b.yaml", &policy_text("b", "agentwall/*"));
    dir.write("a.yaml", &policy_text("a", "agentwall/x"));
    dir.write("c.yaml", &policy_text("c", "other/**"));
    let set = load_dir(&dir.0).unwrap();
    let names = |v: Vec<&Policy>| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(set.find_for_cgroup("agentwall/x")), ["a", "b"]);
    assert_eq!(names(set.find_for_cgroup("agentwall/y")), ["b"]);
    assert_eq!(names(set.find_for_cgroup("other/1/2")), ["c"]);
    assert!(set.find_for_cgroup("agentwall/x/y").is_empty());
    assert_eq!(set.get("c").unwrap().name, "c");
    assert!(set.get("d").is_none());
}

// ---------------------------------------------------------------- errors, with locations

#[test]
fn error_invalid_cidr() {
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.300/8\n"),
        5,
        11,
        "invalid CIDR \"10.0.0.300/8\": invalid IP address syntax",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/33\n"),
        5,
        11,
        "invalid CIDR \"10.0.0.0/33\"",
    );
    assert_error(
        &format!("{HEAD}  - cidr: example.com\n"),
        5,
        11,
        "invalid CIDR \"example.com\"",
    );
    // In a cidrs list: the entry itself.
    assert_error(
        &format!("{HEAD}  - cidrs:\n      - 10.0.0.0/8\n      - fe80::1%eth0\n"),
        7,
        9,
        "invalid CIDR \"fe80::1%eth0\"",
    );
    assert_error(
        &format!("{HEAD}  - cidrs: [10.0.0.0/8, 300.1.1.1]\n"),
        5,
        25,
        "invalid CIDR \"300.1.1.1\"",
    );
}

#[test]
fn error_host_bits() {
    assert_error(
        &format!("{HEAD}  - name: x\n    cidr: 10.1.2.3/8\n"),
        6,
        11,
        "host bits set in \"10.1.2.3/8\"; did you mean 10.0.0.0/8?",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 2001:db8::1/32\n"),
        5,
        11,
        "did you mean 2001:db8::/32?",
    );
}

#[test]
fn error_ports() {
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: [80, \"90-80\"]\n"),
        6,
        17,
        "invalid port range \"90-80\"",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: [70000]\n"),
        6,
        13,
        "port 70000 is out of range (0-65535)",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports:\n      - 1\n      - -1\n"),
        8,
        9,
        "port -1 is out of range",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: [\"1-70000\"]\n"),
        6,
        13,
        "port 70000 is out of range",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: [http]\n"),
        6,
        13,
        "invalid port \"http\"",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: [1.5]\n"),
        6,
        13,
        "expected a port number or a range",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: []\n"),
        6,
        12,
        "ports is empty; omit `ports` to allow all ports",
    );
}

#[test]
fn error_protocol_and_mode() {
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    protocol: icmp\n"),
        6,
        15,
        "unknown protocol \"icmp\": expected \"tcp\", \"udp\" or \"any\"",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    protocol: TCP\n"),
        6,
        15,
        "unknown protocol \"TCP\"",
    );
    assert_error(
        "name: t\nmode: block\nagents:\n  cgroups: [a]\negress: []\n",
        2,
        7,
        "unknown mode \"block\": expected \"enforce\" or \"audit\"",
    );
}

#[test]
fn error_names() {
    assert_error(
        "name: Demo\nagents:\n  cgroups: [a]\negress: []\n",
        1,
        7,
        "invalid policy name \"Demo\"",
    );
    assert_error(
        "name: -x\nagents:\n  cgroups: [a]\negress: []\n",
        1,
        7,
        "invalid policy name \"-x\"",
    );
    assert_error(
        &format!(
            "name: {}\nagents:\n  cgroups: [a]\negress: []\n",
            "a".repeat(64)
        ),
        1,
        7,
        "invalid policy name",
    );
    assert!(parse(&format!(
        "name: {}\nagents:\n  cgroups: [a]\negress: []\n",
        "a".repeat(63)
    ))
    .is_ok());
    assert!(parse("name: a0_.-z\nagents:\n  cgroups: [a]\negress: []\n").is_ok());
    assert_error(
        &format!("{HEAD}  - name: \"\"\n    cidr: 10.0.0.0/8\n"),
        5,
        11,
        "invalid rule name \"\"",
    );
    assert_error(
        &format!("{HEAD}  - name: \"a\\tb\"\n    cidr: 10.0.0.0/8\n"),
        5,
        11,
        "control characters are not allowed",
    );
    assert_error(
        &format!(
            "{HEAD}  - name: web\n    cidr: 10.0.0.0/8\n  - name: web\n    cidr: 10.0.0.0/9\n"
        ),
        7,
        11,
        "rule name \"web\" is used twice (first at 5:11)",
    );
}

#[test]
fn error_cgroups() {
    assert_error(
        "name: t\nagents:\n  cgroups: []\negress: []\n",
        3,
        12,
        "agents.cgroups is empty",
    );
    assert_error(
        "name: t\nagents:\n  cgroups:\n    - ok/path\n    - bad/**x\negress: []\n",
        5,
        7,
        "invalid cgroup glob \"bad/**x\": recursive wildcards must form a single path component",
    );
    assert_error(
        "name: t\nagents:\n  cgroups: [\"a/[b\"]\negress: []\n",
        3,
        13,
        "invalid cgroup glob \"a/[b\"",
    );
    assert_error(
        "name: t\nagents:\n  cgroups: [a//b]\negress: []\n",
        3,
        13,
        "empty component",
    );
    assert_error(
        "name: t\nagents:\n  cgroups: [a, /a]\negress: []\n",
        3,
        16,
        "cgroup selector \"a\" is listed twice (first at 3:13)",
    );
    assert_error(
        "name: t\nagents: {}\negress: []\n",
        2,
        9,
        "agents has no `cgroups`",
    );
    assert_error(
        "name: t\nagents:\n    cgroups: [a]\n    cgroup: [b]\negress: []\n",
        4,
        5,
        "unknown field `cgroup`, expected one of cgroups",
    );
}

#[test]
fn error_rule_shape() {
    assert_error(
        &format!("{HEAD}  - name: x\n    ports: [1]\n"),
        5,
        5,
        "rule has no destination",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    cidrs: [10.0.0.0/9]\n"),
        6,
        12,
        "either `cidr` or `cidrs`, not both",
    );
    assert_error(&format!("{HEAD}  - cidrs: []\n"), 5, 12, "cidrs is empty");
    // A typo is an error, not an ignored key.
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    protcol: tcp\n"),
        6,
        5,
        "unknown field `protcol`, expected one of name, cidr, cidrs, host, hosts, ports, protocol",
    );
    assert_error(
        "name: t\nagents:\n  cgroups: [a]\negres: []\n",
        4,
        1,
        "unknown field `egres`",
    );
    // A missing key is reported at the start of the mapping that lacks it.
    assert_error(
        "# comment\nname: t\nagents:\n  cgroups: [a]\n",
        2,
        1,
        "the policy has no `egress` (write `egress: []` to deny everything)",
    );
    assert_error(
        "agents:\n  cgroups: [a]\negress: []\n",
        1,
        1,
        "the policy has no `name`",
    );
    assert_error("name: t\negress: []\n", 1, 1, "the policy has no `agents`");
}

#[test]
fn error_yaml() {
    assert_error(
        "name: t\nname: u\nagents:\n  cgroups: [a]\negress: []\n",
        2,
        1,
        "duplicate mapping key `name` is not allowed here",
    );
    assert_error(
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: [1]\n    ports: [2]\n"),
        7,
        5,
        "duplicate mapping key `ports` is not allowed here",
    );
    // Syntax: an unclosed flow sequence.
    let (line, column, _) = error_at("name: t\nagents:\n  cgroups: [a\negress: []\n");
    assert!(line >= 3 && column > 0, "{line}:{column}");
    // Two documents.
    assert_error(
        "name: t\nagents:\n  cgroups: [a]\negress: []\n---\nname: u\n",
        5,
        1,
        "a policy file holds one YAML document; this is a second one",
    );
    // Unknown tags.
    assert_error(
        &format!("{HEAD}  - cidr: !secret 10.0.0.0/8\n"),
        5,
        19,
        "unsupported tag `!secret`",
    );
    // Empty files.
    let e = parse("").unwrap_err();
    assert_eq!(e.to_string(), "policies/t.yaml: empty policy file");
    assert!(parse("# nothing\n").is_err());
    // A wrong type.
    assert_error(
        "name: t\nagents:\n  cgroups: a\negress: []\n",
        3,
        12,
        "expected sequence start",
    );
}

#[test]
fn error_in_anchored_value_names_both_places() {
    let (line, column, message) = error_at(&format!(
        "{HEAD}  - cidr: 10.0.0.0/8\n    ports: &p [80, \"90-80\"]\n  - cidr: 10.0.0.0/9\n    ports: *p\n"
    ));
    // The anchored value is checked where it is first read: its definition.
    assert_eq!((line, column), (6, 20), "{message}");
}

// ---------------------------------------------------------------- hostile input
//
// Each case must end in a clear error (or, where harmless, a quick parse) within bounded time
// and memory. The elapsed time is printed (`--nocapture`), not asserted: debug builds on a busy
// machine vary too much for a fair limit.

/// Parses hostile `text`, prints what it cost, and returns the error, which must be
/// `PolicyError::Invalid` with a bounded message (a value of megabytes is never copied whole
/// into it).
#[track_caller]
fn rejected(what: &str, text: &str) -> (u64, u64, String) {
    let start = Instant::now();
    let result = parse(text);
    let took = start.elapsed();
    match result {
        Ok(p) => panic!(
            "{what}: parsed ({} rules), should be rejected",
            p.rules.len()
        ),
        Err(PolicyError::Invalid {
            line,
            column,
            message,
            ..
        }) => {
            eprintln!(
                "{what}: {} bytes rejected in {took:?}: {line}:{column}: {message}",
                text.len()
            );
            assert!(
                message.len() <= raw::MAX_MESSAGE_BYTES + 64,
                "{what}: message of {} bytes",
                message.len()
            );
            (line, column, message)
        }
        Err(e) => panic!("{what}: unexpected error kind: {e:?}"),
    }
}

/// Bytes of filler that keep a document just under the file size limit.
const NEAR_LIMIT: usize = MAX_POLICY_FILE_BYTES as usize - 4096;

#[test]
fn hostile_huge_file_is_rejected_before_reading() {
    // In memory: the length is checked before parsing.
    let text = format!("{HEAD}#{}\n", "x".repeat(MAX_POLICY_FILE_BYTES as usize));
    let start = Instant::now();
    match parse(&text) {
        Err(PolicyError::TooLarge { size, limit, .. }) => {
            assert_eq!(limit, MAX_POLICY_FILE_BYTES);
            assert_eq!(size, text.len() as u64);
        }
        other => panic!("{other:?}"),
    }
    eprintln!(
        "{} bytes of text rejected in {:?}",
        text.len(),
        start.elapsed()
    );

    // On disk: one byte over the limit.
    let dir = TempDir::new("large");
    let path = dir.write("big.yaml", &text[..MAX_POLICY_FILE_BYTES as usize + 1]);
    let e = load_file(&path).unwrap_err();
    assert!(
        matches!(e, PolicyError::TooLarge { size, .. } if size == MAX_POLICY_FILE_BYTES + 1),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{}: file is {} bytes, more than the limit of {MAX_POLICY_FILE_BYTES} bytes",
            path.display(),
            MAX_POLICY_FILE_BYTES + 1
        )
    );
    std::fs::remove_file(&path).unwrap();

    // A sparse 64 GiB file: rejected from its size alone (reading it would take minutes and
    // all the memory there is).
    let path = dir.0.join("sparse.yaml");
    let size = 64u64 << 30;
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    let start = Instant::now();
    let e = load_file(&path).unwrap_err();
    eprintln!(
        "sparse {size}-byte file rejected in {:?}: {e}",
        start.elapsed()
    );
    assert!(
        matches!(e, PolicyError::TooLarge { size: s, .. } if s == size),
        "{e:?}"
    );
    // And through the directory loader.
    let e = load_dir(&dir.0).unwrap_err();
    assert!(matches!(e, PolicyError::TooLarge { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(&path.display().to_string()),
        "{e}"
    );

    // Exactly at the limit is read and parsed: a valid policy with a comment line as long as
    // the file allows (harmless: one pass over it).
    let mut text = format!("{HEAD}  - cidr: 10.0.0.0/8\n#");
    text.push_str(&"x".repeat(MAX_POLICY_FILE_BYTES as usize - text.len() - 1));
    text.push('\n');
    assert_eq!(text.len() as u64, MAX_POLICY_FILE_BYTES);
    let start = Instant::now();
    let p = parse(&text).unwrap();
    eprintln!(
        "a comment line of {} bytes parsed in {:?}",
        text.len(),
        start.elapsed()
    );
    assert_eq!(p.rules.len(), 1);
}

#[test]
fn hostile_special_files_are_refused() {
    let dir = TempDir::new("special");
    // A FIFO: opening it for reading would block until a writer came. It is refused at once.
    let fifo = dir.0.join("fifo.yaml");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let start = Instant::now();
    let e = load_file(&fifo).unwrap_err();
    eprintln!("FIFO refused in {:?}: {e}", start.elapsed());
    assert_eq!(
        e.to_string(),
        format!("{}: not a regular file", fifo.display())
    );
    let e = load_dir(&dir.0).unwrap_err();
    assert!(matches!(e, PolicyError::Io { .. }), "{e:?}");
    std::fs::remove_file(&fifo).unwrap();

    // A device behind a symlink: endless zeros, never read.
    let zero = dir.0.join("zero.yaml");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let e = load_file(&zero).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: not a regular file", zero.display())
    );
}

#[test]
fn hostile_deep_nesting_is_rejected_quickly() {
    let depth = 200_000;
    let (line, _, message) = rejected(
        "flow sequences nested 200,000 deep",
        &format!(
            "name: t\nagents:\n  cgroups: {}a{}\negress: []\n",
            "[".repeat(depth),
            "]".repeat(depth)
        ),
    );
    assert_eq!(line, 3);
    assert!(message.contains("nesting too deep"), "{message}");

    let (line, _, message) = rejected(
        "flow mappings nested 200,000 deep",
        &format!(
            "{HEAD}  - cidr: 10.0.0.0/8\n    ports: {}1{}\n",
            "{a: ".repeat(depth),
            "}".repeat(depth)
        ),
    );
    // The schema refuses the first mapping before the nesting limit is reached.
    assert_eq!(line, 6);
    assert!(message.contains("invalid type: map"), "{message}");

    // Where the schema reads it: a list of lists of ... as the ports of a rule.
    let (line, _, message) = rejected(
        "flow sequences nested 200,000 deep in a rule",
        &format!(
            "{HEAD}  - cidr: 10.0.0.0/8\n    ports: {}1{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        ),
    );
    assert_eq!(line, 6);
    assert!(message.contains("nesting too deep"), "{message}");

    let mut text = String::from("name: t\nagents:\n  cgroups:\n");
    for level in 0..2_000 {
        text.push_str(&" ".repeat(4 + 2 * level));
        text.push_str("-\n");
    }
    let (line, _, message) = rejected("block sequences nested 2,000 deep", &text);
    assert!(line > 3, "{line}: {message}");

    let mut text = String::from("name: t\nagents:\n  cgroups: [a]\negress:\n");
    for level in 0..2_000 {
        text.push_str(&" ".repeat(2 + 2 * level));
        text.push_str("- a:\n");
    }
    let (line, _, message) = rejected("block mappings nested 2,000 deep in egress", &text);
    assert!(line >= 5, "{line}: {message}");
}

#[test]
fn hostile_alias_bombs_are_rejected_quickly() {
    // Quadratic: a long port list referenced by many rules (each alias replays the list).
    let ports: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    let mut text = format!(
        "{HEAD}  - cidr: 10.0.0.0/8\n    ports: &big [{}]\n",
        ports.join(",")
    );
    for i in 0..5000 {
        text.push_str(&format!(
            "  - cidr: 10.0.{}.{}\n    ports: *big\n",
            i / 256,
            i % 256
        ));
    }
    let (line, _, message) = rejected("quadratic alias bomb", &text);
    assert!(
        message.contains(
            "YAML document too large or too complex: total_replayed_events=1000001 > 1000000"
        ),
        "{message}"
    );
    assert!(line > 6);

    // Exponential (billion laughs), nested where the schema would read it.
    let mut text = format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: &a0 [1,1,1,1,1,1,1,1,1]\n");
    for i in 1..12 {
        let refs = vec![format!("*a{}", i - 1); 9].join(",");
        text.push_str(&format!(
            "  - cidr: 10.0.0.{i}\n    ports: &a{i} [{refs}]\n"
        ));
    }
    // The schema refuses a list where a port belongs before any expansion.
    let (line, _, message) = rejected("exponential alias bomb in egress", &text);
    assert_eq!(line, 8);
    assert!(message.contains("invalid type: sequence"), "{message}");

    // The same at the top level (unknown keys are rejected before anything is expanded).
    let mut text = String::from("a0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
    for i in 1..12 {
        let refs = vec![format!("*a{}", i - 1); 9].join(",");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    text.push_str("name: x\nagents:\n  cgroups: *a11\negress: []\n");
    let (_, _, message) = rejected("exponential alias bomb at the top level", &text);
    assert!(message.contains("unknown field `a0`"), "{message}");

    // Merge keys (`<<`) that double at every level.
    let mut text = String::from("name: t\nagents:\n  cgroups: [a]\negress:\n");
    text.push_str("  - &r0 {cidr: 10.0.0.0/8}\n");
    for i in 1..30 {
        text.push_str(&format!("  - &r{i} {{<<: [*r{p}, *r{p}]}}\n", p = i - 1));
    }
    let (_, _, message) = rejected("doubling merge keys", &text);
    assert!(message.contains("nesting too deep"), "{message}");
}

#[test]
fn hostile_long_strings_are_rejected_quickly() {
    // One value as long as the file may be; the others of 8 MiB (the cost is linear).
    let longest = "1".repeat(NEAR_LIMIT);
    let long = |c: &str| c.repeat((8 << 20) / c.len());
    let cases = [
        ("a CIDR of 32 MiB", format!("{HEAD}  - cidr: {longest}\n")),
        ("a long CIDR", format!("{HEAD}  - cidr: {}\n", long("1"))),
        (
            "a long quoted CIDR",
            format!("{HEAD}  - cidr: \"{}\"\n", long("\\t")),
        ),
        (
            "a long policy name",
            format!("name: {}\nagents:\n  cgroups: [a]\negress: []\n", long("a")),
        ),
        (
            "a long rule name",
            format!("{HEAD}  - name: {}\n    cidr: 10.0.0.0/8\n", long("a")),
        ),
        (
            "a long cgroup selector",
            format!(
                "name: t\nagents:\n  cgroups: [{}b]\negress: []\n",
                long("a/")
            ),
        ),
        (
            "a long mode",
            format!(
                "name: t\nmode: {}\nagents:\n  cgroups: [a]\negress: []\n",
                long("a")
            ),
        ),
        (
            "a long protocol",
            format!("{HEAD}  - cidr: 10.0.0.0/8\n    protocol: {}\n", long("x")),
        ),
        (
            "a long port string",
            format!(
                "{HEAD}  - cidr: 10.0.0.0/8\n    ports: [\"{}\"]\n",
                long("1")
            ),
        ),
        (
            "a long port number",
            format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: [{}]\n", long("1")),
        ),
        ("a long plain key", format!("{}: 1\nname: t\n", long("k"))),
        (
            "a long quoted key",
            format!("\"{}\": 1\nname: t\n", long("k")),
        ),
        (
            "a long unknown key in a rule",
            format!("{HEAD}  - cidr: 10.0.0.0/8\n    ? {}\n    : 1\n", long("k")),
        ),
        (
            "a long string where a mapping belongs",
            format!("name: t\nagents: {}\negress: []\n", long("a")),
        ),
        (
            "a long folded scalar",
            format!("name: t\nagents: >\n{}\negress: []\n", long("  aaaaaaa\n")),
        ),
    ];
    for (what, text) in &cases {
        assert!(text.len() as u64 <= MAX_POLICY_FILE_BYTES, "{what}");
        rejected(what, text);
    }
}

#[test]
fn hostile_long_lists_are_cut_short() {
    // Far more ports than a rule can use: refused at the first one past the limit.
    let (line, _, message) = rejected(
        "16 million ports in one flow list",
        &format!(
            "{HEAD}  - cidr: 10.0.0.0/8\n    ports: [{}1]\n",
            "1,".repeat(NEAR_LIMIT / 2)
        ),
    );
    assert_eq!(line, 6);
    assert!(
        message.contains(&format!(
            "ports has more than {} entries",
            raw::MAX_PORT_ENTRIES
        )),
        "{message}"
    );
    let (line, _, message) = rejected(
        "4 million ports in one block list",
        &format!(
            "{HEAD}  - cidr: 10.0.0.0/8\n    ports:\n{}",
            "    - 1\n".repeat(NEAR_LIMIT / 8)
        ),
    );
    assert!(line > 6, "{line}");
    assert!(message.contains("ports has more than"), "{message}");

    let (_, _, message) = rejected(
        "3 million networks in one rule",
        &format!(
            "{HEAD}  - cidrs: [{}::]\n",
            "0.0.0.0/0,".repeat(NEAR_LIMIT / 10)
        ),
    );
    assert!(
        message.contains(&format!(
            "cidrs has more than {} networks",
            raw::MAX_RULE_NETWORKS
        )),
        "{message}"
    );

    let (_, _, message) = rejected(
        "100,000 cgroup selectors",
        &format!(
            "name: t\nagents:\n  cgroups: [{}a]\negress: []\n",
            (0..100_000).map(|i| format!("a{i},")).collect::<String>()
        ),
    );
    assert!(
        message.contains(&format!(
            "agents.cgroups has more than {} selectors",
            raw::MAX_SELECTORS
        )),
        "{message}"
    );

    let (line, _, message) = rejected(
        "4 million socket kinds",
        &format!(
            "name: t\nagents:\n  cgroups: [a]\nsockets: [{}raw]\negress: []\n",
            "raw,".repeat(NEAR_LIMIT / 4)
        ),
    );
    assert_eq!(line, 4);
    assert!(
        message.contains(&format!(
            "sockets has more than {} entries",
            raw::MAX_SOCKET_KINDS
        )),
        "{message}"
    );

    // At the limits, lists are fine.
    let p = parse(&format!(
        "{HEAD}  - cidr: 10.0.0.0/8\n    ports: [{}1]\n",
        "1,".repeat(raw::MAX_PORT_ENTRIES - 1)
    ))
    .unwrap();
    assert_eq!(p.rules[0].ports.len(), raw::MAX_PORT_ENTRIES);
    let p = parse(&format!(
        "name: t\nagents:\n  cgroups: [{}a]\negress: []\n",
        (1..raw::MAX_SELECTORS)
            .map(|i| format!("a{i},"))
            .collect::<String>()
    ))
    .unwrap();
    assert_eq!(p.agents.len(), raw::MAX_SELECTORS);
}

/// Apart from the other lists: parsing the 262,144 rules before the limit takes seconds in a
/// debug build, and a test of its own runs in parallel with the others.
#[test]
fn hostile_too_many_rules_are_cut_short() {
    let (_, _, message) = rejected(
        "1.7 million rules",
        &format!(
            "{HEAD}{}",
            "  - {cidr: 0.0.0.0/0}\n".repeat(NEAR_LIMIT / 22)
        ),
    );
    assert!(
        message.contains(&format!("egress has more than {} rules", raw::MAX_RULES)),
        "{message}"
    );
}

#[test]
fn hostile_many_keys_are_rejected_quickly() {
    let keys = |n: usize, indent: &str| -> String {
        (0..n).map(|i| format!("{indent}k{i:07}: 1\n")).collect()
    };
    let (line, _, message) = rejected(
        "2.6 million unknown keys at the top level",
        &format!("{}{HEAD}", keys(NEAR_LIMIT / 12, "")),
    );
    assert_eq!(line, 1);
    assert!(message.contains("unknown field `k0000000`"), "{message}");

    let (line, _, message) = rejected(
        "2 million unknown keys in a rule",
        &format!(
            "{HEAD}  - cidr: 10.0.0.0/8\n{}",
            keys(NEAR_LIMIT / 16, "    ")
        ),
    );
    assert_eq!(line, 6);
    assert!(message.contains("unknown field `k0000000`"), "{message}");

    let (line, _, message) = rejected(
        "2 million keys under an unknown key",
        &format!("x:\n{}{HEAD}", keys(NEAR_LIMIT / 14, "  ")),
    );
    assert_eq!(line, 1);
    assert!(message.contains("unknown field `x`"), "{message}");

    let (line, _, message) = rejected(
        "2.6 million keys in a flow mapping where a string belongs",
        &format!(
            "name: {{{}}}\n",
            (0..NEAR_LIMIT / 13)
                .map(|i| format!("k{i:07}: 1, "))
                .collect::<String>()
        ),
    );
    assert_eq!(line, 1);
    assert!(!message.is_empty());

    let (line, _, message) = rejected(
        "the same key 4 million times",
        &"name: t\n".repeat(NEAR_LIMIT / 8),
    );
    assert_eq!(line, 2);
    assert!(
        message.contains("duplicate mapping key `name`"),
        "{message}"
    );

    let (line, _, message) = rejected(
        "the same key 2 million times in a rule",
        &format!(
            "{HEAD}  - cidr: 10.0.0.0/8\n{}",
            "    protocol: tcp\n".repeat(NEAR_LIMIT / 18)
        ),
    );
    assert_eq!(line, 7);
    assert!(
        message.contains("duplicate mapping key `protocol`"),
        "{message}"
    );
}

// ---------------------------------------------------------------- files and directories

#[test]
fn load_errors_name_the_path() {
    let dir = TempDir::new("paths");
    let missing = dir.0.join("nope");
    let e = load_dir(&missing).unwrap_err();
    assert!(matches!(e, PolicyError::Io { .. }));
    assert!(
        e.to_string().starts_with(&missing.display().to_string()),
        "{e}"
    );
    let e = load_file(&dir.0.join("nope.yaml")).unwrap_err();
    assert!(e.to_string().contains("nope.yaml: "), "{e}");

    let path = dir.0.join("latin1.yaml");
    std::fs::write(&path, b"name: t\nagents:\n  cgroups: [caf\xe9]\n").unwrap();
    let e = load_file(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}:3:16: file is not valid UTF-8", path.display())
    );

    let path = dir.write("bad.yaml", &format!("{HEAD}  - cidr: 10.0.0.300/8\n"));
    let e = load_file(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:5:11: invalid CIDR \"10.0.0.300/8\": invalid IP address syntax",
            path.display()
        )
    );
    assert_eq!(e.line_column(), Some((5, 11)));
}

#[test]
fn load_dir_reads_policy_files_only() {
    let dir = TempDir::new("files");
    dir.write("b.yaml", &policy_text("bravo", "agentwall/b"));
    dir.write("a.yml", &policy_text("alpha", "agentwall/a"));
    dir.write("README.md", "not a policy");
    dir.write(".hidden.yaml", "not: a policy");
    dir.write("c.yaml.bak", "not: a policy");
    std::fs::create_dir(dir.0.join("sub.yaml")).unwrap();
    dir.write("sub.yaml/x.yaml", "not: a policy");
    let set = load_dir(&dir.0).unwrap();
    let names: Vec<_> = set.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["alpha", "bravo"]);
    assert!(set.policies[0].source.ends_with("a.yml"));
}

#[test]
fn load_dir_refuses_a_directory_without_policy_files() {
    // An emptied (or wrongly mounted) policy directory must not unregister every agent.
    let empty = TempDir::new("empty");
    let e = load_dir(&empty.0).unwrap_err();
    assert!(
        matches!(&e, PolicyError::NoPolicyFiles { dir } if dir == &empty.0),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!("no policy files (*.yaml, *.yml) in {}", empty.0.display())
    );
    assert_eq!(e.line_column(), None);

    // Files that are not policies do not count.
    empty.write("README.md", "not a policy");
    empty.write(
        ".hidden.yaml",
        "name: hidden
",
    );
    empty.write(
        "old.yaml.bak",
        "name: old
",
    );
    std::fs::create_dir(empty.0.join("dir.yaml")).unwrap();
    let e = load_dir(&empty.0).unwrap_err();
    assert!(matches!(e, PolicyError::NoPolicyFiles { .. }), "{e:?}");

    // One policy file is enough.
    empty.write("a.yaml", &policy_text("a", "agentwall/a"));
    assert_eq!(load_dir(&empty.0).unwrap().policies.len(), 1);
}

#[test]
fn load_dir_is_all_or_nothing() {
    let dir = TempDir::new("all");
    dir.write("a.yaml", &policy_text("a", "agentwall/a"));
    dir.write("b.yaml", &policy_text("b", "agentwall/b"));
    assert_eq!(load_dir(&dir.0).unwrap().policies.len(), 2);

    let bad = dir.write(
        "c.yaml",
        &format!("{HEAD}  - cidr: 10.0.0.0/8\n    ports: [\"90-80\"]\n"),
    );
    let e = load_dir(&dir.0).unwrap_err();
    assert_eq!(e.line_column(), Some((6, 13)));
    assert!(
        e.to_string()
            .starts_with(&format!("{}:6:13: ", bad.display())),
        "{e}"
    );

    // Every invalid file is reported, one per line.
    dir.write("d.yaml", "name: d\n");
    let e = load_dir(&dir.0).unwrap_err();
    let PolicyError::Several(errors) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(errors.len(), 2);
    assert_eq!(e.to_string().lines().count(), 2);
    assert!(e
        .to_string()
        .lines()
        .nth(1)
        .unwrap()
        .contains("d.yaml:1:1: the policy has no `agents`"));
}

#[test]
fn duplicate_policy_names_name_both_files() {
    let dir = TempDir::new("dupname");
    let a = dir.write("a.yaml", &policy_text("same", "agentwall/a"));
    let b = dir.write(
        "b.yaml",
        &format!("# b\n{}", policy_text("same", "agentwall/b")),
    );
    let e = load_dir(&dir.0).unwrap_err();
    let PolicyError::Conflict {
        path,
        line,
        column,
        other_path,
        other_line,
        other_column,
        ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!((path, *line, *column), (&b, 2, 7));
    assert_eq!((other_path, *other_line, *other_column), (&a, 1, 7));
    assert_eq!(
        e.to_string(),
        format!(
            "{}:2:7: policy name \"same\" is used by two files; names must be unique (also in {}:1:7)",
            b.display(),
            a.display()
        )
    );
}

#[test]
fn duplicate_cgroup_selectors_name_both_files() {
    let dir = TempDir::new("dupsel");
    let a = dir.write("a.yaml", &policy_text("a", "agentwall/x"));
    let b = dir.write("b.yaml", &policy_text("b", "/agentwall/x"));
    let e = load_dir(&dir.0).unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}:4:7: cgroup selector \"agentwall/x\"",
            b.display()
        )),
        "{shown}"
    );
    assert!(
        shown.ends_with(&format!("(also in {}:4:7)", a.display())),
        "{shown}"
    );
    assert!(shown.contains("policy \"a\""), "{shown}");

    // Overlapping but different selectors are fine: find_for_cgroup returns both.
    std::fs::write(&b, policy_text("b", "agentwall/*")).unwrap();
    assert_eq!(
        load_dir(&dir.0)
            .unwrap()
            .find_for_cgroup("agentwall/x")
            .len(),
        2
    );
}

// ---------------------------------------------------------------- scale

/// 100,000 rules: parse and compile. Prints the time; `cargo test --release` for real numbers.
#[test]
fn hundred_thousand_rules() {
    let mut text = String::with_capacity(8 << 20);
    text.push_str("name: big\nagents:\n  cgroups: [agentwall/big]\negress:\n");
    text.push_str("  - name: corp\n    cidr: 10.0.0.0/8\n    ports: [443]\n    protocol: tcp\n");
    for i in 1..100_000u32 {
        let [_, b, c, d] = (0x0a00_0000u32 + i * 7).to_be_bytes();
        if i % 10 == 0 {
            text.push_str(&format!(
                "  - cidr: 2001:db8:{b:x}:{c:x}::{d:x}\n    ports: [{}, \"9000-9100\"]\n",
                1000 + i % 5000
            ));
        } else {
            text.push_str(&format!(
                "  - cidr: 10.{b}.{c}.{d}/32\n    ports: [{}]\n    protocol: {}\n",
                1 + i % 60000,
                if i % 3 == 0 { "udp" } else { "tcp" }
            ));
        }
    }
    eprintln!("100k-rule policy: {} bytes", text.len());
    let start = Instant::now();
    let p = parse(&text).unwrap();
    let parsed = start.elapsed();
    let c = compile(&p).unwrap();
    let total = start.elapsed();
    eprintln!(
        "100k rules: parse {parsed:?}, compile {:?}, total {total:?} ({} v4 + {} v6 entries)",
        total - parsed,
        c.v4.len(),
        c.v6.len()
    );
    assert_eq!(p.rules.len(), 100_000);
    assert_eq!(c.v6.len(), 9_999);
    assert_eq!(c.v4.len(), 100_000 - 9_999);
    // Every /32 inside 10/8 inherits the /8's TCP 443.
    for (len, _, set) in &c.v4[1..] {
        assert_eq!(*len, 32);
        assert!(set.rules[..set.count as usize]
            .iter()
            .any(|r| r.port_lo == 443 && r.protocols & TCP != 0 && r.rule_id == 0));
    }
}

#[test]
fn unix_entries_parse_and_compile_to_trie_keys() {
    let p = parse(&format!(
        "{HEAD}  []\nunix:\n  - /run/nscd/socket\n  - /run/tools/\n  - \"@broker\"\n  - \
         /run/nscd/socket\n"
    ))
    .unwrap();
    assert_eq!(
        p.unix,
        [
            UnixTarget::Path("/run/nscd/socket".into()),
            UnixTarget::Directory("/run/tools/".into()),
            UnixTarget::Abstract("broker".into()),
            UnixTarget::Path("/run/nscd/socket".into()),
        ]
    );
    let c = compile(&p).unwrap();
    // The repeat is dropped; ids are positions in the list.
    assert_eq!(
        c.unix.iter().map(|(_, _, id)| *id).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    // An exact path matches with its NUL, a directory without one, an abstract name between
    // a leading and a trailing NUL.
    assert_eq!(c.unix[0].0, 17 * 8);
    assert_eq!(&c.unix[0].1[..17], b"/run/nscd/socket\0");
    assert_eq!(c.unix[1].0, 11 * 8);
    assert_eq!(&c.unix[1].1[..11], b"/run/tools/");
    assert_eq!(c.unix[2].0, 8 * 8);
    assert_eq!(&c.unix[2].1[..8], b"\0broker\0");
    // No `unix`: no Unix socket is allowed.
    assert!(parse(&format!("{HEAD}  []\n")).unwrap().unix.is_empty());
}

#[test]
fn error_unix_entries() {
    let at = |entry: &str, needle: &str| {
        assert_error(&format!("{HEAD}  []\nunix:\n  - {entry}\n"), 7, 5, needle)
    };
    at("run/x.sock", "expected an absolute socket path");
    at("/run/../x.sock", "has a \"..\" component");
    at("/run/./x.sock", "has a \".\" component");
    at("/run//x.sock", "empty component");
    at("\"@\"", "must have 1 to 106 bytes");
    at("\"/run/\\tx\"", "control character");
    at(&format!("/{}", "a".repeat(107)), "longer than 107 bytes");
    at(&format!("/{}/", "a".repeat(107)), "longer than 108 bytes");
    // The longest accepted of each kind.
    let ok = |entry: String| {
        parse(&format!("{HEAD}  []\nunix:\n  - \"{entry}\"\n"))
            .unwrap_or_else(|e| panic!("{entry}: {e}"))
    };
    ok(format!("/{}", "a".repeat(106)));
    ok(format!("/{}/", "a".repeat(106)));
    ok(format!("@{}", "a".repeat(106)));
}

// ---------------------------------------------------------------- host names

#[test]
fn host_rules_parse_normalize_and_open_no_prefix() {
    let p = parse(&format!(
        "{HEAD}  - host: API.Example.com.\n    ports: 443\n    protocol: tcp\n  - name: wild\n    \
         hosts: [\"*.example.org\", \"**.cdn.example.net\", dns.google]\n  - cidr: 10.0.0.0/8\n    \
         ports: 80\n"
    ))
    .unwrap();
    assert_eq!(
        p.rules[0].hosts,
        [HostPattern::Exact("api.example.com".into())]
    );
    assert!(p.rules[0].nets.is_empty() && p.rules[0].is_host_rule());
    assert_eq!(
        (p.rules[0].ports.as_slice(), p.rules[0].protocols),
        (&[(443, 443)][..], TCP)
    );
    assert_eq!(
        p.rules[1].hosts,
        [
            HostPattern::OneLabel("example.org".into()),
            HostPattern::AnyDepth("cdn.example.net".into()),
            HostPattern::Exact("dns.google".into()),
        ]
    );
    assert!(!p.rules[2].is_host_rule());
    let shown = p.to_string();
    assert!(
        shown.contains("rule 0: api.example.com, protocol tcp, port 443"),
        "{shown}"
    );
    assert!(
        shown.contains(
            "rule 1 (wild): *.example.org, **.cdn.example.net, dns.google, protocol any, all ports"
        ),
        "{shown}"
    );
    // Host rules open nothing by themselves: only the CIDR rule has an entry.
    let c = compile(&p).unwrap();
    assert_eq!(c.v4.len(), 1);
    assert!(c.v6.is_empty());

    let ids = |name: &str| p.host_rules(name).iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids("api.example.com"), [0]);
    assert_eq!(ids("a.example.com"), [] as [u32; 0]);
    assert_eq!(ids("a.example.org"), [1]);
    assert_eq!(ids("a.b.example.org"), [] as [u32; 0]);
    assert_eq!(ids("example.org"), [] as [u32; 0]);
    assert_eq!(ids("x.cdn.example.net"), [1]);
    assert_eq!(ids("x.y.z.cdn.example.net"), [1]);
    assert_eq!(ids("cdn.example.net"), [] as [u32; 0]);
    // Named exactly, a DoH endpoint is allowed (on purpose: see docs/policy.md).
    assert_eq!(ids("dns.google"), [1]);
}

#[test]
fn a_wildcard_never_covers_a_doh_endpoint() {
    let p = parse(&format!(
        "{HEAD}  - hosts: [\"*.google.com\", \"**.dns.google\", \"*.cloudflare-dns.com\", \
         \"**.nextdns.io\", \"**.quad9.net\"]\n  - host: mozilla.cloudflare-dns.com\n"
    ))
    .unwrap();
    let ids = |name: &str| p.host_rules(name).iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids("www.google.com"), [0]);
    assert_eq!(ids("dns.google.com"), [] as [u32; 0]);
    assert_eq!(ids("x.dns.google"), [0]);
    assert_eq!(ids("dns64.dns.google"), [] as [u32; 0]);
    assert_eq!(ids("chrome.cloudflare-dns.com"), [] as [u32; 0]);
    assert_eq!(ids("abc123.dns.nextdns.io"), [] as [u32; 0]);
    assert_eq!(ids("dns.quad9.net"), [] as [u32; 0]);
    assert_eq!(ids("www.quad9.net"), [0]);
    assert_eq!(ids("mozilla.cloudflare-dns.com"), [1]);
}

#[test]
fn error_host_names() {
    let at = |yaml: &str, line, column, needle| {
        assert_error(&format!("{HEAD}{yaml}"), line, column, needle)
    };
    at("  - host: \"*\"\n", 5, 11, "would allow every name");
    at("  - host: \"**\"\n", 5, 11, "would allow every name");
    at(
        "  - hosts: [a.com, \"*.com\"]\n",
        5,
        20,
        "wildcard over a top-level domain",
    );
    at(
        "  - host: \"**.com\"\n",
        5,
        11,
        "wildcard over a top-level domain",
    );
    at("  - host: api*.x.com\n", 5, 11, "whole first label");
    at("  - host: a.*.x.com\n", 5, 11, "whole first label");
    at("  - host: \"*x.com\"\n", 5, 11, "whole first label");
    at("  - host: a..com\n", 5, 11, "empty label");
    at(
        "  - host: 192.0.2.1\n",
        5,
        11,
        "is an IP address; write it as `cidr: 192.0.2.1`",
    );
    at("  - host: \"2001:db8::1\"\n", 5, 11, "is an IP address");
    at(
        "  - host: bücher.de\n",
        5,
        11,
        "write IDNs in punycode (xn--...)",
    );
    at("  - host: a_b.x-.com\n", 5, 11, "starts or ends with '-'");
    at("  - host: a!.com\n", 5, 11, "character '!' is not allowed");
    at(
        &format!("  - host: {}.com\n", "a".repeat(64)),
        5,
        11,
        "longer than 63",
    );
    // In a block list: the entry itself.
    at(
        "  - hosts:\n      - ok.example.com\n      - -bad.example.com\n",
        7,
        9,
        "starts or ends with '-'",
    );
    at(
        "  - hosts: [a.com, A.com.]\n",
        5,
        20,
        "host \"a.com\" is listed twice (first at 5:13)",
    );
    at("  - hosts: []\n", 5, 12, "hosts is empty");
    at(
        "  - host: a.com\n    hosts: [b.com]\n",
        6,
        12,
        "either `host` or `hosts`, not both",
    );
    at(
        "  - cidr: 10.0.0.0/8\n    host: a.com\n",
        6,
        11,
        "one kind of destination",
    );
    at(
        "  - hosts: [b.com]\n    cidrs: [10.0.0.0/8]\n",
        5,
        13,
        "one kind of destination",
    );
    at(
        "  - name: x\n    ports: 443\n",
        5,
        5,
        "`host: <name>` or `hosts: [...]`",
    );
    let many: Vec<String> = (0..=256).map(|i| format!("h{i}.example.com")).collect();
    let (line, _, message) = error_at(&format!("{HEAD}  - hosts: [{}]\n", many.join(", ")));
    assert_eq!(
        (line, message.as_str()),
        (5, "hosts has more than 256 names")
    );
    // A grant names addresses: host rules are not grantable.
    assert_error(
        "name: t\nagents:\n  cgroups: [a]\negress: []\ngrantable:\n  - cidr: 10.0.0.0/8\n  - \
         host: a.example.com\nmax_grant_ttl: 1h\n",
        7,
        11,
        "host rules cannot be granted; grant the addresses",
    );
}

#[test]
fn the_dns_block_has_defaults_and_limits() {
    let base = "name: t\nagents:\n  cgroups: [a]\negress: []\n";
    let p = parse(base).unwrap();
    assert_eq!(p.dns, DnsPolicy::default());
    assert_eq!(
        p.dns,
        DnsPolicy {
            denied_answer: DeniedAnswer::Refused,
            ttl_min_secs: 5,
            ttl_max_secs: 3600,
            grace_secs: 10,
            max_addresses_per_name: 16,
            query_rate: None,
        }
    );
    assert_eq!(p.dns.lifetime_secs(0), 15);
    assert_eq!(p.dns.lifetime_secs(300), 310);
    assert_eq!(p.dns.lifetime_secs(u32::MAX), 3610);

    let p = parse(&format!(
        "{base}dns:\n  denied_answer: nxdomain\n  ttl_min: 1m\n  ttl_max: 1day\n  grace: 0s\n  \
         max_addresses_per_name: 64\n  query_rate: {{per_second: 50, burst: 100}}\n"
    ))
    .unwrap();
    assert_eq!(
        p.dns,
        DnsPolicy {
            denied_answer: DeniedAnswer::NxDomain,
            ttl_min_secs: 60,
            ttl_max_secs: 86_400,
            grace_secs: 0,
            max_addresses_per_name: 64,
            query_rate: Some(RateLimit {
                per_second: 50,
                burst: 100
            }),
        }
    );
    // Only some keys: the rest default; a burst defaults to the rate.
    let p = parse(&format!(
        "{base}dns:\n  ttl_max: 30s\n  query_rate: {{per_second: 7}}\n"
    ))
    .unwrap();
    assert_eq!((p.dns.ttl_min_secs, p.dns.ttl_max_secs), (5, 30));
    assert_eq!(p.dns.query_rate.unwrap().burst, 7);

    let at = |yaml: &str, line, column, needle| {
        assert_error(&format!("{base}{yaml}"), line, column, needle)
    };
    at(
        "dns:\n  ttl_min: 2h\n",
        6,
        3,
        "dns.ttl_min (7200s) is above dns.ttl_max (3600s)",
    );
    at(
        "dns:\n  ttl_max: 0s\n",
        6,
        3,
        "dns.ttl_max must be at least 1s",
    );
    at(
        "dns:\n  grace: 2h\n",
        6,
        3,
        "dns.grace (7200s) is longer than 3600s",
    );
    at("dns:\n  ttl_max: 2d\n", 6, 12, "out of range: 0s to 1d");
    at("dns:\n  ttl_min: 500ms\n", 6, 12, "use whole seconds");
    at("dns:\n  grace: soon\n", 6, 10, "dns duration \"soon\"");
    at(
        "dns:\n  denied_answer: drop\n",
        6,
        18,
        "unknown denied_answer \"drop\"",
    );
    at(
        "dns:\n  max_addresses_per_name: 0\n",
        6,
        27,
        "out of range: 1 to 64",
    );
    at(
        "dns:\n  max_addresses_per_name: 65\n",
        6,
        27,
        "out of range: 1 to 64",
    );
    at(
        "dns:\n  query_rate: {per_second: 0}\n",
        6,
        28,
        "out of range",
    );
    at("dns:\n  ttl: 5s\n", 6, 3, "unknown field `ttl`");
}
