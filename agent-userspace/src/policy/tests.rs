//! Parsing and loading tests. Compilation is tested in `compile.rs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
        ]
    );
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
    assert_eq!(p.rules.len(), 5);
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
    assert!(
        shown.contains("rule 1 (dns): 198.51.100.53/32, 2001:db8::53/128, protocol any, port 53")
    );
    assert!(c.to_string().contains(
        "198.51.100.53/32: tcp+udp 53 (rule 1), udp 5000-5010 (rule 4), udp 6000 (rule 4)"
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
        "unknown field `protcol`, expected one of name, cidr, cidrs, ports, protocol",
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

#[test]
fn error_alias_bomb_is_rejected_quickly() {
    // Quadratic: a long port list referenced by many rules (each alias replays the list).
    let ports: Vec<String> = (0..20_000).map(|i| i.to_string()).collect();
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
    let start = Instant::now();
    let (line, _, message) = error_at(&text);
    let took = start.elapsed();
    eprintln!("quadratic alias bomb rejected in {took:?}: {line}: {message}");
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
    let start = Instant::now();
    let (line, column, message) = error_at(&text);
    eprintln!(
        "exponential alias bomb rejected in {:?}: {line}:{column}: {message}",
        start.elapsed()
    );
    assert_eq!(line, 8);
    assert!(start.elapsed() < Duration::from_secs(5));

    // The same at the top level (unknown keys are rejected before anything is expanded).
    let mut text = String::from("a0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
    for i in 1..12 {
        let refs = vec![format!("*a{}", i - 1); 9].join(",");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    text.push_str("name: x\nagents:\n  cgroups: *a11\negress: []\n");
    let start = Instant::now();
    let (line, column, message) = error_at(&text);
    eprintln!(
        "top-level alias bomb rejected in {:?}: {line}:{column}: {message}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn error_deep_nesting_is_rejected_quickly() {
    let depth = 200_000;
    let text = format!(
        "name: t\nagents:\n  cgroups: {}a{}\negress: []\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let start = Instant::now();
    let (line, column, message) = error_at(&text);
    eprintln!(
        "flow nesting rejected in {:?}: {line}:{column}: {message}",
        start.elapsed()
    );
    assert_eq!(line, 3);
    assert!(message.contains("nesting too deep"), "{message}");

    let mut text = String::from("name: t\nagents:\n  cgroups:\n");
    for level in 0..2_000 {
        text.push_str(&" ".repeat(4 + 2 * level));
        text.push_str("-\n");
    }
    let start = Instant::now();
    let (line, column, message) = error_at(&text);
    eprintln!(
        "block nesting rejected in {:?}: {line}:{column}: {message}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn error_too_large() {
    let text = format!("{HEAD}#{}\n", "x".repeat(MAX_POLICY_FILE_BYTES as usize));
    match parse(&text) {
        Err(PolicyError::TooLarge { size, limit, .. }) => {
            assert_eq!(limit, MAX_POLICY_FILE_BYTES);
            assert!(size > limit);
        }
        other => panic!("{other:?}"),
    }
    let dir = TempDir::new("large");
    let path = dir.write("big.yaml", &text);
    let e = load_file(&path).unwrap_err();
    assert!(matches!(e, PolicyError::TooLarge { .. }), "{e:?}");
    assert!(e.to_string().starts_with(&path.display().to_string()));
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

    let empty = TempDir::new("empty");
    assert!(load_dir(&empty.0).unwrap().policies.is_empty());
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
