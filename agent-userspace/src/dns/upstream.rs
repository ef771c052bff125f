//! The upstream resolver the proxy forwards allowed queries to, and DNS-over-TCP framing.
//!
//! Each exchange uses a fresh random id and, over UDP, a new ephemeral socket connected to the
//! upstream (the kernel then delivers only datagrams from the upstream's address and port); a
//! datagram that is not the answer to what was sent is ignored, not taken.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::Message;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout, timeout_at, Instant};
use tracing::debug;

use super::wire::{self, Query, ReleaseError, ResponseError, MAX_MESSAGE};

/// How long one attempt waits for its answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per exchange (each waits `timeout`).
pub const DEFAULT_ATTEMPTS: u32 = 2;
/// The node's resolver configuration: read, never written.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
const DNS_PORT: u16 = 53;

/// An upstream resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// How long one attempt waits.
    pub timeout: Duration,
    /// Attempts over UDP, and over TCP, before giving up (at least one is made).
    pub attempts: u32,
}

/// Why an exchange with the upstream failed.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error(
        "upstream {addr} did not answer over {transport} ({attempts} attempts of {timeout:?})"
    )]
    Timeout {
        addr: SocketAddr,
        transport: Transport,
        attempts: u32,
        timeout: Duration,
    },
    #[error("upstream {addr} over {transport}: cannot {what}: {source}")]
    Io {
        addr: SocketAddr,
        transport: Transport,
        what: &'static str,
        source: io::Error,
    },
    /// Over UDP: only answers that were not the answer came before the deadline (the last one's
    /// fault is given). Over TCP: the one answer was not the answer.
    #[error("upstream {addr} over {transport} sent no valid answer: {source}")]
    BadResponse {
        addr: SocketAddr,
        transport: Transport,
        source: ResponseError,
    },
    #[error("cannot encode the query for upstream {addr}: {source}")]
    Encode {
        addr: SocketAddr,
        source: ReleaseError,
    },
}

/// The transport of an exchange, for errors and records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        })
    }
}

impl Upstream {
    /// `addr` with the default timeout and attempts.
    pub fn new(addr: SocketAddr) -> Self {
        Upstream {
            addr,
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
        }
    }

    /// Asks the upstream `query`'s question under a fresh id (see [`wire::forward_query`]) and
    /// returns its checked answer and the answer's bytes. Over UDP unless `tcp`; an answer with TC
    /// set over UDP is asked again over TCP.
    pub async fn exchange(
        &self,
        query: &Query,
        tcp: bool,
    ) -> Result<(Message, Vec<u8>), UpstreamError> {
        if !tcp {
            let (message, bytes) = self.exchange_udp(query).await?;
            if !message.truncated() {
                return Ok((message, bytes));
            }
            debug!(upstream = %self.addr, name = %query.name, "truncated over UDP, asking over TCP");
        }
        self.exchange_tcp(query).await
    }

    async fn exchange_udp(&self, query: &Query) -> Result<(Message, Vec<u8>), UpstreamError> {
        let io_error = |what| {
            move |source| UpstreamError::Io {
                addr: self.addr,
                transport: Transport::Udp,
                what,
                source,
            }
        };
        let id = fresh_id().map_err(io_error("draw a random id"))?;
        let (sent, bytes) = self.encode(query, id)?;
        let local: SocketAddr = match self.addr.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local)
            .await
            .map_err(io_error("bind a UDP socket"))?;
        socket
            .connect(self.addr)
            .await
            .map_err(io_error("connect the UDP socket"))?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut rejected = None;
        for _ in 0..self.attempts.max(1) {
            socket.send(&bytes).await.map_err(io_error("send"))?;
            let deadline = Instant::now() + self.timeout;
            while let Ok(received) = timeout_at(deadline, socket.recv(&mut buf)).await {
                let n = received.map_err(io_error("receive"))?;
                match wire::check_response(&sent, &buf[..n]) {
                    Ok(message) => return Ok((message, buf[..n].to_vec())),
                    Err(e) => {
                        debug!(upstream = %self.addr, error = %e, "ignored a UDP datagram");
                        rejected = Some(e);
                    }
                }
            }
        }
        Err(match rejected {
            Some(source) => UpstreamError::BadResponse {
                addr: self.addr,
                transport: Transport::Udp,
                source,
            },
            None => self.timed_out(Transport::Udp),
        })
    }

    async fn exchange_tcp(&self, query: &Query) -> Result<(Message, Vec<u8>), UpstreamError> {
        for _ in 0..self.attempts.max(1) {
            if let Ok(done) = timeout(self.timeout, self.tcp_once(query)).await {
                return done;
            }
        }
        Err(self.timed_out(Transport::Tcp))
    }

    /// One query on one connection.
    async fn tcp_once(&self, query: &Query) -> Result<(Message, Vec<u8>), UpstreamError> {
        let io_error = |what| {
            move |source| UpstreamError::Io {
                addr: self.addr,
                transport: Transport::Tcp,
                what,
                source,
            }
        };
        let id = fresh_id().map_err(io_error("draw a random id"))?;
        let (sent, bytes) = self.encode(query, id)?;
        let mut stream = TcpStream::connect(self.addr)
            .await
            .map_err(io_error("connect"))?;
        stream
            .set_nodelay(true)
            .map_err(io_error("set TCP_NODELAY"))?;
        write_frame(&mut stream, &bytes)
            .await
            .map_err(io_error("send"))?;
        let answer = read_frame(&mut stream)
            .await
            .map_err(io_error("receive"))?
            .ok_or_else(|| io_error("receive")(io::ErrorKind::UnexpectedEof.into()))?;
        let message =
            wire::check_response(&sent, &answer).map_err(|source| UpstreamError::BadResponse {
                addr: self.addr,
                transport: Transport::Tcp,
                source,
            })?;
        Ok((message, answer))
    }

    fn encode(&self, query: &Query, id: u16) -> Result<(Query, Vec<u8>), UpstreamError> {
        let sent = wire::forward_query(query, id);
        let bytes = wire::encode_query(&sent).map_err(|source| UpstreamError::Encode {
            addr: self.addr,
            source,
        })?;
        Ok((sent, bytes))
    }

    fn timed_out(&self, transport: Transport) -> UpstreamError {
        UpstreamError::Timeout {
            addr: self.addr,
            transport,
            attempts: self.attempts.max(1),
            timeout: self.timeout,
        }
    }
}

/// Reads one DNS-over-TCP message (a 2-byte big-endian length, then that many bytes). `None` at a
/// clean end of stream; a zero length or an end of stream inside a frame is an error.
pub async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    let first = r.read(&mut len).await?;
    if first == 0 {
        return Ok(None);
    }
    if first == 1 {
        r.read_exact(&mut len[1..]).await?;
    }
    // A u16 length is never over MAX_MESSAGE.
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a DNS-over-TCP frame of length 0",
        ));
    }
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame).await?;
    Ok(Some(frame))
}

/// Writes one DNS-over-TCP message: its length, then its bytes, in one write.
pub async fn write_frame(w: &mut (impl AsyncWrite + Unpin), message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a DNS message of {} bytes does not fit a TCP frame (1 to {MAX_MESSAGE})",
                    message.len()
                ),
            )
        })?;
    let mut frame = Vec::with_capacity(message.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    w.write_all(&frame).await?;
    w.flush().await
}

/// The node's resolver: the first usable `nameserver` of /etc/resolv.conf, port 53.
pub fn system_resolver() -> Option<SocketAddr> {
    match std::fs::read_to_string(RESOLV_CONF) {
        Ok(text) => first_nameserver(&text),
        Err(e) => {
            debug!(path = RESOLV_CONF, error = %e, "cannot read the resolver configuration");
            None
        }
    }
}

/// The first `nameserver` line's address. Link-local IPv6 addresses with a zone (`%eth0`) are
/// skipped: a socket address needs the interface index, which this does not look up.
fn first_nameserver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|line| {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            return None;
        }
        let ip: IpAddr = words.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, DNS_PORT))
    })
}

/// A random query id from the kernel's CSPRNG: an off-path attacker must not guess it.
fn fresh_id() -> io::Result<u16> {
    let mut id = [0u8; 2];
    // SAFETY: the kernel writes at most `id.len()` bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n == id.len() as isize {
        Ok(u16::from_ne_bytes(id))
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};

    use hickory_proto::op::{MessageType, OpCode, Query as Question};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;

    /// What the test upstream does with a UDP query.
    #[derive(Clone, Copy)]
    enum UdpMode {
        Answer,
        /// First a reply with another id, then the answer.
        WrongIdFirst,
        /// An answer with TC set and no records.
        Truncated,
        Silent,
    }

    /// A UDP and TCP responder on 127.0.0.1 that answers every A question with 127.0.0.7 (over
    /// TCP also 127.0.0.8), and counts what it got.
    struct TestUpstream {
        addr: SocketAddr,
        udp_queries: Arc<Mutex<Vec<u16>>>,
        tcp_queries: Arc<Mutex<Vec<u16>>>,
        tasks: Vec<JoinHandle<()>>,
    }

    impl Drop for TestUpstream {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    fn answer(query: &Message, tcp: bool) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_available(true)
            .add_queries(query.queries().to_vec());
        let name = query.queries()[0].name().clone();
        m.add_answer(Record::from_rdata(
            name.clone(),
            60,
            RData::A(A::new(127, 0, 0, 7)),
        ));
        if tcp {
            m.add_answer(Record::from_rdata(name, 60, RData::A(A::new(127, 0, 0, 8))));
        }
        m.to_vec().unwrap()
    }

    async fn test_upstream(mode: UdpMode) -> TestUpstream {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let udp_queries = Arc::new(Mutex::new(Vec::new()));
        let tcp_queries = Arc::new(Mutex::new(Vec::new()));
        let seen = udp_queries.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
                let query = Message::from_vec(&buf[..n]).unwrap();
                seen.lock().unwrap().push(query.id());
                let reply = answer(&query, false);
                match mode {
                    UdpMode::Silent => continue,
                    UdpMode::Answer => {}
                    UdpMode::WrongIdFirst => {
                        let mut wrong = reply.clone();
                        wire::with_id(&mut wrong, query.id().wrapping_add(1));
                        udp.send_to(&wrong, peer).await.unwrap();
                    }
                    UdpMode::Truncated => {
                        let mut m = Message::from_vec(&reply).unwrap();
                        m.take_answers();
                        m.set_truncated(true);
                        udp.send_to(&m.to_vec().unwrap(), peer).await.unwrap();
                        continue;
                    }
                }
                udp.send_to(&reply, peer).await.unwrap();
            }
        });
        let seen = tcp_queries.clone();
        let tcp_task = tokio::spawn(async move {
            loop {
                let (mut stream, _) = tcp.accept().await.unwrap();
                let Some(bytes) = read_frame(&mut stream).await.unwrap() else {
                    continue;
                };
                let query = Message::from_vec(&bytes).unwrap();
                seen.lock().unwrap().push(query.id());
                write_frame(&mut stream, &answer(&query, true))
                    .await
                    .unwrap();
            }
        });
        TestUpstream {
            addr,
            udp_queries,
            tcp_queries,
            tasks: vec![udp_task, tcp_task],
        }
    }

    fn client_query(id: u16) -> Query {
        let mut m = Message::new();
        m.set_id(id)
            .set_recursion_desired(true)
            .add_query(Question::query(
                Name::from_ascii("api.example.com.").unwrap(),
                RecordType::A,
            ));
        wire::parse_query(&m.to_vec().unwrap()).unwrap()
    }

    fn addresses(m: &Message) -> Vec<IpAddr> {
        m.answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect()
    }

    fn upstream(addr: SocketAddr, timeout: Duration) -> Upstream {
        Upstream {
            addr,
            timeout,
            attempts: 2,
        }
    }

    #[tokio::test]
    async fn a_query_is_answered_over_udp_under_a_fresh_id() {
        let server = test_upstream(UdpMode::Answer).await;
        let q = client_query(0x4242);
        let (message, bytes) = Upstream::new(server.addr)
            .exchange(&q, false)
            .await
            .unwrap();
        assert_eq!(
            addresses(&message),
            [IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7))]
        );
        assert_eq!(Message::from_vec(&bytes).unwrap(), message);
        let seen = server.udp_queries.lock().unwrap().clone();
        assert_eq!(seen, [message.id()]);
        assert!(server.tcp_queries.lock().unwrap().is_empty());
        // The id sent is drawn, not the client's (1 in 65536 that they meet by chance).
        let ids: Vec<u16> = (0..4).map(|_| fresh_id().unwrap()).collect();
        assert!(ids.iter().any(|&id| id != ids[0]), "{ids:?}");
    }

    #[tokio::test]
    async fn a_reply_with_another_id_is_ignored_and_the_answer_taken() {
        let server = test_upstream(UdpMode::WrongIdFirst).await;
        let (message, _) = upstream(server.addr, Duration::from_secs(5))
            .exchange(&client_query(1), false)
            .await
            .unwrap();
        assert_eq!(
            addresses(&message),
            [IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7))]
        );
        // Answered on the first attempt: the wrong reply did not end it.
        assert_eq!(server.udp_queries.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_truncated_udp_answer_is_asked_again_over_tcp() {
        let server = test_upstream(UdpMode::Truncated).await;
        let (message, _) = Upstream::new(server.addr)
            .exchange(&client_query(2), false)
            .await
            .unwrap();
        assert!(!message.truncated());
        assert_eq!(addresses(&message).len(), 2);
        assert_eq!(server.udp_queries.lock().unwrap().len(), 1);
        assert_eq!(server.tcp_queries.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn tcp_goes_straight_to_tcp() {
        let server = test_upstream(UdpMode::Answer).await;
        let (message, _) = Upstream::new(server.addr)
            .exchange(&client_query(3), true)
            .await
            .unwrap();
        assert_eq!(addresses(&message).len(), 2);
        assert!(server.udp_queries.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_silent_upstream_times_out_after_every_attempt() {
        let server = test_upstream(UdpMode::Silent).await;
        let up = upstream(server.addr, Duration::from_millis(100));
        let e = up.exchange(&client_query(4), false).await.unwrap_err();
        assert!(
            matches!(
                e,
                UpstreamError::Timeout {
                    attempts: 2,
                    transport: Transport::Udp,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("did not answer over UDP"), "{e}");
        assert_eq!(server.udp_queries.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn only_wrong_replies_are_a_bad_response() {
        // A responder that answers with the wrong id only.
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = udp.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
                let query = Message::from_vec(&buf[..n]).unwrap();
                let mut reply = answer(&query, false);
                wire::with_id(&mut reply, query.id() ^ 1);
                udp.send_to(&reply, peer).await.unwrap();
            }
        });
        let e = upstream(addr, Duration::from_millis(100))
            .exchange(&client_query(5), false)
            .await
            .unwrap_err();
        task.abort();
        assert!(
            matches!(
                e,
                UpstreamError::BadResponse {
                    source: ResponseError::Id { .. },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_closed_port_fails_at_once_not_at_the_deadline() {
        let closed = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let started = std::time::Instant::now();
        let e = upstream(addr, Duration::from_secs(30))
            .exchange(&client_query(6), false)
            .await
            .unwrap_err();
        let UpstreamError::Io { source, .. } = &e else {
            panic!("{e}");
        };
        assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        assert!(started.elapsed() < Duration::from_secs(30));
        let e = upstream(addr, Duration::from_secs(30))
            .exchange(&client_query(6), true)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("over TCP: cannot connect"), "{e}");
    }

    #[tokio::test]
    async fn frames_are_length_prefixed_and_bounded() {
        let (mut a, mut b) = tokio::io::duplex(1 << 17);
        write_frame(&mut a, b"abc").await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap().unwrap(), b"abc");
        assert!(write_frame(&mut a, &[]).await.is_err());
        assert!(write_frame(&mut a, &vec![0; MAX_MESSAGE + 1])
            .await
            .is_err());
        write_frame(&mut a, &vec![7; MAX_MESSAGE]).await.unwrap();
        assert_eq!(
            read_frame(&mut b).await.unwrap().unwrap().len(),
            MAX_MESSAGE
        );

        // A zero length is an error; an end inside a frame too; a clean end is None.
        a.write_all(&[0, 0]).await.unwrap();
        assert_eq!(
            read_frame(&mut b).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        a.write_all(&[0, 5, 1, 2]).await.unwrap();
        drop(a);
        assert_eq!(
            read_frame(&mut b).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(read_frame(&mut b).await.unwrap().is_none());
        let mut one_byte: &[u8] = &[0];
        assert_eq!(
            read_frame(&mut one_byte).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn the_first_usable_nameserver_is_the_resolver() {
        let conf = "\
# generated
search example.com
nameserver fe80::1%eth0
nameserver   10.0.0.2   # the office
nameserver 10.0.0.3
";
        assert_eq!(first_nameserver(conf), Some("10.0.0.2:53".parse().unwrap()));
        assert_eq!(
            first_nameserver("; x\nnameserver ::1\n"),
            Some("[::1]:53".parse().unwrap())
        );
        assert_eq!(first_nameserver("search x\n#nameserver 1.1.1.1\n"), None);
        assert_eq!(first_nameserver("nameservers 1.1.1.1\n"), None);
    }
}
