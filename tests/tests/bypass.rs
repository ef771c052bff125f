//! Side doors: one test per path an agent could try to reach a denied destination by. Each
//! asserts the destination stays unreachable (errno, and nothing received) and that the attempt
//! is recorded.

use std::os::unix::process::ExitStatusExt;

use agentwall_tests::{
    probe, probe_in, probe_status_in, received, sa, tcp_server, udp_server, Harness, Sysctls, EPERM,
};
use anyhow::{ensure, Result};

/// Allows only 192.0.2.1 (documentation range, never used): every loopback target is denied.
fn deny_loopback(extra: &str) -> String {
    format!(
        "name: t\nagents:\n  cgroups:\n    - \"{{agent}}\"\n{extra}egress:\n  - cidr: 192.0.2.1/32\n    ports: [1]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_udplite_sockets_are_refused() -> Result<()> {
    let (u, udp) = udp_server("127.0.0.1")?;
    let mut h = Harness::start(&deny_loopback("")).await?;
    // Outside the agent the same sockets work (so the kernel has them).
    let outside = probe(&[
        format!("raw:{}", sa(udp)),
        format!("udplite:{}", sa(udp)),
        "packet".into(),
    ])?;
    ensure!(
        outside.iter().all(|o| o.ok),
        "the kernel refuses these sockets even outside an agent: {outside:#?}"
    );
    received(&u);
    h.no_decisions().await?;
    let out = probe_in(
        &h.agent,
        &[
            format!("raw:{}", sa(udp)),
            format!("raw:[::1]:{}", udp.port()),
            format!("udplite:{}", sa(udp)),
            "sock:2,1,262".into(), // MPTCP
        ],
    )?;
    let errnos: Vec<i32> = out.iter().map(|o| o.errno).collect();
    assert_eq!(&errnos[..3], &[EPERM, EPERM, EPERM], "{out:#?}");
    // MPTCP is refused by us where the kernel has it, else by the kernel.
    assert!(
        matches!(errnos[3], EPERM | libc::EPROTONOSUPPORT | libc::EINVAL),
        "{out:#?}"
    );
    assert_eq!(received(&u), 0);
    let d = h.decisions(3).await?;
    let kinds: Vec<(&str, Option<&str>, &str)> = d
        .iter()
        .take(3)
        .map(|r| (r.hook.as_str(), r.socket.as_deref(), r.action.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("sock_create", Some("raw"), "blocked"),
            ("sock_create", Some("raw"), "blocked"),
            ("sock_create", Some("udplite"), "blocked"),
        ]
    );
    assert_eq!(d[0].reason, "default-deny:socket-kind");
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_sockets_are_refused_unless_allowed() -> Result<()> {
    // Ping sockets need the caller's gid in ping_group_range (checked before our hook).
    let _range = Sysctls::set(&[("net/ipv4/ping_group_range", "0 0")])?;
    let outside = probe(&["ping:127.0.0.1:0".into()])?;
    ensure!(
        outside[0].ok,
        "ping sockets do not work on this kernel even outside an agent: {outside:?}"
    );
    let mut h = Harness::start(&deny_loopback("")).await?;
    let out = probe_in(
        &h.agent,
        &["ping:127.0.0.1:0".into(), "ping:[::1]:0".into()],
    )?;
    assert_eq!((out[0].errno, out[1].errno), (EPERM, EPERM), "{out:#?}");
    let d = h.decisions(2).await?;
    assert!(d
        .iter()
        .all(|r| r.socket.as_deref() == Some("ping") && r.action == "blocked"));
    h.stop().await?;

    // A policy that lists `ping` lets the agent ping, and says so.
    let mut h = Harness::start(&deny_loopback("sockets: [ping]\n")).await?;
    let out = probe_in(&h.agent, &["ping:127.0.0.1:0".into()])?;
    assert!(out[0].ok, "{out:#?}");
    let d = h.decisions(1).await?;
    assert_eq!(
        (d[0].action.as_str(), d[0].reason.as_str()),
        ("allowed", "socket-kind-allowed")
    );
    h.stop().await
}

/// Packet sockets pass every cgroup hook: a frame the agent builds itself reaches a denied port.
/// No hook can make socket() fail for them, so an agent (here one holding CAP_NET_RAW, which the
/// kernel would let through) that makes one its policy does not list is killed before the call
/// returns: through the 64-bit entry, both 32-bit ones, and io_uring (inline and on a worker
/// thread). A listed one works, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_sockets_kill_the_agent_unless_allowed() -> Result<()> {
    // A frame injected on lo from and to 127.0.0.1 is routed only with these two.
    let _lo = Sysctls::set(&[
        ("net/ipv4/conf/lo/route_localnet", "1"),
        ("net/ipv4/conf/lo/accept_local", "1"),
    ])?;
    let (u, udp) = udp_server("127.0.0.1")?;
    let frame = format!("packet-udp:{}", sa(udp));
    let steps = [
        frame.as_str(),
        "packet32",
        "packet32-socketcall",
        "sock:2,10,768", // AF_INET, SOCK_PACKET, ETH_P_ALL: the obsolete form
        "uring-packet",
        "uring-packet:async",
    ];
    let outside = probe(&steps.map(String::from))?;
    ensure!(
        outside.iter().all(|o| o.ok) && received(&u) == 1,
        "packet sockets (or their frame to a loopback port) do not work even outside an \
         agent: {outside:?}"
    );
    let mut h = Harness::start(&deny_loopback("")).await?;
    h.no_decisions().await?;
    for step in steps {
        let (status, out) = probe_status_in(&h.agent, &[step.into(), format!("udp:{}", sa(udp))])?;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{step}: the agent was not killed ({status}): {out:?}"
        );
        assert!(
            out.is_empty(),
            "{step}: the call returned to the agent: {out:?}"
        );
        let d = h.decisions(1).await?;
        assert_eq!(d.len(), 1, "{step}: {d:#?}");
        assert_eq!(
            (
                d[0].hook.as_str(),
                d[0].socket.as_deref(),
                d[0].decision.as_str(),
                d[0].action.as_str(),
                d[0].reason.as_str(),
            ),
            (
                "socket",
                Some("packet"),
                "deny",
                "killed",
                "default-deny:socket-kind"
            ),
            "{step}"
        );
        // io_uring's socket is not readable at the check; the syscalls' is.
        if !step.starts_with("uring") && !step.starts_with("sock:") {
            assert_eq!(d[0].family, "packet", "{step}");
            assert_eq!(d[0].sock_type, Some(libc::SOCK_RAW as u32), "{step}");
        }
    }
    assert_eq!(received(&u), 0, "a frame got through");
    h.stop().await?;

    let mut h = Harness::start(&deny_loopback("sockets: [packet]\n")).await?;
    let out = probe_in(&h.agent, std::slice::from_ref(&frame))?;
    assert!(out[0].ok, "a listed packet socket failed: {out:?}");
    assert_eq!(received(&u), 1);
    let d = h.decisions(1).await?;
    assert_eq!(
        (
            d[0].hook.as_str(),
            d[0].action.as_str(),
            d[0].reason.as_str()
        ),
        ("socket", "allowed", "socket-kind-allowed")
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_goes_through_the_same_hooks() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let (u, udp) = udp_server("127.0.0.1")?;
    let outside = probe(&[
        format!("uring-connect:{}", sa(tcp)),
        format!("uring-sendmsg:{}", sa(udp)),
    ])?;
    ensure!(
        outside.iter().all(|o| o.ok),
        "io_uring does not work here even outside an agent: {outside:#?}"
    );
    assert_eq!(received(&u), 1);
    let mut h = Harness::start(&deny_loopback("")).await?;
    let out = probe_in(
        &h.agent,
        &[
            format!("uring-connect:{}", sa(tcp)),
            format!("uring-sendmsg:{}", sa(udp)),
        ],
    )?;
    assert_eq!((out[0].errno, out[1].errno), (EPERM, EPERM), "{out:#?}");
    assert_eq!(received(&u), 0);
    let d = h.decisions(2).await?;
    let hooks: Vec<&str> = d.iter().map(|r| r.hook.as_str()).collect();
    assert_eq!(hooks, ["connect4", "sendmsg4"]);
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_passed_in_over_scm_rights_is_judged_as_the_agent() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let mut h = Harness::start(&deny_loopback("")).await?;
    let out = probe(&[format!("scm:{},{}", h.agent.display(), sa(tcp))])?;
    assert_eq!(out[0].errno, EPERM, "{out:#?}");
    let d = h.decisions(1).await?;
    assert_eq!(
        (d[0].hook.as_str(), d[0].action.as_str()),
        ("connect4", "blocked")
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_deeper_or_dropping_root_does_not_escape() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let mut h = Harness::start(&deny_loopback("")).await?;
    let child = h.cgroups.make("agent/sub")?;
    let root = h.cgroups.root.clone();
    let t = format!("tcp:{}", sa(tcp));
    let out = probe_in(
        &h.agent,
        &[
            format!("join:{}", child.display()), // deeper: still the agent
            t.clone(),
            "setuid:65534".into(),              // an unprivileged agent...
            format!("join:{}", root.display()), // ...cannot move itself out
            t.clone(),
        ],
    )?;
    assert!(out[0].ok && out[2].ok, "{out:#?}");
    assert_eq!(out[1].errno, EPERM, "{out:#?}");
    assert!(
        !out[3].ok,
        "an unprivileged agent moved itself to the root cgroup: {out:#?}"
    );
    assert_eq!(out[4].errno, EPERM, "{out:#?}");
    let d = h.decisions(2).await?;
    assert_eq!(d.len(), 2, "{d:#?}");
    assert_eq!(d[1].uid, 65534);
    assert!(d.iter().all(|r| r.action == "blocked"));
    h.stop().await
}
