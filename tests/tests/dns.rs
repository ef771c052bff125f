//! Host-name rules through the enforcing DNS proxy, against the real kernel (issue 11).
//!
//! The upstream is a real DNS server on loopback (`dns_server`, hickory-server) whose zones
//! point at 127.x addresses. Agents query 127.0.0.99:53 or [::1]:53, where nothing listens: only
//! the kernel's steering to the proxy can answer them (broken steering is ECONNREFUSED or a
//! timeout, never a packet off the host). Each test checks the reply (rcode, addresses, the
//! address it seemed to come from), the upstream's query counter, errno of the connects that
//! follow, and the records.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agentwall::{
    daemon::{self, Handle, Options, PolicySource},
    events::AuditRecord,
    policy::{self, PolicySet},
};
use agentwall_tests::{
    dns_server::{DnsServer, Rec},
    inproc::{connect_errno, next_decision_to, next_record, wait_denied},
    probe, probe_in, tcp_server, tcp_server_at, Outcome, TestCgroups, EPERM,
};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tokio::sync::mpsc;

/// Resolver addresses the agents use: nothing listens on them.
const RESOLVER: &str = "127.0.0.99:53";
const RESOLVER6: &str = "[::1]:53";

/// The controller's DNS interface (issue 11): `Options.dns` and `Handle::dns_listen`.
mod proxy {
    use super::*;

    /// Turns the proxy on, forwarding to `upstream`, listening on free loopback ports.
    pub fn enable(opts: &mut Options, upstream: SocketAddr) -> Result<()> {
        opts.dns = Some(daemon::DnsOptions {
            upstream,
            listen_v4: "127.0.0.1:0".parse()?,
            listen_v6: Some("[::1]:0".parse()?),
        });
        Ok(())
    }

    /// Where the proxy listens: both loopbacks, on a port it chose.
    pub fn listening(h: &Handle) -> Result<daemon::DnsListen> {
        let l = h.dns_listen().context("the controller runs no DNS proxy")?;
        ensure!(
            l.v4.ip().is_loopback() && l.v4.port() != 0,
            "the proxy's IPv4 address: {l:?}"
        );
        ensure!(
            l.v6.is_some_and(|a| a.ip().is_loopback() && a.port() != 0),
            "the proxy's IPv6 address: {l:?}"
        );
        Ok(l)
    }
}

/// A controller with the DNS proxy on, enforcing `policies` on the cgroups it made, and the
/// upstream it forwards to.
struct Dns {
    cgroups: TestCgroups,
    handle: Option<Handle>,
    records: mpsc::UnboundedReceiver<AuditRecord>,
    upstream: DnsServer,
}

/// The options for `policies` (YAML, `{base}` for the test's cgroup prefix) with the proxy on.
fn options(
    cgroups: &TestCgroups,
    policies: &[&str],
    upstream: &DnsServer,
) -> Result<(Options, mpsc::UnboundedReceiver<AuditRecord>)> {
    let mut set = Vec::new();
    for (i, yaml) in policies.iter().enumerate() {
        let yaml = yaml.replace("{base}", &cgroups.base);
        set.push(policy::parse_policy(
            Path::new(&format!("dns{i}.yaml")),
            &yaml,
        )?);
    }
    let (tap, records) = mpsc::unbounded_channel();
    let mut opts = Options::new(PolicySource::Fixed(PolicySet { policies: set }));
    opts.control_socket = None;
    opts.tap = Some(tap);
    proxy::enable(&mut opts, upstream.addr())?;
    Ok((opts, records))
}

impl Dns {
    /// The upstream serving `zone`, then a controller enforcing `policies` on the cgroups
    /// `make` (relative to the test prefix), registered.
    async fn start(policies: &[&str], make: &[&str], zone: &[Rec]) -> Result<Dns> {
        let upstream = DnsServer::start(zone)?;
        let cgroups = TestCgroups::new()?;
        let made: Vec<PathBuf> = make
            .iter()
            .map(|m| cgroups.make(m))
            .collect::<Result<_>>()?;
        let (opts, records) = options(&cgroups, policies, &upstream)?;
        let handle = daemon::start(opts).await?;
        for m in &made {
            handle.register(m).await?;
        }
        proxy::listening(&handle)?;
        Ok(Dns {
            cgroups,
            handle: Some(handle),
            records,
            upstream,
        })
    }

    fn h(&self) -> &Handle {
        self.handle.as_ref().expect("running")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.cgroups.path(rel)
    }

    /// The next DNS record about `name` with `decision` (within 5 s).
    async fn dns_record(&mut self, name: &str, decision: &str) -> Result<Value> {
        let r = next_record(&mut self.records, Duration::from_secs(5), |r| {
            r.kind == "dns"
                && r.detail.as_ref().is_some_and(|d| {
                    same_name(&d["name"], name) && d["decision"].as_str() == Some(decision)
                })
        })
        .await
        .with_context(|| format!("a dns record for {name} ({decision})"))?;
        Ok(r.detail.expect("detail"))
    }

    /// The next connection record to `to`, as JSON (with the fields the proxy adds).
    async fn connection_record(&mut self, to: SocketAddr) -> Result<Value> {
        let r = next_decision_to(&mut self.records, to).await?;
        Ok(serde_json::to_value(r.decision.expect("a decision"))?)
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            h.shutdown().await?;
        }
        Ok(())
    }
}

/// A DNS name in a record, compared without case or trailing dot.
fn same_name(v: &Value, name: &str) -> bool {
    v.as_str()
        .is_some_and(|s| s.trim_end_matches('.').eq_ignore_ascii_case(name))
}

/// What the probe's `dns:`/`dnsu:`/`dnst:` steps saw.
#[derive(Debug)]
struct Reply {
    rcode: i64,
    answers: Vec<IpAddr>,
    ttls: Vec<u64>,
    from: String,
    peer: Option<String>,
}

const NOERROR: i64 = 0;
const NXDOMAIN: i64 = 3;
const REFUSED: i64 = 5;

/// A query step's reply; a step that got none fails naming why.
fn reply(o: &Outcome) -> Result<Reply> {
    if !o.ok {
        let why = match o.errno {
            libc::ECONNREFUSED => ": nothing answered at the resolver address (not steered)",
            libc::EAGAIN | libc::ETIMEDOUT => ": no reply within 2 s",
            _ => "",
        };
        bail!("{}: errno {} {}{why}", o.step, o.errno, o.detail);
    }
    let d: Value = serde_json::from_str(&o.detail).with_context(|| o.detail.clone())?;
    let answers = d["answers"]
        .as_array()
        .context("answers")?
        .iter()
        .map(|a| a.as_str().unwrap_or_default().parse())
        .collect::<Result<_, _>>()?;
    let ttls = d["ttls"]
        .as_array()
        .context("ttls")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    Ok(Reply {
        rcode: o.value,
        answers,
        ttls,
        from: d["from"].as_str().unwrap_or_default().to_string(),
        peer: d["peer"].as_str().map(str::to_string),
    })
}

/// A query step: `kind` is dns (connected UDP), dnsu (unconnected UDP) or dnst (TCP).
fn q(kind: &str, server: &str, name: &str, ty: &str) -> String {
    format!("{kind}:{server},{name},{ty}")
}

/// One query from a process in `cgroup`.
fn resolve(cgroup: &Path, kind: &str, server: &str, name: &str, ty: &str) -> Result<Reply> {
    let out = probe_in(cgroup, &[q(kind, server, name, ty)])?;
    reply(&out[0])
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

/// A policy on `<base>/agent` with egress `rules` and a top-level `dns` block (YAML text).
fn policy(rules: &str, dns: &str) -> String {
    format!("name: dns-test\nagents:\n  cgroups: [\"{{base}}/agent\"]\negress:\n{rules}{dns}")
}

/// One egress rule allowing `hosts` (a YAML flow list) over TCP, any port.
fn hosts_rule(hosts: &str) -> String {
    format!("  - hosts: {hosts}\n    protocol: tcp\n")
}

/// A UDP query nothing answered: refused by an ICMP port-unreachable (a connected socket),
/// or no reply in 2 s (an unconnected one, or when the kernel rate-limits its ICMP).
fn unanswered_udp(o: &Outcome) -> bool {
    !o.ok && matches!(o.errno, libc::ECONNREFUSED | libc::EAGAIN)
}

// The harness alone: these pass with or without the proxy.

#[test]
fn the_upstream_answers_a_plain_client() -> Result<()> {
    let s = DnsServer::start(&[
        Rec::a("a.test", "127.0.20.1", 60),
        Rec::cname("alias.test", "a.test", 30),
        Rec::a("*.wild.test", "127.0.21.1", 5),
        Rec::aaaa("six.test", "::1", 60),
    ])?;
    let at = s.addr().to_string();
    let out = probe(&[
        q("dns", &at, "a.test", "A"),
        q("dnsu", &at, "alias.test", "A"),
        q("dnst", &at, "x.y.wild.test", "A"),
        q("dns", &at, "six.test", "AAAA"),
        q("dns", &at, "nope.test", "A"),
        format!("dnsraw:{at},000100000000000000000000"),
    ])?;
    let r = reply(&out[0])?;
    assert_eq!(
        (r.rcode, r.answers.clone()),
        (NOERROR, vec![ip("127.0.20.1")])
    );
    assert_eq!(
        (r.from.as_str(), r.peer.as_deref()),
        (at.as_str(), Some(at.as_str()))
    );
    assert_eq!(r.ttls, [60]);
    let r = reply(&out[1])?;
    assert_eq!(r.answers, [ip("127.0.20.1")], "the CNAME chain is followed");
    assert_eq!((r.from.as_str(), r.peer), (at.as_str(), None));
    let r = reply(&out[2])?;
    assert_eq!(
        (r.answers.clone(), r.ttls),
        (vec![ip("127.0.21.1")], vec![5])
    );
    assert_eq!(r.peer.as_deref(), Some(at.as_str()));
    assert_eq!(reply(&out[3])?.answers, [ip("::1")]);
    assert_eq!(reply(&out[4])?.rcode, NXDOMAIN);
    // A header with no question: FORMERR (QR set, rcode 1).
    assert!(out[5].ok, "{:?}", out[5]);
    assert!(out[5].detail.contains("\"000180010000"), "{:?}", out[5]);
    assert_eq!(s.queries("a.test"), 1);
    assert_eq!(s.queries("ALIAS.test."), 1);
    assert_eq!(s.queries("x.y.wild.test"), 1);
    assert_eq!(s.total(), 5);
    drop(s);
    // Stopped: nothing answers on its port any more.
    let out = probe(&[q("dns", &at, "a.test", "A"), q("dnst", &at, "a.test", "A")])?;
    assert!(unanswered_udp(&out[0]), "{out:?}");
    assert_eq!(out[1].errno, libc::ECONNREFUSED, "{out:?}");
    Ok(())
}

#[test]
fn nothing_answers_at_the_resolver_addresses_unsteered() -> Result<()> {
    let out = probe(&[
        q("dns", RESOLVER, "a.test", "A"),
        q("dnsu", RESOLVER, "a.test", "A"),
        q("dnst", RESOLVER, "a.test", "A"),
        q("dns", RESOLVER6, "a.test", "A"),
        q("dnst", RESOLVER6, "a.test", "A"),
    ])?;
    for i in [0, 1, 3] {
        assert!(unanswered_udp(&out[i]), "{:?}", out[i]);
    }
    for i in [2, 4] {
        assert_eq!(out[i].errno, libc::ECONNREFUSED, "{:?}", out[i]);
    }
    Ok(())
}

// The proxy.

const OK_ZONE: &[(&str, &str)] = &[("ok.test", "127.0.30.1"), ("denied.test", "127.0.31.1")];

fn ok_zone() -> Vec<Rec> {
    OK_ZONE.iter().map(|(n, a)| Rec::a(n, a, 60)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_name_resolves_every_way_and_its_address_connects() -> Result<()> {
    let p = policy(&hosts_rule("[ok.test]"), "");
    let mut c = Dns::start(&[&p], &["agent"], &ok_zone()).await?;
    let agent = c.path("agent");
    let (_l, to) = tcp_server("127.0.30.1")?;

    let out = probe_in(
        &agent,
        &[
            q("dns", RESOLVER, "ok.test", "A"),
            q("dnsu", RESOLVER, "ok.test", "A"),
            q("dnst", RESOLVER, "ok.test", "A"),
        ],
    )?;
    for o in &out {
        let r = reply(o)?;
        assert_eq!(
            (r.rcode, r.answers.clone()),
            (NOERROR, vec![to.ip()]),
            "{o:?}"
        );
        // The stub resolver sees the address it asked, not the proxy's.
        assert_eq!(r.from, RESOLVER, "{o:?}");
    }
    assert_eq!(reply(&out[0])?.peer.as_deref(), Some(RESOLVER));
    assert_eq!(reply(&out[1])?.peer, None);
    assert_eq!(reply(&out[2])?.peer.as_deref(), Some(RESOLVER));
    assert!(c.upstream.queries("ok.test") >= 1, "forwarded upstream");

    let d = c.dns_record("ok.test", "allow").await?;
    assert_eq!(d["type"], "A");
    assert_eq!(d["transport"], "udp");
    assert_eq!(d["rcode"], "NOERROR");
    assert_eq!(d["reason"], "rule");
    assert_eq!(d["agent"], "agent");
    assert!(
        d["answers"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["addr"] == "127.0.30.1")),
        "{d}"
    );

    assert_eq!(
        connect_errno(&agent, to)?,
        0,
        "the resolved address connects"
    );
    let r = c.connection_record(to).await?;
    assert_eq!(
        (&r["decision"], &r["reason"]),
        (&"allow".into(), &"host".into()),
        "{r}"
    );
    assert_eq!(r["host"], "ok.test", "{r}");

    // Only agents are steered: a process outside finds nothing at the resolver address.
    let out = probe(&[
        q("dns", RESOLVER, "ok.test", "A"),
        q("dnst", RESOLVER, "ok.test", "A"),
    ])?;
    assert!(unanswered_udp(&out[0]), "{out:?}");
    assert_eq!(out[1].errno, libc::ECONNREFUSED, "{out:?}");
    c.stop().await
}

async fn a_denied_name(dns_block: &str, rcode: i64, rcode_name: &str) -> Result<()> {
    let p = policy(&hosts_rule("[ok.test]"), dns_block);
    let mut c = Dns::start(&[&p], &["agent"], &ok_zone()).await?;
    let agent = c.path("agent");
    let (_l, to) = tcp_server("127.0.31.1")?;
    for kind in ["dns", "dnst"] {
        let r = resolve(&agent, kind, RESOLVER, "denied.test", "A")?;
        assert_eq!((r.rcode, r.answers.len()), (rcode, 0), "{kind}: {r:?}");
    }
    assert_eq!(
        c.upstream.queries("denied.test"),
        0,
        "a denied name reached upstream"
    );
    let d = c.dns_record("denied.test", "deny").await?;
    assert_eq!(d["rcode"], rcode_name, "{d}");
    assert_eq!(d["reason"], "no-host-match", "{d}");
    assert_eq!(d["type"], "A", "{d}");
    assert_eq!(
        connect_errno(&agent, to)?,
        EPERM,
        "its address stays closed"
    );
    let r = c.connection_record(to).await?;
    assert_eq!(r["decision"], "deny", "{r}");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_name_is_refused_never_forwarded_and_unreachable() -> Result<()> {
    a_denied_name("", REFUSED, "REFUSED").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_name_can_be_answered_nxdomain() -> Result<()> {
    a_denied_name("dns:\n  denied_answer: nxdomain\n", NXDOMAIN, "NXDOMAIN").await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_star_is_one_label_and_two_stars_any_depth() -> Result<()> {
    let p = policy(&hosts_rule("[\"*.one.test\", \"**.any.test\"]"), "");
    let zone = [
        Rec::a("*.one.test", "127.0.32.1", 60),
        Rec::a("*.any.test", "127.0.32.2", 60),
    ];
    let mut c = Dns::start(&[&p], &["agent"], &zone).await?;
    let agent = c.path("agent");
    let cases = [
        ("a.one.test", Some("127.0.32.1")),
        ("a.b.one.test", None),
        ("one.test", None),
        ("a.any.test", Some("127.0.32.2")),
        ("a.b.any.test", Some("127.0.32.2")),
        ("x.y.z.any.test", Some("127.0.32.2")),
    ];
    let steps: Vec<String> = cases
        .iter()
        .map(|(n, _)| q("dns", RESOLVER, n, "A"))
        .collect();
    let out = probe_in(&agent, &steps)?;
    for ((name, want), o) in cases.iter().zip(&out) {
        let r = reply(o)?;
        match want {
            Some(a) => {
                assert_eq!(
                    (r.rcode, r.answers.clone()),
                    (NOERROR, vec![ip(a)]),
                    "{name}"
                );
                assert!(c.upstream.queries(name) >= 1, "{name} forwarded");
            }
            None => {
                assert_eq!((r.rcode, r.answers.len()), (REFUSED, 0), "{name}");
                assert_eq!(c.upstream.queries(name), 0, "{name} reached upstream");
            }
        }
    }
    c.dns_record("a.b.one.test", "deny").await?;
    c.stop().await
}

const TTL_DNS: &str = "dns:\n  ttl_min: 1s\n  ttl_max: 1h\n  grace: 0s\n";

#[tokio::test(flavor = "multi_thread")]
async fn the_address_closes_when_the_ttl_runs_out() -> Result<()> {
    let p = policy(&hosts_rule("[ttl.test]"), TTL_DNS);
    let zone = [Rec::a("ttl.test", "127.0.33.1", 1)];
    let mut c = Dns::start(&[&p], &["agent"], &zone).await?;
    let agent = c.path("agent");
    let (_l, to) = tcp_server("127.0.33.1")?;
    let asked = Instant::now();
    let r = resolve(&agent, "dns", RESOLVER, "ttl.test", "A")?;
    assert_eq!(r.answers, [to.ip()]);
    assert_eq!(connect_errno(&agent, to)?, 0, "open until the deadline");
    wait_denied(&agent, to, Duration::from_secs(5))?;
    let at = asked.elapsed();
    ensure!(
        at >= Duration::from_millis(900),
        "closed after {at:?}, before the 1 s TTL"
    );
    let d = c.dns_record("ttl.test", "allow").await?;
    assert_eq!(d["answers"][0]["ttl"], 1, "{d}");
    // Resolving again opens it again.
    resolve(&agent, "dns", RESOLVER, "ttl.test", "A")?;
    assert_eq!(
        connect_errno(&agent, to)?,
        0,
        "open again after a new lookup"
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kernel_closes_the_address_on_time_with_no_controller_running() -> Result<()> {
    agentwall::datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
    let p = policy(&hosts_rule("[ttl.test]"), TTL_DNS);
    let zone = [Rec::a("ttl.test", "127.0.33.2", 3)];
    let upstream = DnsServer::start(&zone)?;
    let cgroups = TestCgroups::new()?;
    let agent = cgroups.make("agent")?;
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/agentwall-test-dns-{}",
        std::process::id()
    ));
    let (l, to) = tcp_server("127.0.33.2")?;
    let (mut opts, records) = options(&cgroups, &[&p], &upstream)?;
    opts.pin_dir = Some(pin_dir.clone());
    // A controller on a runtime of its own: the agent resolves through it, then it is killed
    // (runtime dropped, no shutdown); the pinned programs and maps keep enforcing.
    let (up_tx, up) = std::sync::mpsc::channel::<Result<()>>();
    let (kill, killed) = std::sync::mpsc::channel::<()>();
    let agent2 = agent.clone();
    let controller = std::thread::spawn(move || -> Result<()> {
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(async {
            let started = async {
                let h = daemon::start(opts).await?;
                h.register(&agent2).await?;
                proxy::listening(&h)?;
                anyhow::Ok(h)
            }
            .await;
            match started {
                Ok(h) => {
                    let _ = up_tx.send(Ok(()));
                    let _ = killed.recv();
                    std::mem::forget(h);
                }
                Err(e) => {
                    let _ = up_tx.send(Err(e));
                }
            }
        });
        rt.shutdown_background();
        Ok(())
    });
    let result = async {
        up.recv().context("the controller thread ended")??;
        let asked = Instant::now();
        let r = resolve(&agent, "dns", RESOLVER, "ttl.test", "A");
        let _ = kill.send(());
        controller.join().expect("controller thread")?;
        ensure!(r?.answers == [to.ip()], "resolved");
        // No asserts in here: a panic would skip the cleanup below.
        let e = connect_errno(&agent, to)?;
        ensure!(e == 0, "errno {e}: not open with no controller running");
        wait_denied(&agent, to, Duration::from_secs(8))?;
        let at = asked.elapsed();
        ensure!(
            at >= Duration::from_millis(2900),
            "closed after {at:?}, before the 3 s TTL"
        );
        Ok(())
    }
    .await;
    let _ = kill.send(());
    drop(records);
    drop(l);
    // Cleaned up either way; the test's own failure comes first.
    let cleaned = agentwall::datapath::pin::uninstall(&pin_dir);
    result?;
    cleaned?;
    ensure!(!pin_dir.exists(), "{} is left behind", pin_dir.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cname_opens_the_address_it_leads_to() -> Result<()> {
    let p = policy(&hosts_rule("[alias.test]"), "");
    let zone = [
        Rec::cname("alias.test", "target.test", 60),
        Rec::a("target.test", "127.0.34.1", 60),
    ];
    let mut c = Dns::start(&[&p], &["agent"], &zone).await?;
    let agent = c.path("agent");
    let (_l, to) = tcp_server("127.0.34.1")?;
    assert_eq!(
        connect_errno(&agent, to)?,
        EPERM,
        "closed before the lookup"
    );
    let r = c.connection_record(to).await?;
    assert_eq!(r["decision"], "deny", "{r}");
    let r = resolve(&agent, "dns", RESOLVER, "alias.test", "A")?;
    assert_eq!((r.rcode, r.answers), (NOERROR, vec![to.ip()]));
    assert_eq!(connect_errno(&agent, to)?, 0, "the CNAME's target connects");
    let r = c.connection_record(to).await?;
    assert_eq!(r["decision"], "allow", "{r}");
    assert_eq!(
        (&r["reason"], &r["host"]),
        (&"host".into(), &"alias.test".into()),
        "{r}"
    );
    // The target's own name is not allowed.
    let r = resolve(&agent, "dns", RESOLVER, "target.test", "A")?;
    assert_eq!(r.rcode, REFUSED);
    assert_eq!(c.upstream.queries("target.test"), 0);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn aaaa_over_tcp_opens_ipv6_only_after_resolving() -> Result<()> {
    let p = policy(&hosts_rule("[six.test]"), "");
    let zone = [Rec::aaaa("six.test", "::1", 60)];
    let mut c = Dns::start(&[&p], &["agent"], &zone).await?;
    let agent = c.path("agent");
    let (_l, to) = tcp_server("::1")?;
    assert_eq!(
        connect_errno(&agent, to)?,
        EPERM,
        "closed before the lookup"
    );
    let r = resolve(&agent, "dnst", RESOLVER, "six.test", "AAAA")?;
    assert_eq!((r.rcode, r.answers), (NOERROR, vec![to.ip()]));
    assert_eq!(r.peer.as_deref(), Some(RESOLVER));
    let d = c.dns_record("six.test", "allow").await?;
    assert_eq!(
        (&d["type"], &d["transport"]),
        (&"AAAA".into(), &"tcp".into()),
        "{d}"
    );
    assert_eq!(
        connect_errno(&agent, to)?,
        0,
        "[::1] connects after the lookup"
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_to_an_ipv6_resolver_are_steered_too() -> Result<()> {
    let p = policy(&hosts_rule("[ok.test]"), "");
    let c = Dns::start(&[&p], &["agent"], &ok_zone()).await?;
    let agent = c.path("agent");
    let out = probe_in(
        &agent,
        &[
            q("dns", RESOLVER6, "ok.test", "A"),
            q("dnsu", RESOLVER6, "ok.test", "A"),
            q("dnst", RESOLVER6, "ok.test", "A"),
            q("dns", RESOLVER6, "denied.test", "A"),
        ],
    )?;
    for o in &out[..3] {
        let r = reply(o)?;
        assert_eq!(
            (r.rcode, r.answers.clone()),
            (NOERROR, vec![ip("127.0.30.1")]),
            "{o:?}"
        );
        assert_eq!(r.from, RESOLVER6, "{o:?}");
    }
    assert_eq!(reply(&out[3])?.rcode, REFUSED);
    assert_eq!(c.upstream.queries("denied.test"), 0);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_agents_lookup_opens_nothing_for_another() -> Result<()> {
    let p = "name: dns-two\nagents:\n  cgroups: [\"{base}/agent\", \"{base}/other\"]\n\
             egress:\n  - host: shared.test\n    protocol: tcp\n";
    let zone = [Rec::a("shared.test", "127.0.35.1", 60)];
    let c = Dns::start(&[p], &["agent", "other"], &zone).await?;
    let (agent, other) = (c.path("agent"), c.path("other"));
    let (_l, to) = tcp_server("127.0.35.1")?;
    resolve(&agent, "dns", RESOLVER, "shared.test", "A")?;
    assert_eq!(
        connect_errno(&agent, to)?,
        0,
        "the agent that resolved connects"
    );
    assert_eq!(
        connect_errno(&other, to)?,
        EPERM,
        "the other agent did not resolve it"
    );
    let r = resolve(&other, "dnsu", RESOLVER, "shared.test", "A")?;
    assert_eq!(r.answers, [to.ip()]);
    assert_eq!(
        connect_errno(&other, to)?,
        0,
        "open once it resolved it itself"
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_this_agent_did_not_resolve_stays_closed() -> Result<()> {
    let p = policy(&hosts_rule("[direct.test]"), "");
    let zone = [Rec::a("direct.test", "127.0.36.1", 60)];
    let mut c = Dns::start(&[&p], &["agent"], &zone).await?;
    let agent = c.path("agent");
    let (_l1, to) = tcp_server("127.0.36.1")?;
    let (_l2, beside) = tcp_server("127.0.36.2")?;
    assert_eq!(connect_errno(&agent, to)?, EPERM, "not resolved: closed");
    let r = c.connection_record(to).await?;
    assert_eq!(r["decision"], "deny", "{r}");
    resolve(&agent, "dns", RESOLVER, "direct.test", "A")?;
    assert_eq!(
        connect_errno(&agent, beside)?,
        EPERM,
        "not in the answer: closed"
    );
    // The same address on another protocol: the rule is TCP only.
    let out = probe_in(&agent, &[format!("udp:{to}")])?;
    assert_eq!(out[0].errno, EPERM, "{out:?}");
    assert_eq!(connect_errno(&agent, to)?, 0);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn dns_over_tls_needs_a_rule_naming_port_853() -> Result<()> {
    let (_dot, dot) = tcp_server_at("127.0.37.1:853".parse()?)?;
    let (_other, other) = tcp_server("127.0.37.1")?;
    let wide = policy("  - cidr: 127.0.0.0/8\n    protocol: tcp\n", "");
    let c = Dns::start(&[&wide], &["agent"], &ok_zone()).await?;
    let agent = c.path("agent");
    assert_eq!(
        connect_errno(&agent, other)?,
        0,
        "the /8 rule allows other ports"
    );
    assert_eq!(
        connect_errno(&agent, dot)?,
        EPERM,
        "853 needs a rule naming it"
    );
    c.stop().await?;

    let named = policy(
        "  - cidr: 127.0.0.0/8\n    ports: \"853\"\n    protocol: tcp\n",
        "",
    );
    let c = Dns::start(&[&named], &["agent"], &ok_zone()).await?;
    assert_eq!(
        connect_errno(&c.path("agent"), dot)?,
        0,
        "a rule naming 853 allows it"
    );
    c.stop().await
}

/// A query with three questions (one of them a denied name), as bytes.
fn three_questions() -> Result<String> {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RecordType},
    };
    let mut m = Message::new();
    m.set_id(0x3333)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    for (n, t) in [
        ("ok.test.", RecordType::A),
        ("denied.test.", RecordType::A),
        ("ok.test.", RecordType::AAAA),
    ] {
        m.add_query(Query::query(Name::from_ascii(n)?, t));
    }
    Ok(hex::encode(m.to_vec()?))
}

/// The reply in a raw step's detail, parsed (None when nothing came back).
fn raw_reply(o: &Outcome, tcp: bool) -> Result<Option<hickory_proto::op::Message>> {
    ensure!(o.ok, "{}: errno {} {}", o.step, o.errno, o.detail);
    let d: Value = serde_json::from_str(&o.detail)?;
    let bytes = hex::decode(d["reply"].as_str().unwrap_or_default())?;
    let body = if tcp {
        bytes.get(2..).unwrap_or_default()
    } else {
        &bytes[..]
    };
    if body.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        hickory_proto::op::Message::from_vec(body)
            .with_context(|| format!("{}: the reply is not DNS", o.step))?,
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_truncated_and_oversized_packets_never_stop_the_proxy() -> Result<()> {
    let p = policy(&hosts_rule("[ok.test]"), "");
    let c = Dns::start(&[&p], &["agent"], &ok_zone()).await?;
    let agent = c.path("agent");
    let steps = [
        format!("dnsraw:{RESOLVER},00"),
        format!("dnsraw:{RESOLVER},{}", "ff".repeat(300)),
        format!("dnsraw:{RESOLVER},0102030405"),
        format!("dnsraw:{RESOLVER},000100000000000000000000"),
        format!("dnsraw:{RESOLVER},{}", three_questions()?),
        format!("dnsbig:{RESOLVER},65507"),
        format!("dnstbig:{RESOLVER},65535"),
        format!("dnstraw:{RESOLVER},0064010203"),
        format!("dnstraw:{RESOLVER},ffff{}", "00".repeat(100)),
        q("dns", RESOLVER, "ok.test", "A"),
        q("dnst", RESOLVER, "ok.test", "A"),
    ];
    let out = probe_in(&agent, &steps)?;
    for (i, o) in out[..9].iter().enumerate() {
        // Steered (no ECONNREFUSED); whatever came back is DNS and releases no address.
        let m = raw_reply(o, o.step.starts_with("dnst"))?;
        if let Some(m) = m {
            ensure!(
                m.answers().is_empty(),
                "step {i} {}: answers released: {m:?}",
                &o.step[..o.step.len().min(60)]
            );
        }
    }
    assert_eq!(
        c.upstream.queries("denied.test"),
        0,
        "a denied name reached upstream"
    );
    assert_eq!(
        c.upstream.queries("big.test"),
        0,
        "an oversized query reached upstream"
    );
    for o in &out[9..] {
        let r = reply(o)?;
        assert_eq!(
            (r.rcode, r.answers.clone()),
            (NOERROR, vec![ip("127.0.30.1")]),
            "{o:?}"
        );
    }
    c.h()
        .status()
        .await
        .context("the controller still answers")?;
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_over_the_rate_limit_are_refused() -> Result<()> {
    let p = policy(
        &hosts_rule("[ok.test]"),
        "dns:\n  query_rate: {per_second: 1, burst: 3}\n",
    );
    let mut c = Dns::start(&[&p], &["agent"], &ok_zone()).await?;
    let agent = c.path("agent");
    let steps: Vec<String> = (0..6).map(|_| q("dns", RESOLVER, "ok.test", "A")).collect();
    let out = probe_in(&agent, &steps)?;
    let codes: Vec<i64> = out
        .iter()
        .map(|o| reply(o).map(|r| r.rcode))
        .collect::<Result<_>>()?;
    assert_eq!(codes[..3], [NOERROR; 3], "the burst is answered: {codes:?}");
    // One more may pass if a second went by; the rest are refused.
    let refused = codes[3..].iter().filter(|&&c| c == REFUSED).count();
    ensure!(refused >= 2, "over the burst, not refused: {codes:?}");
    let passed = codes.iter().filter(|&&c| c == NOERROR).count() as u64;
    ensure!(
        c.upstream.queries("ok.test") <= passed,
        "refused queries reached upstream: {} forwarded, {passed} answered",
        c.upstream.queries("ok.test")
    );
    let d = c.dns_record("ok.test", "deny").await?;
    assert_eq!(
        (&d["reason"], &d["rcode"]),
        (&"rate-limit".into(), &"REFUSED".into()),
        "{d}"
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wildcard_never_covers_a_doh_endpoint_an_exact_rule_does() -> Result<()> {
    let p = policy(
        &hosts_rule("[\"**.cloudflare-dns.com\", dns.quad9.net]"),
        "",
    );
    let zone = [
        Rec::a("mozilla.cloudflare-dns.com", "127.0.39.1", 60),
        Rec::a("other.cloudflare-dns.com", "127.0.39.2", 60),
        Rec::a("dns.quad9.net", "127.0.39.3", 60),
    ];
    let mut c = Dns::start(&[&p], &["agent"], &zone).await?;
    let agent = c.path("agent");
    let out = probe_in(
        &agent,
        &[
            q("dns", RESOLVER, "mozilla.cloudflare-dns.com", "A"),
            q("dns", RESOLVER, "other.cloudflare-dns.com", "A"),
            q("dns", RESOLVER, "dns.quad9.net", "A"),
        ],
    )?;
    assert_eq!(
        reply(&out[0])?.rcode,
        REFUSED,
        "an endpoint under a wildcard"
    );
    assert_eq!(c.upstream.queries("mozilla.cloudflare-dns.com"), 0);
    let r = reply(&out[1])?;
    assert_eq!(
        (r.rcode, r.answers),
        (NOERROR, vec![ip("127.0.39.2")]),
        "not an endpoint"
    );
    let r = reply(&out[2])?;
    assert_eq!(
        (r.rcode, r.answers),
        (NOERROR, vec![ip("127.0.39.3")]),
        "named exactly"
    );
    let d = c.dns_record("mozilla.cloudflare-dns.com", "deny").await?;
    assert_eq!(d["reason"], "doh-endpoint", "{d}");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn no_more_addresses_per_name_open_than_the_cap() -> Result<()> {
    let p = policy(
        &hosts_rule("[many.test]"),
        "dns:\n  max_addresses_per_name: 2\n",
    );
    let ips: Vec<String> = (1..=5).map(|i| format!("127.0.38.{i}")).collect();
    let zone: Vec<Rec> = ips.iter().map(|a| Rec::a("many.test", a, 60)).collect();
    let c = Dns::start(&[&p], &["agent"], &zone).await?;
    let agent = c.path("agent");
    let servers: Vec<_> = ips.iter().map(|a| tcp_server(a)).collect::<Result<_>>()?;
    let r = resolve(&agent, "dns", RESOLVER, "many.test", "A")?;
    assert_eq!(r.rcode, NOERROR);
    let mut open = Vec::new();
    for (_, to) in &servers {
        match connect_errno(&agent, *to)? {
            0 => open.push(to.ip()),
            EPERM => {}
            e => bail!("connect to {to}: errno {e}"),
        }
    }
    assert_eq!(open.len(), 2, "open: {open:?}, answered: {:?}", r.answers);
    ensure!(
        open.iter().all(|a| r.answers.contains(a)),
        "opened addresses the agent was not given: {open:?} vs {:?}",
        r.answers
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_is_gone_is_servfail_and_opens_nothing() -> Result<()> {
    let p = policy(&hosts_rule("[ok.test]"), "");
    let mut c = Dns::start(&[&p], &["agent"], &ok_zone()).await?;
    let agent = c.path("agent");
    let (_l, to) = tcp_server("127.0.30.1")?;
    // The proxy still forwards to the old port, where nothing listens now.
    drop(std::mem::replace(&mut c.upstream, DnsServer::start(&[])?));
    let r = resolve(&agent, "dns", RESOLVER, "ok.test", "A")?;
    assert_eq!(
        (r.rcode, r.answers.len()),
        (2, 0),
        "SERVFAIL, no answers: {r:?}"
    );
    // Allowed by the policy, failed upstream: either decision may be recorded.
    let r = next_record(&mut c.records, Duration::from_secs(5), |r| {
        r.kind == "dns"
            && r.detail
                .as_ref()
                .is_some_and(|d| same_name(&d["name"], "ok.test"))
    })
    .await?;
    let d = r.detail.expect("detail");
    assert_eq!(
        (&d["reason"], &d["rcode"]),
        (&"upstream-error".into(), &"SERVFAIL".into()),
        "{d}"
    );
    assert_eq!(connect_errno(&agent, to)?, EPERM, "nothing was opened");
    c.stop().await
}

/// Delegation: a sub-agent's name must be allowed by its own policy and by every enclosing
/// agent's; its answer opens the address for the sub-agent alone, on the ports both rules
/// allow, and never for the enclosing agent's own processes.
#[tokio::test(flavor = "multi_thread")]
async fn a_sub_agents_name_needs_every_enclosing_agent_and_opens_nothing_for_them() -> Result<()> {
    let parent = concat!(
        "name: dns-parent\nagents:\n  cgroups: [\"{base}/agent\"]\negress:\n",
        "  - host: both.test\n    ports: \"80\"\n    protocol: tcp\n"
    );
    let tool = concat!(
        "name: dns-tool\nagents:\n  cgroups: [\"{base}/agent/tool\"]\negress:\n",
        "  - hosts: [both.test, tool-only.test]\n    ports: [80, 443]\n    protocol: tcp\n"
    );
    let zone = [
        Rec::a("both.test", "127.0.38.1", 60),
        Rec::a("tool-only.test", "127.0.38.2", 60),
    ];
    let mut c = Dns::start(&[parent, tool], &["agent", "agent/tool"], &zone).await?;
    let (agent, sub) = (c.path("agent"), c.path("agent/tool"));
    let (_l80, at80) = tcp_server_at("127.0.38.1:80".parse()?)?;
    let (_l443, at443) = tcp_server_at("127.0.38.1:443".parse()?)?;

    let r = resolve(&sub, "dns", RESOLVER, "both.test", "A")?;
    assert_eq!((r.rcode, r.answers), (NOERROR, vec![ip("127.0.38.1")]));
    assert_eq!(connect_errno(&sub, at80)?, 0, "both policies allow port 80");
    assert_eq!(
        connect_errno(&sub, at443)?,
        EPERM,
        "the enclosing agent's rule allows port 80 only"
    );
    assert_eq!(
        connect_errno(&agent, at80)?,
        EPERM,
        "the sub-agent's lookup opens nothing for the agent enclosing it"
    );

    let r = resolve(&sub, "dns", RESOLVER, "tool-only.test", "A")?;
    assert_eq!(
        r.rcode, REFUSED,
        "the enclosing agent's policy does not name it"
    );
    assert_eq!(c.upstream.queries("tool-only.test"), 0, "never forwarded");
    let d = c.dns_record("tool-only.test", "deny").await?;
    assert_eq!(d["decided_by"], "agent", "{d}");
    c.stop().await
}
