//! `agentwall demo`: the whole loop on loopback with the embedded demo policy. Servers listen on
//! loopback, the controller enforces, an agent process (run through `agentwall exec`) tries
//! allowed and denied destinations, and the audit records are printed.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use agent_common::decide::IPPROTO_TCP;
use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;

use crate::{
    control::{explain::ExplainRequest, Caller, GrantRequest, TaskStart},
    daemon::{self, Options, PolicySource},
    events::AuditRecord,
    policy::{self, PolicySet},
};

/// The demo policy, embedded so the demo needs no files.
pub const DEMO_POLICY: &str = include_str!("../../../policies/demo.yaml");
/// A sub-agent's policy (a tool sandbox inside the demo agent's cgroup).
pub const DEMO_TOOL_POLICY: &str = include_str!("../../../policies/demo-tool.yaml");

/// What the demo agent tries; every target is loopback.
const TARGETS: &[(&str, &str)] = &[
    ("tcp", "127.0.0.1:8080"),
    ("tcp", "127.0.0.1:9005"),
    ("tcp", "127.0.0.1:9100"),
    // Outside every rule, but granted just in time for the agent's task (below).
    ("tcp", "127.0.0.1:9999"),
    ("tcp", "127.0.0.2:8080"),
    ("tcp", "[::1]:8080"),
    ("tcp", "[::ffff:127.0.0.1]:8080"),
    ("udp", "127.0.0.1:5353"),
    ("udp", "127.0.0.1:5354"),
    ("unix", "/run/agentwall-demo/tools.sock"),
    ("unix", "/run/agentwall-demo/secret.sock"),
    // No cgroup hook sees packet sockets; `exec` runs the agent as `nobody` without
    // capabilities, so the kernel refuses it at its capability check, where agentwall records it.
    ("packet", "socket(AF_PACKET, SOCK_RAW)"),
    // A tool the agent starts connects and exits at once: the record still names the program
    // that made the call and the agent process that started it (captured in the kernel).
    ("tool", "127.0.0.2:8443"),
    // Host names: the agent asks a resolver address where nothing listens; the kernel steers the
    // query to agentwall's DNS proxy, which answers an allowed name (and opens its address for
    // this agent only) and refuses any other, never asking upstream.
    ("dns", "api.tools.demo"),
    ("tcp", "127.0.0.3:8443"),
    ("dns", "exfil.attacker.demo"),
    // The address the refused name has upstream: no resolution opened it.
    ("tcp", "127.0.0.4:8443"),
];

/// The resolver address the demo agent asks: nothing listens there, so only the kernel's
/// steering to the proxy answers (and nothing leaves loopback if it did not).
const DEMO_RESOLVER: &str = "127.0.0.153:53";

/// The demo zone, served by a stand-in upstream resolver on loopback.
const DEMO_ZONE: &[(&str, [u8; 4])] = &[
    ("api.tools.demo", [127, 0, 0, 3]),
    ("exfil.attacker.demo", [127, 0, 0, 4]),
];

/// Where the demo's Unix sockets live (the demo policy lists tools.sock).
const UNIX_DIR: &str = "/run/agentwall-demo";

pub async fn run(audit_log: PathBuf) -> Result<()> {
    let demo = policy::parse_policy(Path::new("policies/demo.yaml"), DEMO_POLICY)?;
    let tool = policy::parse_policy(Path::new("policies/demo-tool.yaml"), DEMO_TOOL_POLICY)?;
    let selector = demo
        .agents
        .first()
        .map(|s| s.pattern.clone())
        .context("the demo policy selects no cgroup")?;
    let _servers = Servers::start()?;
    let upstream = DemoResolver::start().await?;
    let socket = std::env::temp_dir().join(format!("agentwall-demo-{}.sock", std::process::id()));
    let (tap, mut records) = mpsc::unbounded_channel();
    let mut opts = Options::new(PolicySource::Fixed(PolicySet {
        policies: vec![demo, tool],
    }));
    opts.audit_log = Some(audit_log.clone());
    opts.control_socket = Some(socket.clone());
    opts.tap = Some(tap);
    opts.dns = Some(daemon::DnsOptions {
        upstream: upstream.addr,
        listen_v4: std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0),
        listen_v6: None,
    });
    let handle = daemon::start(opts).await?;
    let root = handle.cgroup_root.clone();
    let (parent, name) = selector
        .rsplit_once('/')
        .context("the demo selector must be <parent>/<name>")?;

    println!(
        "agentwall demo: policy `demo` enforces on cgroup {selector}; targets are loopback only\n"
    );
    // Just in time: a task for the agent, and a grant tied to it that the kernel ends at its
    // deadline (registered first, so the grant exists before the agent runs).
    let agent_path = root.join(&selector);
    crate::identity::cgroup::create(&agent_path)?;
    handle.register(&agent_path).await?;
    let admin = Caller::Admin { uid: 0 };
    let task = handle
        .task_start(
            TaskStart {
                agent: name.into(),
                id: "demo-1".into(),
                intent: "fetch the tool index".into(),
                ttl_secs: Some(120),
            },
            admin.clone(),
        )
        .await?;
    let grant = handle
        .grant(
            GrantRequest {
                agent: name.into(),
                to: "127.0.0.1".into(),
                ports: Some("9999".into()),
                protocol: Some("tcp".into()),
                ttl_secs: 60,
                task: Some(task.id.clone()),
                reason: "the index lives on port 9999".into(),
            },
            admin.clone(),
        )
        .await?;
    println!(
        "task {:?} ({}) started; grant #{}: tcp 127.0.0.1:9999 for 60 s, ended by the kernel at \
         its deadline",
        task.id, task.intent, grant.id
    );
    // Ask before the agent acts: the kernel's answer from the live maps, and why.
    for to in ["127.0.0.1:9999", "127.0.0.2:8080"] {
        let e = handle
            .explain(ExplainRequest {
                agent: name.into(),
                to: to.parse()?,
                protocol: IPPROTO_TCP,
            })
            .await?;
        println!(
            "explain tcp {to}: {} ({}{}; rate limit {})",
            e.action,
            e.reason,
            e.grant.map(|g| format!(" #{}", g.id)).unwrap_or_default(),
            e.rate_limit.as_deref().unwrap_or("none")
        );
    }
    // Delegation: a tool sandbox inside the agent's cgroup is a sub-agent with a policy of its
    // own, and gets only what both policies allow.
    let tool_path = agent_path.join("tool");
    crate::identity::cgroup::create(&tool_path)?;
    handle.register(&tool_path).await?;
    for to in ["127.0.0.1:8080", "127.0.0.2:8443"] {
        let e = handle
            .explain(ExplainRequest {
                agent: format!("{selector}/tool"),
                to: to.parse()?,
                protocol: IPPROTO_TCP,
            })
            .await?;
        println!(
            "explain sub-agent tool (inside {}) tcp {to}: {} ({}{})",
            e.chain.join(" < "),
            e.action,
            e.reason,
            e.decided_by
                .map(|d| format!(", decided by {d}"))
                .unwrap_or_default()
        );
    }
    println!();
    let exe = std::env::current_exe()?;
    let status = tokio::process::Command::new(&exe)
        .args([
            "exec",
            "--agent",
            name,
            "--cgroup-parent",
            parent,
            "--control-socket",
        ])
        .arg(&socket)
        .arg("--")
        .arg(&exe)
        .arg("demo-agent")
        .status()
        .await?;
    // A process outside any agent cgroup is not affected: same denied target, no event.
    let outside = TcpStream::connect_timeout(&"127.0.0.2:8080".parse()?, Duration::from_secs(2));
    println!(
        "\nnot an agent (this process) -> tcp 127.0.0.2:8080: {}",
        if outside.is_ok() {
            "connected, no event"
        } else {
            "FAILED"
        }
    );
    let revoked = handle.revoke(grant.id, admin.clone()).await?;
    println!(
        "revoked grant #{}: {} live connections destroyed",
        revoked.id, revoked.sockets_destroyed
    );
    handle.task_end(name.into(), admin).await?;
    // What the kernel enforces, read back from it (as `agentwall status` shows it).
    let status_reply = handle.status().await?;
    let kernel = &status_reply["kernel"];
    println!(
        "status: kernel {} ({} agent entries, {} watched parents: a new cgroup below one is denied \
         as pending-identity until registered), audit log {}",
        if kernel["ok"] == true { "ok" } else { "NOT OK" },
        kernel["agent_entries"],
        status_reply["watches"].as_array().map_or(0, Vec::len),
        if status_reply["audit_log"]["ok"] == true {
            "ok"
        } else {
            "FAILING"
        },
    );
    // Shutdown drains the ring: every record of the run is written before it returns.
    handle.shutdown().await?;
    let _ = std::fs::remove_dir(&tool_path);
    let _ = std::fs::remove_dir(root.join(&selector));
    // The parent too, when the demo made it and nothing else lives there (rmdir refuses then).
    let _ = std::fs::remove_dir(root.join(parent));

    println!("\naudit records (full JSON in {}):", audit_log.display());
    let (mut n, mut dns) = (0, 0);
    while let Ok(rec) = records.try_recv() {
        n += usize::from(rec.decision.is_some());
        dns += usize::from(rec.kind == "dns");
        print_record(&rec);
    }
    let queries = TARGETS.iter().filter(|(p, _)| *p == "dns").count();
    let forwarded = upstream.asked.load(std::sync::atomic::Ordering::Relaxed);
    if !status.success() || outside.is_err() || n != TARGETS.len() || dns != queries {
        bail!(
            "demo did not go as expected: agent {status}, {n} records for {} attempts, {dns} DNS \
             records for {queries} queries",
            TARGETS.len()
        );
    }
    println!("the upstream resolver was asked {forwarded} time(s): the refused name never left agentwall");
    // Evidence: every line of the audit log is hash-chained to the one before; anyone can check
    // it (with `--audit-key`, signed checkpoints make that hold against the log's writer too).
    let verify = std::process::Command::new(std::env::current_exe()?)
        .args(["audit", "verify"])
        .arg(&audit_log)
        .output()?;
    println!(
        "agentwall audit verify {}: {}{}",
        audit_log.display(),
        String::from_utf8_lossy(&verify.stdout).trim(),
        String::from_utf8_lossy(&verify.stderr).trim()
    );
    if !verify.status.success() {
        bail!("the demo's audit log does not verify");
    }
    Ok(())
}

fn print_record(rec: &AuditRecord) {
    let file = |p: &Option<String>| {
        p.as_deref()
            .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
            .unwrap_or_else(|| "?".into())
    };
    match &rec.decision {
        Some(d) => println!(
            "  #{:<3} {:<8} {} {} agent={} pid={} exe={} parent={} ({}) reason={}{}{}",
            rec.seq,
            d.action,
            if d.family == "unix" || d.hook == "socket" {
                &d.family
            } else {
                &d.protocol
            },
            match &d.unix_path {
                Some(p) => p.clone(),
                None if d.hook == "socket" => "socket".to_string(),
                None => d
                    .dst
                    .parse::<std::net::IpAddr>()
                    .map(|ip| SocketAddr::new(ip, d.port).to_string())
                    .unwrap_or_else(|_| format!("{}:{}", d.dst, d.port)),
            },
            d.agent.as_deref().unwrap_or("?"),
            d.pid,
            file(&d.exe),
            d.ppid.map_or("?".into(), |p| p.to_string()),
            file(&d.parent_exe),
            d.reason,
            d.rule_name
                .as_deref()
                .map(|r| format!(" rule={r}"))
                .unwrap_or_default(),
            d.task
                .as_deref()
                .map(|t| format!(" task={t}"))
                .unwrap_or_default()
                + &d.host
                    .as_deref()
                    .map(|h| format!(" host={h}"))
                    .unwrap_or_default()
        ),
        None if rec.kind == "dns" => {
            let d = rec.detail.clone().unwrap_or_default();
            let answers: Vec<String> = d["answers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    format!(
                        "{} (open {}s)",
                        a["addr"].as_str().unwrap_or("?"),
                        a["open_secs"]
                    )
                })
                .collect();
            println!(
                "  #{:<3} dns      {} {} agent={} {} {} reason={}{}{}",
                rec.seq,
                d["type"].as_str().unwrap_or("?"),
                d["name"].as_str().unwrap_or("?"),
                d["agent"].as_str().unwrap_or("?"),
                d["decision"].as_str().unwrap_or("?"),
                d["rcode"].as_str().unwrap_or("?"),
                d["reason"].as_str().unwrap_or("?"),
                d["rule_name"]
                    .as_str()
                    .map(|r| format!(" rule={r}"))
                    .unwrap_or_default(),
                if answers.is_empty() {
                    String::new()
                } else {
                    format!(" answers={}", answers.join(","))
                }
            )
        }
        None if rec.kind == "lost" => {
            println!("  #{:<3} lost {} events", rec.seq, rec.lost.unwrap_or(0))
        }
        None => println!(
            "  #{:<3} {} {}",
            rec.seq,
            rec.kind,
            rec.detail.clone().unwrap_or_default()
        ),
    }
}

/// The demo agent: tries each target and says what happened.
pub fn agent() -> Result<()> {
    for (proto, target) in TARGETS {
        let result = match *proto {
            "unix" => UnixStream::connect(target).map(|_| ()),
            "packet" => packet_socket(),
            "tool" => run_tool(target),
            "dns" => match resolve(target) {
                Ok(addrs) => {
                    println!(
                        "agent (pid {}) -> dns {target} via {DEMO_RESOLVER}: {}",
                        std::process::id(),
                        addrs
                    );
                    continue;
                }
                Err(e) => Err(e),
            },
            "tcp" => {
                let addr: SocketAddr = target.parse()?;
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(|_| ())
            }
            _ => {
                let addr: SocketAddr = target.parse()?;
                let bind = if addr.is_ipv4() {
                    "127.0.0.1:0"
                } else {
                    "[::1]:0"
                };
                UdpSocket::bind(bind).and_then(|s| s.send_to(b"demo", addr).map(|_| ()))
            }
        };
        let what = match result {
            Ok(()) => "allowed".to_string(),
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                "EPERM: blocked by agentwall".to_string()
            }
            Err(e) => format!("error: {e}"),
        };
        println!(
            "agent (pid {}) -> {proto} {target}: {what}",
            std::process::id()
        );
    }
    Ok(())
}

/// One A query for `name` to DEMO_RESOLVER, as a stub resolver sends it: the answer's
/// addresses, or its rcode.
fn resolve(name: &str) -> std::io::Result<String> {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RData, RecordType},
    };
    let mut q = Message::new();
    q.set_id(0x4157)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).map_err(std::io::Error::other)?,
            RecordType::A,
        ));
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.connect(DEMO_RESOLVER)?;
    sock.send(&q.to_vec().map_err(std::io::Error::other)?)?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf)?;
    let reply = Message::from_vec(&buf[..n]).map_err(std::io::Error::other)?;
    let addrs: Vec<String> = reply
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    Ok(if addrs.is_empty() {
        format!(
            "{} (no address: the name is not allowed)",
            reply.response_code()
        )
    } else {
        format!("{} (answered by agentwall's DNS proxy)", addrs.join(", "))
    })
}

/// A stand-in upstream resolver for the demo zone, on loopback: answers A queries for the zone's
/// names and counts what it was asked (NXDOMAIN for any other name).
struct DemoResolver {
    addr: SocketAddr,
    asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DemoResolver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DemoResolver {
    async fn start() -> Result<Self> {
        use hickory_proto::{
            op::{Message, MessageType, ResponseCode},
            rr::{rdata::A, Name, RData, Record},
        };
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let addr = sock.local_addr()?;
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = asked.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut r = Message::new();
                r.set_id(q.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(q.op_code())
                    .set_recursion_desired(q.recursion_desired())
                    .set_recursion_available(true)
                    .add_queries(q.queries().to_vec());
                let name = q.queries().first().map(|x| x.name().to_ascii());
                let found = DEMO_ZONE.iter().find(|(n, _)| {
                    name.as_deref()
                        .is_some_and(|q| q.trim_end_matches('.').eq_ignore_ascii_case(n))
                });
                match found {
                    Some((n, ip)) => {
                        if let Ok(owner) = Name::from_ascii(format!("{n}.")) {
                            r.add_answer(Record::from_rdata(
                                owner,
                                30,
                                RData::A(A::from(std::net::Ipv4Addr::from(*ip))),
                            ));
                        }
                    }
                    None => {
                        r.set_response_code(ResponseCode::NXDomain);
                    }
                }
                if let Ok(bytes) = r.to_vec() {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            }
        });
        Ok(Self { addr, asked, task })
    }
}

/// Starts a tool (this binary's `demo-tool`) that connects to `target` once and exits.
fn run_tool(target: &str) -> std::io::Result<()> {
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["demo-tool", target])
        .status()?;
    match status.code() {
        Some(0) => Ok(()),
        Some(TOOL_EPERM) => Err(ErrorKind::PermissionDenied.into()),
        _ => Err(std::io::Error::other(format!("tool exited with {status}"))),
    }
}

/// Exit code of `demo-tool` when its connect got EPERM.
const TOOL_EPERM: i32 = 3;

/// The demo agent's tool: one TCP connect, then exit (code 0, or TOOL_EPERM when refused).
pub fn tool(target: &str) -> Result<()> {
    let addr: SocketAddr = target.parse()?;
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => std::process::exit(TOOL_EPERM),
        Err(e) => Err(e.into()),
    }
}

fn packet_socket() -> std::io::Result<()> {
    let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
    // SAFETY: plain syscall; the descriptor is closed at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor this function owns.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Loopback (and Unix) listeners for every target, so allowed connections really complete.
struct Servers {
    _tcp: Vec<TcpListener>,
    _udp: Vec<UdpSocket>,
    _unix: Vec<UnixListener>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(UNIX_DIR);
    }
}

impl Servers {
    fn start() -> Result<Self> {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        let mut unix = Vec::new();
        for (proto, target) in TARGETS {
            if *proto == "unix" {
                std::fs::create_dir_all(UNIX_DIR)
                    .with_context(|| format!("creating {UNIX_DIR}"))?;
                let _ = std::fs::remove_file(target);
                unix.push(
                    UnixListener::bind(target)
                        .with_context(|| format!("demo server on {target}"))?,
                );
                // The agent runs as `nobody`: connecting needs write permission on the socket,
                // so that agentwall, not the file mode, decides.
                std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o666))
                    .with_context(|| format!("making {target} reachable for the agent"))?;
                continue;
            }
            if *proto == "packet" || *proto == "tool" || *proto == "dns" {
                continue;
            }
            let mut addr: SocketAddr = target.parse()?;
            if let SocketAddr::V6(v6) = addr {
                if let Some(v4) = v6.ip().to_ipv4_mapped() {
                    addr = SocketAddr::new(v4.into(), v6.port());
                }
            }
            let busy = |e: std::io::Error| {
                anyhow::anyhow!("demo server on {proto} {addr}: {e} (is something else using it?)")
            };
            match *proto {
                "tcp" => {
                    if !tcp
                        .iter()
                        .any(|l: &TcpListener| l.local_addr().ok() == Some(addr))
                    {
                        tcp.push(TcpListener::bind(addr).map_err(busy)?);
                    }
                }
                _ => udp.push(UdpSocket::bind(addr).map_err(busy)?),
            }
        }
        // The kernel completes TCP handshakes into the backlog; nobody needs to accept.
        Ok(Self {
            _tcp: tcp,
            _udp: udp,
            _unix: unix,
        })
    }
}
