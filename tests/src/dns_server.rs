//! A real DNS server on loopback, the upstream of the DNS tests: hickory-server's ServerFuture
//! (UDP and TCP on one free port of 127.0.0.1) on a runtime of its own thread, answering from
//! an in-memory zone given as a list of A, AAAA and CNAME records (`*.name` for wildcards).
//!
//! The answers are built here rather than by hickory's InMemoryAuthority: that one puts a
//! CNAME's target records in the additional section, where recursive resolvers (what a proxy
//! forwards to) put the whole chain in the answer section (RFC 1034 4.3.2). It counts the
//! queries it receives per name, so a test proves a refused name never reached upstream. It
//! stops when dropped.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use hickory_proto::{
    op::{Edns, Header, MessageType, OpCode, ResponseCode},
    rr::{
        rdata::{A, AAAA, CNAME},
        Name, RData, Record, RecordType,
    },
};
use hickory_server::{
    authority::MessageResponseBuilder,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    ServerFuture,
};
use tokio::sync::oneshot;

/// One record of the zone. `name` may start with `*.` (a wildcard: any name below the rest
/// that has no records of its own).
#[derive(Debug, Clone)]
pub struct Rec {
    pub name: String,
    pub ttl: u32,
    pub data: RecData,
}

#[derive(Debug, Clone)]
pub enum RecData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
}

impl Rec {
    pub fn a(name: &str, ip: &str, ttl: u32) -> Rec {
        Rec {
            name: name.into(),
            ttl,
            data: RecData::A(ip.parse().expect("an IPv4 address")),
        }
    }

    pub fn aaaa(name: &str, ip: &str, ttl: u32) -> Rec {
        Rec {
            name: name.into(),
            ttl,
            data: RecData::Aaaa(ip.parse().expect("an IPv6 address")),
        }
    }

    pub fn cname(name: &str, target: &str, ttl: u32) -> Rec {
        Rec {
            name: name.into(),
            ttl,
            data: RecData::Cname(target.into()),
        }
    }
}

/// A name as the zone and the counter key it: lower case, no trailing dot.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Result<Name> {
    let mut n = Name::from_ascii(name).with_context(|| format!("DNS name {name:?}"))?;
    n.set_fqdn(true);
    Ok(n)
}

/// The zone: records by owner name (wildcards under their `*.` name).
struct Zone(HashMap<String, Vec<Record>>);

/// CNAME chains longer than this are answered as they stand (a loop in the zone).
const MAX_CHAIN: usize = 8;

impl Zone {
    fn new(recs: &[Rec]) -> Result<Zone> {
        let mut map: HashMap<String, Vec<Record>> = HashMap::new();
        for r in recs {
            let owner = fqdn(&r.name)?;
            let data = match &r.data {
                RecData::A(ip) => RData::A(A(*ip)),
                RecData::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
                RecData::Cname(t) => RData::CNAME(CNAME(fqdn(t)?)),
            };
            map.entry(key(&r.name))
                .or_default()
                .push(Record::from_rdata(owner, r.ttl, data));
        }
        Ok(Zone(map))
    }

    /// The records at `name`: its own, else those of the closest wildcard above it, owned by
    /// `name` (RFC 4592 synthesis).
    fn node(&self, name: &Name) -> Option<Vec<Record>> {
        let k = key(&name.to_ascii());
        if let Some(rs) = self.0.get(&k) {
            return Some(rs.clone());
        }
        let mut rest = k.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(rs) = self.0.get(&format!("*.{parent}")) {
                return Some(
                    rs.iter()
                        .map(|r| {
                            let mut r = r.clone();
                            r.set_name(name.clone());
                            r
                        })
                        .collect(),
                );
            }
            rest = parent;
        }
        None
    }

    /// The answer section for `name`/`qtype` with CNAME chains followed, and the rcode: that
    /// of the last name of the chain (NXDOMAIN when it has no records at all).
    fn answer(&self, name: &Name, qtype: RecordType) -> (Vec<Record>, ResponseCode) {
        let mut answers = Vec::new();
        let mut at = name.clone();
        for _ in 0..MAX_CHAIN {
            let Some(rs) = self.node(&at) else {
                return (answers, ResponseCode::NXDomain);
            };
            let cname = rs.iter().find_map(|r| match r.data() {
                RData::CNAME(c) if qtype != RecordType::CNAME => Some((r.clone(), c.0.clone())),
                _ => None,
            });
            match cname {
                Some((r, target)) => {
                    answers.push(r);
                    at = target;
                }
                None => {
                    answers.extend(rs.into_iter().filter(|r| r.record_type() == qtype));
                    return (answers, ResponseCode::NoError);
                }
            }
        }
        (answers, ResponseCode::NoError)
    }
}

type Counts = Arc<Mutex<HashMap<String, u64>>>;

struct Handler {
    zone: Zone,
    counts: Counts,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        {
            let mut counts = self.counts.lock().expect("counts");
            for q in request.queries() {
                *counts.entry(key(&q.name().to_string())).or_default() += 1;
            }
        }
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        let sent = if request.message_type() != MessageType::Query
            || request.op_code() != OpCode::Query
            || request.queries().len() != 1
        {
            response
                .send_response(builder.error_msg(request.header(), ResponseCode::FormErr))
                .await
        } else {
            let q = &request.queries()[0];
            let name: Name = q.name().into();
            let (answers, rcode) = self.zone.answer(&name, q.query_type());
            header.set_authoritative(true);
            header.set_recursion_available(true);
            header.set_response_code(rcode);
            let mut builder = builder;
            if let Some(e) = request.edns() {
                let mut edns = Edns::new();
                edns.set_max_payload(e.max_payload().clamp(512, 1232));
                builder.edns(edns);
            }
            response
                .send_response(builder.build(
                    header,
                    answers.iter(),
                    std::iter::empty(),
                    std::iter::empty(),
                    std::iter::empty(),
                ))
                .await
        };
        sent.unwrap_or_else(|_| {
            header.set_response_code(ResponseCode::ServFail);
            header.into()
        })
    }
}

/// The running server. Dropping it stops it (its sockets close).
pub struct DnsServer {
    addr: SocketAddr,
    counts: Counts,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// How long the server waits for a TCP client's next query before closing the connection.
const TCP_IDLE: Duration = Duration::from_secs(5);

impl DnsServer {
    /// Serves `records` on UDP and TCP at one free port of 127.0.0.1.
    pub fn start(records: &[Rec]) -> Result<DnsServer> {
        let zone = Zone::new(records)?;
        let (udp, tcp) = bind_pair()?;
        let addr = udp.local_addr()?;
        let counts = Counts::default();
        let handler = Handler {
            zone,
            counts: counts.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("dns-upstream".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut server = ServerFuture::new(handler);
                    let registered = server
                        .register_socket_std(udp)
                        .and_then(|()| server.register_listener_std(tcp, TCP_IDLE));
                    let failed = registered.is_err();
                    let _ = ready_tx.send(registered.context("registering the DNS sockets"));
                    if !failed {
                        let _ = stopped.await;
                    }
                    server.shutdown_token().cancel();
                });
                // Ends what is still running (open TCP connections) and closes the sockets.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .context("spawning the DNS server thread")?;
        let mut server = DnsServer {
            addr,
            counts,
            stop: Some(stop),
            thread: Some(thread),
        };
        match ready.recv() {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                server.thread.take().map(JoinHandle::join);
                bail!("the DNS server thread ended before serving")
            }
        }
    }

    /// Where it serves, UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queries received for `name` (any type, any case, trailing dot or not).
    pub fn queries(&self, name: &str) -> u64 {
        let counts = self.counts.lock().expect("counts");
        counts.get(&key(name)).copied().unwrap_or(0)
    }

    /// Queries received in all.
    pub fn total(&self) -> u64 {
        self.counts.lock().expect("counts").values().sum()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP socket and a TCP listener on the same free port of 127.0.0.1 (a few tries: the port
/// the UDP bind got may be taken for TCP).
fn bind_pair() -> Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind("127.0.0.1:0").context("binding the DNS server's UDP")?;
        match TcpListener::bind(udp.local_addr()?) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried")).context("binding the DNS server's TCP on its UDP port")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        Zone::new(&[
            Rec::a("a.test", "127.0.20.1", 60),
            Rec::cname("alias.test", "a.test", 30),
            Rec::a("*.wild.test", "127.0.21.1", 5),
            Rec::aaaa("six.test", "::1", 60),
        ])
        .expect("zone")
    }

    #[test]
    fn cname_chains_are_in_the_answer_section() {
        let (ans, rc) = zone().answer(&fqdn("ALIAS.test").unwrap(), RecordType::A);
        assert_eq!(rc, ResponseCode::NoError);
        assert_eq!(ans.len(), 2);
        assert_eq!(ans[0].record_type(), RecordType::CNAME);
        assert_eq!(ans[1].data(), &RData::A(A("127.0.20.1".parse().unwrap())));
        assert_eq!(ans[1].ttl(), 60);
    }

    #[test]
    fn wildcards_match_any_depth_below_and_own_the_query_name() {
        let z = zone();
        for n in ["x.wild.test", "y.x.wild.test"] {
            let (ans, rc) = z.answer(&fqdn(n).unwrap(), RecordType::A);
            assert_eq!((rc, ans.len()), (ResponseCode::NoError, 1), "{n}");
            assert_eq!(key(&ans[0].name().to_ascii()), n);
        }
        let (ans, rc) = z.answer(&fqdn("wild.test").unwrap(), RecordType::A);
        assert_eq!((rc, ans.len()), (ResponseCode::NXDomain, 0));
    }

    #[test]
    fn other_types_are_nodata_and_unknown_names_nxdomain() {
        let z = zone();
        let (ans, rc) = z.answer(&fqdn("six.test").unwrap(), RecordType::A);
        assert_eq!((rc, ans.len()), (ResponseCode::NoError, 0));
        let (_, rc) = z.answer(&fqdn("nope.test").unwrap(), RecordType::A);
        assert_eq!(rc, ResponseCode::NXDomain);
    }
}
