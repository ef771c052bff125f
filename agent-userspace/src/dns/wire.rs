//! DNS messages as the proxy sees them: the agent's query, the answers it may get, the upstream's
//! response checked against what was sent, and that response cut down to what the kernel was told.
//!
//! Pure (no I/O). Every byte goes through hickory-proto's `Message`; nothing here parses the wire
//! format by hand. Bad input is an error, never a panic (`fuzz_entry` drives all of it).

use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{CNAME, HTTPS, SVCB};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use thiserror::Error;

/// The largest UDP payload the proxy accepts or sends, and advertises in its EDNS OPT.
pub const MAX_UDP_PAYLOAD: usize = 4096;
/// The largest DNS message (a TCP frame's 16-bit length).
pub const MAX_MESSAGE: usize = 65535;
/// CNAME steps followed from the question name.
pub const MAX_CHAIN: usize = 16;
/// A client without EDNS takes UDP answers up to this size (RFC 1035).
const CLASSIC_UDP: usize = 512;
const HEADER_LEN: usize = 12;
/// The smallest question (root name, type, class) and resource record (root name, type, class,
/// TTL, rdlength): a header whose counts need more bytes than the message has is refused before
/// the decoder allocates for them.
const MIN_QUESTION: usize = 5;
const MIN_RECORD: usize = 11;

/// An agent's query, checked: one question of class IN, its name printable.
#[derive(Debug, Clone)]
pub struct Query {
    /// The id the client sent (its answer must carry it).
    pub id: u16,
    /// The question name in lowercase, without the trailing dot; "" for the root.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The decoded message, as the client sent it.
    pub message: Message,
}

impl Query {
    /// The question's record type.
    pub fn record_type(&self) -> RecordType {
        RecordType::from(self.qtype)
    }

    /// The question as the client wrote it (case kept).
    fn question(&self) -> Option<&hickory_proto::op::Query> {
        self.message.queries().first()
    }

    fn qname(&self) -> Option<&Name> {
        self.question().map(|q| q.name())
    }
}

/// Why a client's message is not a query the proxy answers.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BadQuery {
    #[error("{0} bytes, shorter than a DNS header")]
    Short(usize),
    #[error("{0} bytes, larger than a DNS message ({MAX_MESSAGE})")]
    Oversized(usize),
    #[error("a response (QR=1), not a query")]
    NotQuery,
    #[error("opcode {0} is not QUERY")]
    OpCode(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0} questions, expected exactly one")]
    QuestionCount(usize),
    #[error("class {0} is not IN")]
    Class(u16),
    #[error("query type {0} is not served by the proxy")]
    Type(u16),
    #[error("EDNS version {0} is not supported")]
    EdnsVersion(u8),
    #[error("name {0:?} has a byte outside letters, digits, '-' and '_'")]
    Name(String),
}

/// A refused client message, with the reply to send when there is one.
#[derive(Debug, Clone, Error)]
#[error("{kind}")]
pub struct QueryError {
    pub kind: BadQuery,
    /// FORMERR, NOTIMP, REFUSED or BADVERS for the client; `None` when the message is not to be
    /// answered (no readable header, or itself a response: answering those invites loops).
    pub reply: Option<Vec<u8>>,
}

/// Why an upstream response is not the answer to what was sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResponseError {
    #[error("{0} bytes, shorter than a DNS header")]
    Short(usize),
    #[error("{0} bytes, larger than a DNS message ({MAX_MESSAGE})")]
    Oversized(usize),
    #[error("a query (QR=0), not a response")]
    NotResponse,
    #[error("id {got} does not match the id sent ({sent})")]
    Id { sent: u16, got: u16 },
    #[error("opcode {0} is not QUERY")]
    OpCode(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("the question does not match the one sent: {0}")]
    Question(String),
}

/// Why a response could not be encoded for the client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReleaseError {
    #[error("cannot encode the answer: {0}")]
    Encode(String),
    #[error("the answer is {0} bytes, larger than a DNS message ({MAX_MESSAGE})")]
    Oversized(usize),
}

/// An address of the answer, with the TTL it may be trusted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub addr: IpAddr,
    /// The smallest TTL along the CNAME chain that led to it, its own included.
    pub ttl: u32,
}

/// Reads an agent's query. Every error that has a readable header (and is not a response)
/// carries the reply for the client.
pub fn parse_query(bytes: &[u8]) -> Result<Query, QueryError> {
    let header = match read_header(bytes) {
        Some(h) => h,
        None => return Err(no_reply(BadQuery::Short(bytes.len()))),
    };
    if header.message_type() == MessageType::Response {
        return Err(no_reply(BadQuery::NotQuery));
    }
    let fail = |kind: BadQuery, rcode: ResponseCode| QueryError {
        kind,
        reply: Some(error_reply(&header, None, None, rcode)),
    };
    if bytes.len() > MAX_MESSAGE {
        return Err(fail(
            BadQuery::Oversized(bytes.len()),
            ResponseCode::FormErr,
        ));
    }
    if header.op_code() != OpCode::Query {
        return Err(fail(
            BadQuery::OpCode(u8::from(header.op_code())),
            ResponseCode::NotImp,
        ));
    }
    let message =
        decode(bytes, &header).map_err(|e| fail(BadQuery::Malformed(e), ResponseCode::FormErr))?;
    let edns = message.extensions().as_ref();
    let questions = message.queries();
    let question = (questions.len() == 1).then(|| &questions[0]);
    let fail = |kind: BadQuery, rcode: ResponseCode| QueryError {
        kind,
        reply: Some(error_reply(&header, question, edns, rcode)),
    };
    if let Some(version) = edns.map(Edns::version).filter(|&v| v != 0) {
        return Err(fail(BadQuery::EdnsVersion(version), ResponseCode::BADVERS));
    }
    let Some(question) = question else {
        return Err(fail(
            BadQuery::QuestionCount(questions.len()),
            ResponseCode::FormErr,
        ));
    };
    let qclass = u16::from(question.query_class());
    if question.query_class() != DNSClass::IN {
        return Err(fail(BadQuery::Class(qclass), ResponseCode::NotImp));
    }
    let qtype = question.query_type();
    // Zone transfers are streams of messages, and OPT is no question.
    if matches!(qtype, RecordType::AXFR | RecordType::IXFR | RecordType::OPT) {
        return Err(fail(BadQuery::Type(u16::from(qtype)), ResponseCode::NotImp));
    }
    let name = printable_name(question.name())
        .map_err(|shown| fail(BadQuery::Name(shown), ResponseCode::Refused))?;
    Ok(Query {
        id: header.id(),
        name,
        qtype: u16::from(qtype),
        qclass,
        message,
    })
}

/// A reply to `query` with `rcode` and no records: the question echoed, RD copied, RA set, and
/// an EDNS OPT when the query had one.
pub fn reply_code(query: &Query, rcode: ResponseCode) -> Vec<u8> {
    let header = query.message.header();
    error_reply(
        header,
        query.question(),
        query.message.extensions().as_ref(),
        rcode,
    )
}

/// The largest UDP answer the client takes: 512 without EDNS, else its EDNS payload size, at
/// most `MAX_UDP_PAYLOAD`.
pub fn udp_limit(query: &Query) -> usize {
    match query.message.extensions() {
        None => CLASSIC_UDP,
        Some(edns) => usize::from(edns.max_payload()).clamp(CLASSIC_UDP, MAX_UDP_PAYLOAD),
    }
}

/// `query` as the proxy sends it upstream, under `id`: the same question (case kept) and RD, CD
/// and AD bits; an EDNS OPT of the proxy's own (its payload size, the client's DO bit, none of the
/// client's options), so that large answers come over UDP when they can.
pub fn forward_query(query: &Query, id: u16) -> Query {
    let client = query.message.header();
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(client.recursion_desired())
        .set_checking_disabled(client.checking_disabled())
        .set_authentic_data(client.authentic_data())
        .add_queries(query.question().cloned());
    let dnssec_ok = query
        .message
        .extensions()
        .as_ref()
        .is_some_and(|e| e.flags().dnssec_ok);
    message.set_edns(own_edns(dnssec_ok));
    Query {
        id,
        name: query.name.clone(),
        qtype: query.qtype,
        qclass: query.qclass,
        message,
    }
}

/// The query's message in wire format.
pub fn encode_query(query: &Query) -> Result<Vec<u8>, ReleaseError> {
    encode(&query.message)
}

/// Sets the id of an encoded message (the first two bytes); shorter input is left as it is.
pub fn with_id(bytes: &mut [u8], id: u16) {
    if let Some(head) = bytes.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
}

/// Decodes an upstream response and checks it answers `sent` (the query as sent upstream, with
/// its id): QR=1, opcode QUERY, the same id and the same single question (name without regard to
/// case, type, class).
pub fn check_response(sent: &Query, response_bytes: &[u8]) -> Result<Message, ResponseError> {
    let Some(header) = read_header(response_bytes) else {
        return Err(ResponseError::Short(response_bytes.len()));
    };
    if response_bytes.len() > MAX_MESSAGE {
        return Err(ResponseError::Oversized(response_bytes.len()));
    }
    if header.message_type() != MessageType::Response {
        return Err(ResponseError::NotResponse);
    }
    if header.id() != sent.id {
        return Err(ResponseError::Id {
            sent: sent.id,
            got: header.id(),
        });
    }
    if header.op_code() != OpCode::Query {
        return Err(ResponseError::OpCode(u8::from(header.op_code())));
    }
    let message = decode(response_bytes, &header).map_err(ResponseError::Malformed)?;
    let Some(asked) = sent.question() else {
        return Err(ResponseError::Question("no question was sent".into()));
    };
    match message.queries() {
        [q] if q.name().eq_ignore_root(asked.name())
            && q.query_type() == asked.query_type()
            && q.query_class() == asked.query_class() =>
        {
            Ok(message)
        }
        [q] => Err(ResponseError::Question(format!(
            "{} {} {} for {} {} {}",
            shown_name(q.name()),
            q.query_class(),
            q.query_type(),
            shown_name(asked.name()),
            asked.query_class(),
            asked.query_type()
        ))),
        qs => Err(ResponseError::Question(format!(
            "{} questions, expected one",
            qs.len()
        ))),
    }
}

/// The addresses that answer the question: the A and AAAA records of the answer section owned by
/// the question name or by a name its CNAME chain leads to, each once, with the smallest TTL on
/// the way. Records of other names are ignored.
pub fn answer_addresses(query: &Query, response: &Message) -> Vec<Resolved> {
    let Some(qname) = query.qname() else {
        return Vec::new();
    };
    let chain = Chain::follow(qname, response.answers());
    let mut out: Vec<Resolved> = Vec::new();
    for record in response.answers() {
        let Some(addr) = address(record) else {
            continue;
        };
        let Some(reach) = chain.ttl_at(record.name()) else {
            continue;
        };
        let ttl = reach.min(record.ttl());
        match out.iter_mut().find(|r| r.addr == addr) {
            Some(seen) => seen.ttl = seen.ttl.min(ttl),
            None => out.push(Resolved { addr, ttl }),
        }
    }
    out
}

/// The upstream `response` as it goes back to the client of `query`: the client's id and
/// question; in the answer section the CNAMEs of the chain, the A and AAAA records whose address
/// is in `keep`, and the chain names' other records; no A or AAAA record in the authority or
/// additional sections, and no address hints in HTTPS/SVCB records (an address the kernel was not
/// told about never reaches the client). Rcode and flags are kept; the EDNS OPT is the proxy's own
/// when the client sent one. With `udp_limit` (see [`udp_limit`]) an answer that does not fit
/// goes out empty with TC set, so the client asks again over TCP.
pub fn release(
    query: &Query,
    response: &Message,
    keep: &[IpAddr],
    udp_limit: Option<usize>,
) -> Result<Vec<u8>, ReleaseError> {
    let chain = query
        .qname()
        .map(|q| Chain::follow(q, response.answers()))
        .unwrap_or_default();
    let answers = response
        .answers()
        .iter()
        .enumerate()
        .filter(|(i, r)| match r.record_type() {
            // Of any class: only an IN address the kernel was told about goes out.
            RecordType::A | RecordType::AAAA => {
                chain.ttl_at(r.name()).is_some() && address(r).is_some_and(|a| keep.contains(&a))
            }
            RecordType::CNAME => chain.links.contains(i),
            _ => chain.ttl_at(r.name()).is_some(),
        })
        .map(|(_, r)| without_hints(r));
    let others = |records: &[Record]| -> Vec<Record> {
        records
            .iter()
            .filter(|r| !matches!(r.record_type(), RecordType::A | RecordType::AAAA))
            .map(without_hints)
            .collect()
    };

    let client_edns = query.message.extensions().as_ref();
    let mut header = *response.header();
    header
        .set_id(query.id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query);
    // An extended rcode needs an OPT to travel in.
    if client_edns.is_none() && header.response_code().high() > 0 {
        header.set_response_code(ResponseCode::ServFail);
    }
    let mut message = Message::new();
    message
        .set_header(header)
        .add_queries(query.question().cloned())
        .add_answers(answers)
        .add_name_servers(others(response.name_servers()))
        .add_additionals(others(response.additionals()));
    if client_edns.is_some() {
        let dnssec_ok = response
            .extensions()
            .as_ref()
            .is_some_and(|e| e.flags().dnssec_ok);
        message.set_edns(own_edns(dnssec_ok));
    }
    let bytes = encode(&message)?;
    match udp_limit {
        Some(limit) if bytes.len() > limit => encode(&message.truncate()),
        _ => Ok(bytes),
    }
}

/// Drives every function of this module with arbitrary bytes, checking what must hold for any
/// input; used by the `dns_input` fuzz target. Panics only when such a property is broken.
pub fn fuzz_entry(data: &[u8]) {
    match parse_query(data) {
        Ok(query) => {
            for rcode in [
                ResponseCode::Refused,
                ResponseCode::NXDomain,
                ResponseCode::ServFail,
            ] {
                let reply = Message::from_vec(&reply_code(&query, rcode)).expect("a reply decodes");
                assert_eq!(reply.id(), query.id);
                assert_eq!(reply.response_code(), rcode);
                assert_eq!(reply.queries().len(), 1);
            }
            let forwarded = forward_query(&query, query.id ^ 0x5a5a);
            let bytes = encode_query(&forwarded).expect("a forwarded query encodes");
            let again = parse_query(&bytes).expect("a forwarded query parses");
            assert_eq!(
                (again.name.as_str(), again.qtype, again.qclass),
                (query.name.as_str(), query.qtype, query.qclass)
            );
        }
        Err(e) => {
            if let Some(reply) = &e.reply {
                let reply = Message::from_vec(reply).expect("an error reply decodes");
                assert_eq!(reply.message_type(), MessageType::Response);
                assert_eq!(Some(reply.id()), read_header(data).map(|h| h.id()));
            }
        }
    }

    let (first, second) = data.split_at(data.len() / 2);
    let Ok(query) = parse_query(first) else {
        return;
    };
    // Any decodable message is a possible upstream response: answer_addresses and release must
    // hold for those check_response lets through and for the rest.
    let checked = check_response(&query, second).ok();
    let response = checked.or_else(|| Message::from_vec(second).ok());
    let Some(response) = response else {
        return;
    };
    let found = answer_addresses(&query, &response);
    let keep: Vec<IpAddr> = found.iter().step_by(2).map(|r| r.addr).collect();
    for limit in [None, Some(udp_limit(&query))] {
        let Ok(bytes) = release(&query, &response, &keep, limit) else {
            continue;
        };
        let out = Message::from_vec(&bytes).expect("a released answer decodes");
        assert_eq!(out.id(), query.id);
        if let Some(limit) = limit {
            assert!(bytes.len() <= limit, "{} bytes over {limit}", bytes.len());
        }
        for record in out.all_sections() {
            if matches!(record.record_type(), RecordType::A | RecordType::AAAA) {
                let addr = address(record);
                assert!(
                    addr.is_some_and(|a| keep.contains(&a)),
                    "{record} released but not kept"
                );
            }
            if let RData::HTTPS(HTTPS(svcb)) | RData::SVCB(svcb) = record.data() {
                assert!(hints(svcb) == 0, "address hints released");
            }
        }
    }
}

/// The names of the CNAME chain from the question name, each with the smallest TTL on the way
/// to it, and which answer records are its links.
#[derive(Default)]
struct Chain {
    names: Vec<(Name, u32)>,
    links: Vec<usize>,
}

impl Chain {
    fn follow(qname: &Name, answers: &[Record]) -> Self {
        let mut chain = Chain {
            names: vec![(qname.clone(), u32::MAX)],
            links: Vec::new(),
        };
        while chain.links.len() < MAX_CHAIN {
            let (current, reach) = chain.names[chain.names.len() - 1].clone();
            let next = answers
                .iter()
                .enumerate()
                .find_map(|(i, r)| match r.data() {
                    RData::CNAME(CNAME(target))
                        if r.dns_class() == DNSClass::IN && r.name().eq_ignore_root(&current) =>
                    {
                        Some((i, target, r.ttl()))
                    }
                    _ => None,
                });
            let Some((i, target, ttl)) = next else {
                break;
            };
            if chain.ttl_at(target).is_some() {
                break; // a loop
            }
            chain.links.push(i);
            chain.names.push((target.clone(), reach.min(ttl)));
        }
        chain
    }

    fn ttl_at(&self, name: &Name) -> Option<u32> {
        self.names
            .iter()
            .find(|(n, _)| n.eq_ignore_root(name))
            .map(|(_, ttl)| *ttl)
    }
}

/// The address of an A or AAAA record of class IN.
fn address(record: &Record) -> Option<IpAddr> {
    if record.dns_class() != DNSClass::IN {
        return None;
    }
    match record.data() {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

/// The record, with the ipv4hint and ipv6hint parameters of an HTTPS or SVCB record left out.
fn without_hints(record: &Record) -> Record {
    let strip = |svcb: &SVCB| {
        SVCB::new(
            svcb.svc_priority(),
            svcb.target_name().clone(),
            svcb.svc_params()
                .iter()
                .filter(|(key, _)| !is_hint(key))
                .cloned()
                .collect(),
        )
    };
    let mut out = record.clone();
    match record.data() {
        RData::HTTPS(HTTPS(svcb)) if hints(svcb) > 0 => {
            out.set_data(RData::HTTPS(HTTPS(strip(svcb))));
        }
        RData::SVCB(svcb) if hints(svcb) > 0 => {
            out.set_data(RData::SVCB(strip(svcb)));
        }
        _ => {}
    }
    out
}

fn is_hint(key: &hickory_proto::rr::rdata::svcb::SvcParamKey) -> bool {
    use hickory_proto::rr::rdata::svcb::SvcParamKey;
    matches!(key, SvcParamKey::Ipv4Hint | SvcParamKey::Ipv6Hint)
}

fn hints(svcb: &SVCB) -> usize {
    svcb.svc_params()
        .iter()
        .filter(|(key, _)| is_hint(key))
        .count()
}

/// The 12-byte header, or `None` when there are not that many bytes.
fn read_header(bytes: &[u8]) -> Option<Header> {
    let head = bytes.get(..HEADER_LEN)?;
    Header::read(&mut BinDecoder::new(head)).ok()
}

/// Decodes a whole message after a plausibility check of the header's counts.
fn decode(bytes: &[u8], header: &Header) -> Result<Message, String> {
    let records = usize::from(header.answer_count())
        + usize::from(header.name_server_count())
        + usize::from(header.additional_count());
    let least = usize::from(header.query_count()) * MIN_QUESTION + records * MIN_RECORD;
    if least > bytes.len() - HEADER_LEN {
        return Err(format!(
            "the header counts {} questions and {records} records, more than {} bytes hold",
            header.query_count(),
            bytes.len()
        ));
    }
    Message::from_vec(bytes).map_err(|e| e.to_string())
}

fn encode(message: &Message) -> Result<Vec<u8>, ReleaseError> {
    let bytes = message
        .to_vec()
        .map_err(|e| ReleaseError::Encode(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE {
        return Err(ReleaseError::Oversized(bytes.len()));
    }
    Ok(bytes)
}

fn no_reply(kind: BadQuery) -> QueryError {
    QueryError { kind, reply: None }
}

/// A response without records to a query of `header`.
fn error_reply(
    header: &Header,
    question: Option<&hickory_proto::op::Query>,
    edns: Option<&Edns>,
    rcode: ResponseCode,
) -> Vec<u8> {
    let mut message = Message::error_msg(header.id(), header.op_code(), rcode);
    message
        .set_recursion_desired(header.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(header.checking_disabled())
        .add_queries(question.cloned());
    // BADVERS is an extended rcode: it needs the OPT even when the client's was unreadable.
    if edns.is_some() || rcode.high() > 0 {
        message.set_edns(own_edns(edns.is_some_and(|e| e.flags().dnssec_ok)));
    }
    message.to_vec().unwrap_or_else(|_| {
        // Only a question can make encoding fail; answer without it.
        let mut bare = Message::error_msg(header.id(), header.op_code(), rcode);
        bare.set_recursion_desired(header.recursion_desired());
        bare.to_vec().unwrap_or_default()
    })
}

/// The OPT record the proxy sends: its payload size, version 0, no options.
fn own_edns(dnssec_ok: bool) -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(MAX_UDP_PAYLOAD as u16)
        .set_version(0)
        .set_dnssec_ok(dnssec_ok);
    edns
}

/// The name in lowercase without the trailing dot, or (as the error) the name with its bytes
/// escaped when a label holds anything but letters, digits, '-' and '_': a label with a dot or a
/// binary byte would read as another name than the one the upstream resolves.
fn printable_name(name: &Name) -> Result<String, String> {
    let mut out = String::with_capacity(name.len());
    let mut ok = true;
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                out.push(char::from(b.to_ascii_lowercase()));
            } else {
                ok = false;
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    if ok {
        Ok(out)
    } else {
        Err(out)
    }
}

/// A name for messages: printable bytes as they are, others escaped.
fn shown_name(name: &Name) -> String {
    printable_name(name).unwrap_or_else(|escaped| escaped)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::op::Query as Question;
    use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamKey, SvcParamValue};
    use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};

    use super::*;

    const ID: u16 = 0x1234;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn query_message(qname: &str, rtype: RecordType, edns: bool) -> Message {
        let mut m = Message::new();
        m.set_id(ID)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Question::query(name(qname), rtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m
    }

    fn query(qname: &str, rtype: RecordType, edns: bool) -> Query {
        parse_query(&query_message(qname, rtype, edns).to_vec().unwrap()).unwrap()
    }

    fn response_to(q: &Query) -> Message {
        let mut m = Message::new();
        m.set_id(q.id)
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .set_recursion_available(true)
            .add_queries(q.message.queries().to_vec());
        m
    }

    fn a(owner: &str, ttl: u32, addr: [u8; 4]) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A::from(Ipv4Addr::from(addr))))
    }

    fn aaaa(owner: &str, ttl: u32, addr: Ipv6Addr) -> Record {
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA::from(addr)))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn soa(owner: &str) -> Record {
        let soa = SOA::new(
            name("ns.example.com."),
            name("h.example.com."),
            1,
            2,
            3,
            4,
            60,
        );
        Record::from_rdata(name(owner), 60, RData::SOA(soa))
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    /// The error and reply of `parse_query`, the reply decoded.
    fn refused(bytes: &[u8]) -> (BadQuery, Option<Message>) {
        let e = parse_query(bytes).unwrap_err();
        let reply = e.reply.map(|r| Message::from_vec(&r).unwrap());
        (e.kind, reply)
    }

    fn addrs(found: &[Resolved]) -> Vec<(IpAddr, u32)> {
        found.iter().map(|r| (r.addr, r.ttl)).collect()
    }

    #[test]
    fn a_query_is_read_with_its_name_lowercased() {
        let q = query("WWW.Example.COM.", RecordType::AAAA, false);
        assert_eq!(q.id, ID);
        assert_eq!(q.name, "www.example.com");
        assert_eq!(q.record_type(), RecordType::AAAA);
        assert_eq!(q.qclass, 1);
        let root = query(".", RecordType::NS, false);
        assert_eq!(root.name, "");
    }

    #[test]
    fn less_than_a_header_gets_no_reply() {
        for len in [0, 1, 11] {
            let (kind, reply) = refused(&vec![0u8; len]);
            assert_eq!(kind, BadQuery::Short(len));
            assert!(reply.is_none());
        }
    }

    #[test]
    fn garbage_after_a_readable_header_gets_formerr() {
        let mut bytes = query_message("example.com.", RecordType::A, false)
            .to_vec()
            .unwrap();
        bytes.truncate(16); // the question cut in its name
        let (kind, reply) = refused(&bytes);
        assert!(matches!(kind, BadQuery::Malformed(_)), "{kind:?}");
        let reply = reply.unwrap();
        assert_eq!(reply.id(), ID);
        assert_eq!(reply.response_code(), ResponseCode::FormErr);
        assert_eq!(reply.message_type(), MessageType::Response);

        // A header that counts more than the bytes hold is refused before decoding.
        let mut header = vec![0x12, 0x34, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
        header.extend_from_slice(&[0; 20]);
        let (kind, reply) = refused(&header);
        assert!(kind.to_string().contains("65535 questions"), "{kind}");
        assert_eq!(reply.unwrap().response_code(), ResponseCode::FormErr);
    }

    #[test]
    fn oversized_input_gets_formerr() {
        let mut bytes = query_message("example.com.", RecordType::A, false)
            .to_vec()
            .unwrap();
        bytes.resize(MAX_MESSAGE + 1, 0);
        let (kind, reply) = refused(&bytes);
        assert_eq!(kind, BadQuery::Oversized(MAX_MESSAGE + 1));
        assert_eq!(reply.unwrap().response_code(), ResponseCode::FormErr);
    }

    #[test]
    fn a_response_sent_to_the_proxy_gets_no_reply() {
        let q = query("example.com.", RecordType::A, false);
        let (kind, reply) = refused(&response_to(&q).to_vec().unwrap());
        assert_eq!(kind, BadQuery::NotQuery);
        assert!(reply.is_none());
    }

    #[test]
    fn other_opcodes_get_notimp() {
        let mut m = query_message("example.com.", RecordType::A, false);
        m.set_op_code(OpCode::Update);
        let (kind, reply) = refused(&m.to_vec().unwrap());
        assert_eq!(kind, BadQuery::OpCode(5));
        let reply = reply.unwrap();
        assert_eq!(reply.response_code(), ResponseCode::NotImp);
        assert_eq!(reply.op_code(), OpCode::Update);
    }

    #[test]
    fn not_exactly_one_question_gets_formerr() {
        let mut two = query_message("a.example.com.", RecordType::A, false);
        two.add_query(Question::query(name("b.example.com."), RecordType::A));
        let (kind, reply) = refused(&two.to_vec().unwrap());
        assert_eq!(kind, BadQuery::QuestionCount(2));
        let reply = reply.unwrap();
        assert_eq!(reply.response_code(), ResponseCode::FormErr);
        assert!(reply.queries().is_empty());

        let mut none = query_message("a.example.com.", RecordType::A, false);
        none.take_queries();
        let (kind, _) = refused(&none.to_vec().unwrap());
        assert_eq!(kind, BadQuery::QuestionCount(0));
    }

    #[test]
    fn other_classes_and_zone_transfers_get_notimp() {
        let mut m = Message::new();
        let mut chaos = Question::query(name("version.bind."), RecordType::TXT);
        chaos.set_query_class(DNSClass::CH);
        m.set_id(ID).add_query(chaos);
        let (kind, reply) = refused(&m.to_vec().unwrap());
        assert_eq!(kind, BadQuery::Class(3));
        let reply = reply.unwrap();
        assert_eq!(reply.response_code(), ResponseCode::NotImp);
        assert_eq!(reply.queries()[0].name(), &name("version.bind."));

        let axfr = query_message("example.com.", RecordType::AXFR, false);
        let (kind, _) = refused(&axfr.to_vec().unwrap());
        assert_eq!(kind, BadQuery::Type(252));
    }

    #[test]
    fn a_label_with_a_dot_or_binary_byte_is_refused() {
        let good = query_message("aaa.example.com.", RecordType::A, false)
            .to_vec()
            .unwrap();
        // Byte 12 is the first label's length, 13.. its bytes.
        for (byte, shown) in [
            (b'.', "a\\x2ea"),
            (0xff, "a\\xffa"),
            (0, "a\\x00a"),
            (b' ', "a\\x20a"),
        ] {
            let mut bytes = good.clone();
            bytes[14] = byte;
            let (kind, reply) = refused(&bytes);
            assert_eq!(kind, BadQuery::Name(format!("{shown}.example.com")));
            let reply = reply.unwrap();
            assert_eq!(reply.response_code(), ResponseCode::Refused);
            assert_eq!(reply.id(), ID);
        }
    }

    #[test]
    fn a_later_edns_version_gets_badvers() {
        let mut m = query_message("example.com.", RecordType::A, true);
        m.extensions_mut().as_mut().unwrap().set_version(1);
        let (kind, reply) = refused(&m.to_vec().unwrap());
        assert_eq!(kind, BadQuery::EdnsVersion(1));
        let reply = reply.unwrap();
        // 16 is BADVERS in an OPT-carrying response (hickory names it BADSIG).
        assert_eq!(u16::from(reply.response_code()), 16);
        assert_eq!(reply.extensions().as_ref().unwrap().version(), 0);
    }

    #[test]
    fn reply_code_echoes_the_question_and_flags() {
        for edns in [false, true] {
            let mut m = query_message("Api.Example.com.", RecordType::A, edns);
            m.set_checking_disabled(true);
            let q = parse_query(&m.to_vec().unwrap()).unwrap();
            for rcode in [
                ResponseCode::Refused,
                ResponseCode::NXDomain,
                ResponseCode::ServFail,
            ] {
                let bytes = reply_code(&q, rcode);
                let r = Message::from_vec(&bytes).unwrap();
                assert_eq!(r.id(), ID);
                assert_eq!(r.message_type(), MessageType::Response);
                assert_eq!(r.response_code(), rcode);
                assert!(r.recursion_desired() && r.recursion_available());
                assert!(r.checking_disabled());
                assert_eq!(r.queries(), q.message.queries());
                assert_eq!(r.queries()[0].name().to_ascii(), "Api.Example.com.");
                assert!(r.answers().is_empty() && r.name_servers().is_empty());
                assert_eq!(r.extensions().is_some(), edns);
                if edns {
                    let e = r.extensions().as_ref().unwrap();
                    assert_eq!(usize::from(e.max_payload()), MAX_UDP_PAYLOAD);
                    assert!(e.options().as_ref().is_empty());
                }
            }
        }
    }

    #[test]
    fn a_cname_chain_is_followed_with_the_smallest_ttl() {
        let q = query("a.example.com.", RecordType::A, false);
        let mut r = response_to(&q);
        r.add_answers([
            cname("A.example.com.", 300, "b.example.net."),
            cname("b.example.net.", 60, "C.example.org."),
            a("c.example.org.", 600, [192, 0, 2, 1]),
            aaaa("c.EXAMPLE.org.", 30, Ipv6Addr::LOCALHOST),
            a("unrelated.example.", 600, [198, 51, 100, 1]),
            cname("unrelated.example.", 600, "a.example.com."),
        ]);
        assert_eq!(
            addrs(&answer_addresses(&q, &r)),
            [
                (v4(192, 0, 2, 1), 60),
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 30)
            ]
        );
    }

    #[test]
    fn the_question_names_own_addresses_keep_their_ttl_and_come_once() {
        let q = query("a.example.com.", RecordType::A, false);
        let mut r = response_to(&q);
        r.add_answers([
            a("a.example.com.", 600, [192, 0, 2, 1]),
            a("a.example.com.", 20, [192, 0, 2, 1]),
            a("a.example.com.", 900, [192, 0, 2, 2]),
        ]);
        let mut chaos = a("a.example.com.", 60, [192, 0, 2, 3]);
        chaos.set_dns_class(DNSClass::CH);
        r.add_answer(chaos);
        r.add_additional(a("a.example.com.", 60, [192, 0, 2, 4]));
        assert_eq!(
            addrs(&answer_addresses(&q, &r)),
            [(v4(192, 0, 2, 1), 20), (v4(192, 0, 2, 2), 900)]
        );
    }

    #[test]
    fn a_cname_loop_ends_and_a_long_chain_is_cut() {
        let q = query("a.example.com.", RecordType::A, false);
        let mut r = response_to(&q);
        r.add_answers([
            cname("a.example.com.", 100, "b.example.com."),
            cname("b.example.com.", 50, "a.example.com."),
            a("b.example.com.", 600, [192, 0, 2, 1]),
        ]);
        assert_eq!(
            addrs(&answer_addresses(&q, &r)),
            [(v4(192, 0, 2, 1), 100)] // b -> a closes the loop: not on the way to b
        );

        // n0 -> n1 -> ... -> n20, an address at every name: the first 16 steps are followed.
        let q = query("n0.example.com.", RecordType::A, false);
        let mut r = response_to(&q);
        for i in 0..=20u8 {
            let owner = format!("n{i}.example.com.");
            r.add_answer(cname(
                &owner,
                1000 - u32::from(i),
                &format!("n{}.example.com.", i + 1),
            ));
            r.add_answer(a(&owner, 5000, [10, 0, 0, i]));
        }
        let found = answer_addresses(&q, &r);
        assert_eq!(found.len(), MAX_CHAIN + 1);
        assert_eq!(
            found[0],
            Resolved {
                addr: v4(10, 0, 0, 0),
                ttl: 5000
            }
        );
        assert_eq!(
            found[16],
            Resolved {
                addr: v4(10, 0, 0, 16),
                ttl: 985
            }
        );
    }

    #[test]
    fn a_response_must_answer_what_was_sent() {
        let q = query("a.example.com.", RecordType::A, true);
        let sent = forward_query(&q, 0xbeef);
        assert_eq!(sent.id, 0xbeef);
        assert_ne!(sent.message.queries()[0].name().to_ascii(), ""); // the same question
        let good = response_to(&sent);
        assert!(check_response(&sent, &good.to_vec().unwrap()).is_ok());

        let mut upper = good.clone();
        upper.take_queries();
        upper.add_query(Question::query(name("A.EXAMPLE.COM."), RecordType::A));
        assert!(check_response(&sent, &upper.to_vec().unwrap()).is_ok());

        // The client's id is not what was sent.
        let mut other_id = good.clone();
        other_id.set_id(q.id);
        assert_eq!(
            check_response(&sent, &other_id.to_vec().unwrap()),
            Err(ResponseError::Id {
                sent: 0xbeef,
                got: ID
            })
        );
        let mut not_response = good.clone();
        not_response.set_message_type(MessageType::Query);
        assert_eq!(
            check_response(&sent, &not_response.to_vec().unwrap()),
            Err(ResponseError::NotResponse)
        );
        for question in [
            Question::query(name("b.example.com."), RecordType::A),
            Question::query(name("a.example.com."), RecordType::AAAA),
        ] {
            let mut wrong = good.clone();
            wrong.take_queries();
            wrong.add_query(question);
            let e = check_response(&sent, &wrong.to_vec().unwrap()).unwrap_err();
            assert!(matches!(e, ResponseError::Question(_)), "{e}");
        }
        let mut two = good.clone();
        two.add_query(Question::query(name("a.example.com."), RecordType::A));
        assert!(matches!(
            check_response(&sent, &two.to_vec().unwrap()),
            Err(ResponseError::Question(_))
        ));
        let mut cut = good.to_vec().unwrap();
        cut.truncate(cut.len() - 3);
        assert!(matches!(
            check_response(&sent, &cut),
            Err(ResponseError::Malformed(_))
        ));
        assert_eq!(
            check_response(&sent, &cut[..5]),
            Err(ResponseError::Short(5))
        );
    }

    #[test]
    fn forward_query_sends_the_question_with_a_new_id_and_the_proxys_edns() {
        let mut m = query_message("Api.Example.com.", RecordType::AAAA, true);
        m.extensions_mut().as_mut().unwrap().set_dnssec_ok(true);
        let q = parse_query(&m.to_vec().unwrap()).unwrap();
        let sent = forward_query(&q, 7);
        let bytes = encode_query(&sent).unwrap();
        let back = parse_query(&bytes).unwrap();
        assert_eq!(back.id, 7);
        assert_eq!(back.message.queries(), q.message.queries());
        assert_eq!(
            back.message.queries()[0].name().to_ascii(),
            "Api.Example.com."
        );
        assert!(back.message.recursion_desired());
        let e = back.message.extensions().as_ref().unwrap();
        assert_eq!(usize::from(e.max_payload()), MAX_UDP_PAYLOAD);
        assert!(e.flags().dnssec_ok);

        let mut bytes = bytes;
        with_id(&mut bytes, 0xabcd);
        assert_eq!(parse_query(&bytes).unwrap().id, 0xabcd);
    }

    #[test]
    fn release_keeps_the_chain_and_only_the_kept_addresses() {
        let q = query("a.example.com.", RecordType::A, true);
        let sent = forward_query(&q, 0xbeef);
        let mut r = response_to(&sent);
        r.set_authoritative(true);
        r.add_answers([
            cname("a.example.com.", 300, "b.example.com."),
            a("b.example.com.", 60, [192, 0, 2, 1]),
            a("b.example.com.", 60, [192, 0, 2, 2]),
            a("unrelated.example.", 60, [198, 51, 100, 1]),
        ]);
        // Not of class IN: no address the kernel holds, whatever its bytes.
        let mut chaos = a("b.example.com.", 60, [192, 0, 2, 2]);
        chaos.set_dns_class(DNSClass::CH);
        r.add_answer(chaos);
        r.add_name_server(Record::from_rdata(
            name("example.com."),
            60,
            RData::NS(NS(name("ns.example.com."))),
        ));
        r.add_name_server(a("ns.example.com.", 60, [198, 51, 100, 2]));
        r.add_additional(a("ns.example.com.", 60, [198, 51, 100, 3]));
        r.add_additional(aaaa("ns.example.com.", 60, Ipv6Addr::LOCALHOST));
        let mut hinted = SVCB::new(
            1,
            name("b.example.com."),
            vec![
                (SvcParamKey::Port, SvcParamValue::Port(443)),
                (
                    SvcParamKey::Ipv4Hint,
                    SvcParamValue::Ipv4Hint(IpHint(vec![A::new(198, 51, 100, 4)])),
                ),
            ],
        );
        r.add_additional(Record::from_rdata(
            name("b.example.com."),
            60,
            RData::HTTPS(HTTPS(hinted.clone())),
        ));
        let keep = [v4(192, 0, 2, 2)];
        let bytes = release(&q, &r, &keep, None).unwrap();
        let out = Message::from_vec(&bytes).unwrap();
        assert_eq!(out.id(), ID);
        assert_eq!(out.queries(), q.message.queries());
        assert!(out.authoritative() && !out.truncated());
        assert_eq!(
            out.answers(),
            [
                cname("a.example.com.", 300, "b.example.com."),
                a("b.example.com.", 60, [192, 0, 2, 2])
            ]
        );
        assert_eq!(out.name_servers().len(), 1);
        assert_eq!(out.name_servers()[0].record_type(), RecordType::NS);
        assert_eq!(out.additionals().len(), 1);
        hinted = SVCB::new(
            1,
            name("b.example.com."),
            vec![(SvcParamKey::Port, SvcParamValue::Port(443))],
        );
        assert_eq!(out.additionals()[0].data(), &RData::HTTPS(HTTPS(hinted)));
        let e = out.extensions().as_ref().unwrap();
        assert!(e.options().as_ref().is_empty());
    }

    #[test]
    fn release_keeps_the_rcode_and_gives_no_opt_to_a_client_without_one() {
        let q = query("gone.example.com.", RecordType::A, false);
        let mut r = response_to(&forward_query(&q, 1));
        r.set_response_code(ResponseCode::NXDomain);
        r.set_edns(Edns::new());
        r.add_name_server(soa("example.com."));
        let out = Message::from_vec(&release(&q, &r, &[], Some(512)).unwrap()).unwrap();
        assert_eq!(out.response_code(), ResponseCode::NXDomain);
        assert!(out.extensions().is_none());
        assert_eq!(out.name_servers(), [soa("example.com.")]);

        // An extended rcode cannot reach a client without EDNS.
        r.set_response_code(ResponseCode::BADCOOKIE);
        let out = Message::from_vec(&release(&q, &r, &[], None).unwrap()).unwrap();
        assert_eq!(out.response_code(), ResponseCode::ServFail);
    }

    #[test]
    fn an_answer_over_the_udp_limit_goes_out_truncated() {
        let addresses: Vec<IpAddr> = (0..=40u8).map(|i| v4(10, 0, 0, i)).collect();
        for (edns, limit) in [(false, 512), (true, 1232)] {
            let q = query("many.example.com.", RecordType::A, edns);
            assert_eq!(udp_limit(&q), limit);
            let mut r = response_to(&q);
            for addr in &addresses {
                let IpAddr::V4(v4) = addr else { unreachable!() };
                r.add_answer(a("many.example.com.", 60, v4.octets()));
            }
            let full = release(&q, &r, &addresses, None).unwrap();
            assert!(full.len() > 512);
            assert_eq!(Message::from_vec(&full).unwrap().answers().len(), 41);

            let bytes = release(&q, &r, &addresses, Some(udp_limit(&q))).unwrap();
            let out = Message::from_vec(&bytes).unwrap();
            if edns {
                assert_eq!(bytes, full, "fits in {limit}");
            } else {
                assert!(bytes.len() <= 512);
                assert!(out.truncated());
                assert!(out.answers().is_empty());
                assert_eq!(out.queries(), q.message.queries());
                assert_eq!(out.id(), ID);
            }
        }
    }

    #[test]
    fn the_fuzz_entry_takes_anything() {
        let q = query_message("a.example.com.", RecordType::A, true)
            .to_vec()
            .unwrap();
        let parsed = parse_query(&q).unwrap();
        let mut r = response_to(&parsed);
        r.add_answers([
            cname("a.example.com.", 300, "b.example.com."),
            a("b.example.com.", 60, [192, 0, 2, 1]),
            a("b.example.com.", 60, [192, 0, 2, 2]),
        ]);
        let r = r.to_vec().unwrap();
        let mut both = q.clone();
        both.resize(r.len(), 0);
        both.extend_from_slice(&r);
        // The halves are a query and its answer: the seeds of this shape reach release.
        let (first, second) = both.split_at(both.len() / 2);
        assert!(check_response(&parse_query(first).unwrap(), second).is_ok());
        for input in [&[][..], &[0xff; 11], &[0; 12], &q, &r, &both] {
            fuzz_entry(input);
        }
    }
}
