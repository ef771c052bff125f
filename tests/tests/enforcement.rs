//! Enforcement against the real kernel: real programs at the cgroup2 root, a real agent cgroup,
//! real sockets on loopback; each test asserts errno and the audit records.

use agentwall_tests::{probe, probe_in, received, sa, tcp_server, udp_server, Harness, EPERM};
use anyhow::{ensure, Result};

const ECONNREFUSED: i32 = libc::ECONNREFUSED;

fn policy(rules: &str) -> String {
    format!("name: t\nagents:\n  cgroups:\n    - \"{{agent}}\"\negress:\n{rules}")
}

fn rule(name: &str, cidr: &str, ports: &str, proto: &str) -> String {
    format!("  - name: {name}\n    cidr: \"{cidr}\"\n    ports: [{ports}]\n    protocol: {proto}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hook_allows_and_denies() -> Result<()> {
    let (_t4, tcp4) = tcp_server("127.0.0.1")?;
    let (_t6, tcp6) = tcp_server("::1")?;
    let (u4, udp4) = udp_server("127.0.0.1")?;
    let (u6, udp6) = udp_server("::1")?;
    let rules = [
        rule("tcp4", "127.0.0.1/32", &tcp4.port().to_string(), "tcp"),
        rule("tcp6", "::1/128", &tcp6.port().to_string(), "tcp"),
        rule("udp4", "127.0.0.1", &udp4.port().to_string(), "udp"),
        rule("udp6", "::1", &udp6.port().to_string(), "udp"),
    ]
    .concat();
    let mut h = Harness::start(&policy(&rules)).await?;
    // The same addresses on other ports are denied.
    let mut tcp4_bad = tcp4;
    tcp4_bad.set_port(tcp4.port() ^ 1);
    let mut udp6_bad = udp6;
    udp6_bad.set_port(udp6.port() ^ 1);
    let steps = vec![
        format!("tcp:{}", sa(tcp4)),
        format!("tcp:{}", sa(tcp4_bad)),
        format!("tcp:{}", sa(tcp6)),
        format!("tcp:[::1]:{}", tcp4.port()),
        format!("udp:{}", sa(udp4)),
        format!("udp:127.0.0.2:{}", udp4.port()),
        format!("udp:{}", sa(udp6)),
        format!("udp:{}", sa(udp6_bad)),
    ];
    let out = probe_in(&h.agent, &steps)?;
    let errnos: Vec<i32> = out.iter().map(|o| o.errno).collect();
    assert_eq!(
        errnos,
        vec![0, EPERM, 0, EPERM, 0, EPERM, 0, EPERM],
        "{out:#?}"
    );
    assert_eq!(received(&u4), 1);
    assert_eq!(received(&u6), 1);

    let d = h.decisions(8).await?;
    assert_eq!(d.len(), 8, "{d:#?}");
    let hooks: Vec<&str> = d.iter().map(|r| r.hook.as_str()).collect();
    assert_eq!(
        hooks,
        [
            "connect4", "connect4", "connect6", "connect6", "sendmsg4", "sendmsg4", "sendmsg6",
            "sendmsg6"
        ]
    );
    let actions: Vec<&str> = d.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        ["allowed", "blocked", "allowed", "blocked", "allowed", "blocked", "allowed", "blocked"]
    );
    assert_eq!(d[0].rule_name.as_deref(), Some("tcp4"));
    assert_eq!(d[1].reason, "default-deny:no-port-match");
    assert_eq!(d[5].reason, "default-deny:no-address-match");
    assert_eq!(d[6].rule_name.as_deref(), Some("udp6"));
    assert_eq!(d[5].dst, "127.0.0.2");
    assert_eq!(d[6].dst, "::1");
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_outside_any_agent_passes_without_an_event() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let (u, udp) = udp_server("127.0.0.1")?;
    // The policy allows nothing; the agent is denied, everyone else is not touched.
    let mut h = Harness::start(&policy(&rule("none", "192.0.2.1/32", "1", "tcp"))).await?;
    let outside = probe(&[format!("tcp:{}", sa(tcp)), format!("udp:{}", sa(udp))])?;
    assert!(outside.iter().all(|o| o.ok), "{outside:#?}");
    assert_eq!(received(&u), 1);
    h.no_decisions().await?;
    let inside = probe_in(&h.agent, &[format!("tcp:{}", sa(tcp))])?;
    assert_eq!(inside[0].errno, EPERM);
    assert_eq!(h.decisions(1).await?.len(), 1);
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_cgroups_forks_and_threads_are_the_agent() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let mut h = Harness::start(&policy(&rule("none", "192.0.2.1/32", "1", "tcp"))).await?;
    let child = h.cgroups.make("agent/worker/deeper")?;
    let t = format!("tcp:{}", sa(tcp));
    let out = probe_in(
        &child,
        &[t.clone(), format!("fork:{t}"), format!("thread:{t}")],
    )?;
    assert!(out.iter().all(|o| o.errno == EPERM), "{out:#?}");
    let d = h.decisions(3).await?;
    assert_eq!(d.len(), 3);
    for r in &d {
        assert_eq!(r.agent.as_deref(), Some("agent"));
        assert_eq!(
            r.agent_cgroup.as_deref(),
            Some(h.cgroups.rel("agent").as_str())
        );
        assert_eq!(
            r.cgroup.as_deref(),
            Some(h.cgroups.rel("agent/worker/deeper").as_str())
        );
        assert_ne!(r.cgroup_id, 0);
    }
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_mapped_ipv6_is_judged_by_the_ipv4_rules() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let (u, udp) = udp_server("127.0.0.1")?;
    let rules = [
        rule("v4-tcp", "127.0.0.1/32", &tcp.port().to_string(), "tcp"),
        rule("v4-udp", "127.0.0.1/32", &udp.port().to_string(), "udp"),
        // An IPv6 rule for everything IPv6 must not open IPv4-mapped destinations.
        rule("all-v6", "::/0", "1-65535", "any"),
    ]
    .concat();
    let mut h = Harness::start(&policy(&rules)).await?;
    let out = probe_in(
        &h.agent,
        &[
            format!("tcp:[::ffff:127.0.0.1]:{}", tcp.port()),
            format!("tcp:[::ffff:127.0.0.9]:{}", tcp.port()),
            format!("udp:[::ffff:127.0.0.1]:{}", udp.port()),
            format!("udpc:[::ffff:127.0.0.1]:{}", udp.port()),
            format!("udp:[::ffff:127.0.0.3]:{}", udp.port()),
        ],
    )?;
    let errnos: Vec<i32> = out.iter().map(|o| o.errno).collect();
    assert_eq!(errnos, vec![0, EPERM, 0, 0, EPERM], "{out:#?}");
    assert_eq!(received(&u), 2);
    // Six decisions for five calls: a connected AF_INET6 UDP socket with a mapped peer is judged
    // at connect (connect6) and again at each send, which udpv6_sendmsg hands to udp_sendmsg
    // with the peer address (sendmsg4). Both are judged by the IPv4 rules.
    let d = h.decisions(6).await?;
    let got: Vec<(&str, &str, &str)> = d
        .iter()
        .map(|r| (r.hook.as_str(), r.action.as_str(), r.dst.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("connect6", "allowed", "::ffff:127.0.0.1"),
            ("connect6", "blocked", "::ffff:127.0.0.9"),
            ("sendmsg4", "allowed", "127.0.0.1"),
            ("connect6", "allowed", "::ffff:127.0.0.1"),
            ("sendmsg4", "allowed", "127.0.0.1"),
            ("sendmsg4", "blocked", "127.0.0.3"),
        ]
    );
    assert_eq!(d[0].rule_name.as_deref(), Some("v4-tcp"));
    assert_eq!(d[0].family, "inet6");
    assert_eq!(d[2].rule_name.as_deref(), Some("v4-udp"));
    assert_eq!(d[3].rule_name.as_deref(), Some("v4-udp"));
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_udp_is_judged_at_connect() -> Result<()> {
    let (u, udp) = udp_server("127.0.0.1")?;
    let (u2, udp2) = udp_server("127.0.0.2")?;
    let mut h = Harness::start(&policy(&rule(
        "udp",
        "127.0.0.1/32",
        &udp.port().to_string(),
        "udp",
    )))
    .await?;
    let out = probe_in(
        &h.agent,
        &[format!("udpc:{}", sa(udp)), format!("udpc:{}", sa(udp2))],
    )?;
    assert_eq!((out[0].errno, out[1].errno), (0, EPERM), "{out:#?}");
    assert_eq!((received(&u), received(&u2)), (1, 0));
    let d = h.decisions(2).await?;
    // One decision per connect; the send on the connected socket does not ask again.
    assert_eq!(d.len(), 2, "{d:#?}");
    assert!(d.iter().all(|r| r.hook == "connect4"));
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendmmsg_judges_every_message() -> Result<()> {
    let (u, udp) = udp_server("127.0.0.1")?;
    let (u2, udp2) = udp_server("127.0.0.2")?;
    let mut h = Harness::start(&policy(&rule(
        "udp",
        "127.0.0.1/32",
        &udp.port().to_string(),
        "udp",
    )))
    .await?;
    let out = probe_in(
        &h.agent,
        &[
            format!("mmsg:{},{},{}", sa(udp), sa(udp), sa(udp2)),
            format!("mmsg:{},{}", sa(udp2), sa(udp)),
        ],
    )?;
    // The kernel stops at the first refused message: 2 sent, then EPERM for the first of the next.
    assert_eq!(out[0].value, 2, "{out:#?}");
    assert_eq!(out[1].errno, EPERM, "{out:#?}");
    assert_eq!((received(&u), received(&u2)), (2, 0));
    let d = h.decisions(4).await?;
    let actions: Vec<&str> = d.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["allowed", "allowed", "blocked", "blocked"]);
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_fast_open_goes_through_the_connect_hook() -> Result<()> {
    let fastopen = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fastopen")?;
    ensure!(
        fastopen.trim().parse::<u32>()? & 1 == 1,
        "net.ipv4.tcp_fastopen has the client bit off ({}); this test needs it on",
        fastopen.trim()
    );
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let (_t2, tcp2) = tcp_server("127.0.0.2")?;
    let mut h = Harness::start(&policy(&rule(
        "tcp",
        "127.0.0.1/32",
        &tcp.port().to_string(),
        "tcp",
    )))
    .await?;
    let out = probe_in(
        &h.agent,
        &[format!("tfo:{}", sa(tcp)), format!("tfo:{}", sa(tcp2))],
    )?;
    assert!(out[0].ok, "{out:#?}");
    assert_eq!(out[1].errno, EPERM, "{out:#?}");
    let d = h.decisions(2).await?;
    assert_eq!(d[0].action, "allowed");
    assert_eq!(d[1].action, "blocked");
    assert!(d
        .iter()
        .all(|r| r.hook == "connect4" && r.protocol == "tcp"));
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_ranges_are_inclusive() -> Result<()> {
    // No listeners: an allowed connect is refused by the stack (ECONNREFUSED), a denied one is
    // refused by agentwall (EPERM).
    let mut h = Harness::start(&policy(&rule(
        "range",
        "127.0.0.1/32",
        "\"41000-41010\"",
        "tcp",
    )))
    .await?;
    let ports = [40999, 41000, 41005, 41010, 41011];
    let steps: Vec<String> = ports.iter().map(|p| format!("tcp:127.0.0.1:{p}")).collect();
    let out = probe_in(&h.agent, &steps)?;
    let errnos: Vec<i32> = out.iter().map(|o| o.errno).collect();
    assert_eq!(
        errnos,
        vec![EPERM, ECONNREFUSED, ECONNREFUSED, ECONNREFUSED, EPERM]
    );
    let d = h.decisions(5).await?;
    let got: Vec<(u16, &str)> = d.iter().map(|r| (r.port, r.action.as_str())).collect();
    assert_eq!(
        got,
        [
            (40999, "blocked"),
            (41000, "allowed"),
            (41005, "allowed"),
            (41010, "allowed"),
            (41011, "blocked")
        ]
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_rules_allow_their_union() -> Result<()> {
    let (u, udp) = udp_server("127.0.0.5")?;
    let rules = [
        rule("wide-tcp", "127.0.0.0/8", "\"42000-42001\"", "tcp"),
        rule("narrow-udp", "127.0.0.5/32", &udp.port().to_string(), "udp"),
    ]
    .concat();
    let mut h = Harness::start(&policy(&rules)).await?;
    let out = probe_in(
        &h.agent,
        &[
            "tcp:127.0.0.5:42000".to_string(), // the /8 rule, through the more specific /32 entry
            format!("udp:{}", sa(udp)),        // the /32 rule
            "udp:127.0.0.5:42000".to_string(), // neither: wrong protocol for the /8 rule
            "tcp:127.0.0.6:42001".to_string(), // the /8 rule
        ],
    )?;
    let errnos: Vec<i32> = out.iter().map(|o| o.errno).collect();
    assert_eq!(
        errnos,
        vec![ECONNREFUSED, 0, EPERM, ECONNREFUSED],
        "{out:#?}"
    );
    assert_eq!(received(&u), 1);
    let d = h.decisions(4).await?;
    let rules: Vec<Option<&str>> = d.iter().map(|r| r.rule_name.as_deref()).collect();
    assert_eq!(
        rules,
        [Some("wide-tcp"), Some("narrow-udp"), None, Some("wide-tcp")]
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_records_but_lets_through() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let yaml = policy(&rule("other", "127.0.0.1/32", "1", "tcp"))
        .replace("name: t\n", "name: t\nmode: audit\n");
    let mut h = Harness::start(&yaml).await?;
    let out = probe_in(&h.agent, &[format!("tcp:{}", sa(tcp))])?;
    assert!(out[0].ok, "audit mode must not block: {out:#?}");
    let d = h.decisions(1).await?;
    assert_eq!(
        (
            d[0].decision.as_str(),
            d[0].mode.as_str(),
            d[0].action.as_str()
        ),
        ("deny", "audit", "allowed")
    );
    assert_eq!(d[0].reason, "default-deny:no-port-match");
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_made_outside_is_judged_by_who_uses_it() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let mut h = Harness::start(&policy(&rule("none", "192.0.2.1/32", "1", "tcp"))).await?;
    // The socket is created before the process joins the agent cgroup, then used inside.
    let out = probe(&[
        format!("hold-tcp:{}", sa(tcp)),
        format!("join:{}", h.agent.display()),
        "connect-held".to_string(),
    ])?;
    assert!(out[0].ok && out[1].ok, "{out:#?}");
    assert_eq!(out[2].errno, EPERM, "{out:#?}");
    let d = h.decisions(1).await?;
    assert_eq!(d[0].action, "blocked");
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_who_what_and_why() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let mut h = Harness::start(&policy(&rule(
        "api",
        "127.0.0.1/32",
        &tcp.port().to_string(),
        "tcp",
    )))
    .await?;
    let probe_exe = std::fs::canonicalize(agentwall_tests::sibling_exe("probe")?)?;
    // The probe exits at once: its executable is in the record from the kernel, not procfs.
    let out = probe_in(&h.agent, &[format!("tcp:{}", sa(tcp))])?;
    assert!(out[0].ok);
    let d = h.decisions(1).await?;
    let r = &d[0];
    assert_eq!(r.agent.as_deref(), Some("agent"));
    assert_eq!(r.policy.as_deref(), Some("t"));
    assert_eq!(r.rule, Some(0));
    assert_eq!(r.rule_name.as_deref(), Some("api"));
    assert_eq!(r.comm, "probe");
    assert_eq!((r.uid, r.gid), (0, 0));
    assert_eq!((r.dst.as_str(), r.port), ("127.0.0.1", tcp.port()));
    assert_eq!((r.protocol.as_str(), r.family.as_str()), ("tcp", "inet"));
    assert_eq!(
        r.cgroup_id,
        std::fs::metadata(&h.agent).map(|m| std::os::unix::fs::MetadataExt::ino(&m))?
    );
    assert!(r.pid > 0 && r.tid == r.pid);
    assert_eq!(r.policy_version, 1);
    assert_eq!(
        r.exe.as_deref().map(std::path::Path::new),
        Some(probe_exe.as_path())
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_an_event_or_counted_as_lost() -> Result<()> {
    let (_u, udp) = udp_server("127.0.0.1")?;
    // A one-page ring (about 32 events) that nobody drains until shutdown: most events of a
    // burst cannot be queued. Each must then be counted, never silently dropped.
    let h = Harness::start_with(
        &policy(&rule("udp", "127.0.0.1/32", &udp.port().to_string(), "udp")),
        |o| {
            o.ring_bytes = Some(4096);
            o.wakeup_bytes = u64::MAX;
            o.drain_interval = std::time::Duration::from_secs(3600);
        },
    )
    .await?;
    let sends = 200;
    let out = probe_in(&h.agent, &[format!("udpn:{},{sends}", sa(udp))])?;
    assert_eq!(out[0].value, sends, "{out:#?}");
    // No wait: the final lost count is written before shutdown completes.
    let records = h.stop_and_collect().await?;
    let decisions = records.iter().filter(|r| r.kind == "decision").count() as u64;
    let lost: u64 = records.iter().filter_map(|r| r.lost).sum();
    assert!(
        decisions > 0 && lost > 0,
        "decisions {decisions}, lost {lost}"
    );
    assert_eq!(
        decisions + lost,
        sends as u64,
        "decisions {decisions} + lost {lost}"
    );
    Ok(())
}
