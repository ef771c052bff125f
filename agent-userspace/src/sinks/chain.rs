//! The audit log's hash chain, its signed checkpoints, and their verification (pure: bytes in,
//! bytes or a verdict out; docs/audit-log.md has the exact format).
//!
//! Each line is a JSON object whose last member is `"chain":"<hex>"`, where
//! `hex = SHA-256(prev || body)`: `prev` is the previous line's chain value (64 ASCII hex digits;
//! [`GENESIS`] for the first line of a log) and `body` the line's bytes before `,"chain":`.
//! A checkpoint is a line of kind `checkpoint` carrying a C2SP signed note over
//! `<origin>\n<count>\n<head>\n`: how many lines precede it in the chain and the last one's chain
//! value.

use std::fmt;

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

/// A chain value: SHA-256 as 64 lowercase hex digits (ASCII).
pub type Link = [u8; 64];

/// What the first line of a log is chained to.
pub const GENESIS: Link = [b'0'; 64];

const MEMBER: &[u8] = b",\"chain\":\"";
/// `,"chain":"` + 64 hex + `"}`.
pub const SUFFIX_LEN: usize = MEMBER.len() + 64 + 2;
/// Every checkpoint line starts so (records start with `{"seq":`).
pub const CHECKPOINT_PREFIX: &[u8] = b"{\"kind\":\"checkpoint\",";
/// The signed-note algorithm byte of Ed25519 (C2SP signed-note).
const ALG_ED25519: u8 = 0x01;
/// The separator in front of each signature line: U+2014 and a space.
const DASH: &str = "\u{2014} ";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("an audit line must be one non-empty JSON object")]
    NotAnObject,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Format(String),
    #[error("reading random bytes: {0}")]
    Random(std::io::Error),
}

fn hex(bytes: &[u8; 32]) -> Link {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
    out
}

/// `SHA-256(prev || body)` in hex.
pub fn link(prev: &Link, body: &[u8]) -> Link {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    hex(&h.finalize().into())
}

/// Appends to `out` the line for the JSON object `object` (a trailing newline is allowed and
/// written back) chained to `prev`; returns its chain value. The object's bytes are hashed as
/// they are: nothing is re-serialized.
pub fn seal_into(out: &mut Vec<u8>, prev: &Link, object: &[u8]) -> Result<Link, ChainError> {
    let object = object.strip_suffix(b"\n").unwrap_or(object);
    let body = object.strip_suffix(b"}").ok_or(ChainError::NotAnObject)?;
    if !body.starts_with(b"{") || body.len() < 2 {
        return Err(ChainError::NotAnObject);
    }
    let chain = link(prev, body);
    out.reserve(body.len() + SUFFIX_LEN + 1);
    out.extend_from_slice(body);
    out.extend_from_slice(MEMBER);
    out.extend_from_slice(&chain);
    out.extend_from_slice(b"\"}\n");
    Ok(chain)
}

/// A line (without its newline) split into the bytes its chain value covers and that value.
pub fn split(line: &[u8]) -> Option<(&[u8], Link)> {
    let n = line.len().checked_sub(SUFFIX_LEN)?;
    let (body, suffix) = line.split_at(n);
    let value = suffix.strip_prefix(MEMBER)?.strip_suffix(b"\"}")?;
    if !value.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    Some((body, value.try_into().ok()?))
}

pub fn is_checkpoint(line: &[u8]) -> bool {
    line.starts_with(CHECKPOINT_PREFIX)
}

/// What a checkpoint says: `count` lines precede it in the chain, the last with chain `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteBody {
    pub origin: String,
    pub count: u64,
    pub head: Link,
}

impl NoteBody {
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.count,
            String::from_utf8_lossy(&self.head)
        )
    }
}

/// The 4-byte key id of a signed-note key: SHA-256(name || "\n" || alg || key)[..4].
fn key_hash(name: &str, alg: u8, key: &[u8]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([alg]);
    h.update(key);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// HMAC keys are named by HMAC-SHA256(key, "agentwall audit key id")[..4]: it names the key
/// without revealing it.
fn hmac_id(key: &[u8]) -> [u8; 4] {
    let m = hmac_sha256(key, b"agentwall audit key id");
    [m[0], m[1], m[2], m[3]]
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('+') && !name.chars().any(char::is_whitespace)
}

/// A key that signs checkpoints.
pub enum Signer {
    Ed25519 {
        name: String,
        key: SigningKey,
    },
    /// Checkable only by a holder of the same key.
    Hmac {
        name: String,
        key: Vec<u8>,
    },
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ed25519 { name, .. } => write!(f, "Ed25519({name})"),
            Self::Hmac { name, .. } => write!(f, "Hmac({name})"),
        }
    }
}

/// The name HMAC signatures go by in a note.
pub const HMAC_NAME: &str = "agentwall-hmac-sha256";

impl Signer {
    /// A private key in the note format: `PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>`.
    pub fn parse_ed25519(text: &str) -> Result<Self, KeyError> {
        let bad = |why: &str| KeyError::Format(format!("not an agentwall private key: {why}"));
        let rest = text
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| bad("it does not start with PRIVATE+KEY+"))?;
        let (name, hash, key) = three(rest).ok_or_else(|| bad("expected NAME+HASH+KEY"))?;
        let raw = B64.decode(key).map_err(|e| bad(&format!("key: {e}")))?;
        let (alg, seed) = raw.split_first().ok_or_else(|| bad("empty key"))?;
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| bad("an Ed25519 seed is 32 bytes"))?;
        if *alg != ALG_ED25519 {
            return Err(bad("not an Ed25519 key"));
        }
        let key = SigningKey::from_bytes(&seed);
        let want = key_hash(name, ALG_ED25519, key.verifying_key().as_bytes());
        if hash != hex8(&want) || !valid_name(name) {
            return Err(bad("its name or key hash does not match the key"));
        }
        Ok(Self::Ed25519 {
            name: name.into(),
            key,
        })
    }

    /// An HMAC key: the file's bytes, without surrounding white space; at least 16 of them.
    pub fn hmac(key: &[u8]) -> Result<Self, KeyError> {
        let key = key.trim_ascii();
        if key.len() < 16 {
            return Err(KeyError::Format(
                "an HMAC key needs at least 16 bytes".into(),
            ));
        }
        Ok(Self::Hmac {
            name: HMAC_NAME.into(),
            key: key.to_vec(),
        })
    }

    /// The signature line for `body` (the note text up to its blank line).
    fn signature_line(&self, body: &str) -> String {
        let (name, blob) = match self {
            Self::Ed25519 { name, key } => {
                let id = key_hash(name, ALG_ED25519, key.verifying_key().as_bytes());
                let sig = key.sign(body.as_bytes()).to_bytes();
                (name, [&id[..], &sig[..]].concat())
            }
            Self::Hmac { name, key } => {
                let mac = hmac_sha256(key, body.as_bytes());
                (name, [&hmac_id(key)[..], &mac[..]].concat())
            }
        };
        format!("{DASH}{name} {}\n", B64.encode(blob))
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Ed25519 { name, .. } | Self::Hmac { name, .. } => name,
        }
    }
}

fn hex8(b: &[u8; 4]) -> String {
    format!("{:08x}", u32::from_be_bytes(*b))
}

/// `A+B+C` where C (base64) may not contain '+' ... but base64 may: split the first two only.
fn three(s: &str) -> Option<(&str, &str, &str)> {
    let (a, rest) = s.split_once('+')?;
    let (b, c) = rest.split_once('+')?;
    Some((a, b, c))
}

/// The signed note for `body`, signed by every signer.
pub fn sign_note(body: &NoteBody, signers: &[Signer]) -> String {
    let text = body.text();
    let mut note = format!("{text}\n");
    for s in signers {
        note.push_str(&s.signature_line(&text));
    }
    note
}

/// A checkpoint line's JSON object (without chain): kind first, so it is known by its prefix.
pub fn checkpoint_object(time: &str, note: &str) -> Vec<u8> {
    let mut out = CHECKPOINT_PREFIX.to_vec();
    out.extend_from_slice(b"\"time\":");
    out.extend_from_slice(&serde_json::to_vec(time).expect("a string"));
    out.extend_from_slice(b",\"note\":");
    out.extend_from_slice(&serde_json::to_vec(note).expect("a string"));
    out.extend_from_slice(b"}\n");
    out
}

/// A new Ed25519 key: (private key text, verifier key text), both in the note key formats.
pub fn generate(name: &str) -> Result<(String, String), KeyError> {
    if !valid_name(name) {
        return Err(KeyError::Format(format!(
            "key name {name:?}: non-empty, without '+' or white space"
        )));
    }
    let mut seed = [0u8; 32];
    getrandom(&mut seed)?;
    let key = SigningKey::from_bytes(&seed);
    let public = key.verifying_key();
    let id = hex8(&key_hash(name, ALG_ED25519, public.as_bytes()));
    let private = format!(
        "PRIVATE+KEY+{name}+{id}+{}",
        B64.encode([&[ALG_ED25519][..], &seed[..]].concat())
    );
    let verifier = format!(
        "{name}+{id}+{}",
        B64.encode([&[ALG_ED25519][..], public.as_bytes()].concat())
    );
    Ok((private, verifier))
}

/// `n` random bytes from the kernel.
pub fn getrandom(buf: &mut [u8]) -> Result<(), KeyError> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writing into the unfilled part of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(KeyError::Random(e));
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

/// A key that checks checkpoint signatures.
pub enum Checker {
    Ed25519 {
        name: String,
        id: [u8; 4],
        key: VerifyingKey,
    },
    Hmac {
        key: Vec<u8>,
    },
}

impl Checker {
    /// A verifier key: `<name>+<hash>+<base64(0x01 || public key)>`.
    pub fn parse_verifier(text: &str) -> Result<Self, KeyError> {
        let bad = |why: &str| KeyError::Format(format!("not a verifier key: {why}"));
        let (name, hash, key) = three(text.trim()).ok_or_else(|| bad("expected NAME+HASH+KEY"))?;
        let raw = B64.decode(key).map_err(|e| bad(&format!("key: {e}")))?;
        let (alg, public) = raw.split_first().ok_or_else(|| bad("empty key"))?;
        if *alg != ALG_ED25519 {
            return Err(bad("not an Ed25519 key"));
        }
        let public: [u8; 32] = public
            .try_into()
            .map_err(|_| bad("an Ed25519 public key is 32 bytes"))?;
        let id = key_hash(name, ALG_ED25519, &public);
        if hash != hex8(&id) || !valid_name(name) {
            return Err(bad("its name or key hash does not match the key"));
        }
        let key = VerifyingKey::from_bytes(&public).map_err(|e| bad(&e.to_string()))?;
        Ok(Self::Ed25519 {
            name: name.into(),
            id,
            key,
        })
    }

    pub fn hmac(key: &[u8]) -> Result<Self, KeyError> {
        let Signer::Hmac { key, .. } = Signer::hmac(key)? else {
            unreachable!("an HMAC signer")
        };
        Ok(Self::Hmac { key })
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Ed25519 { name, .. } => name,
            Self::Hmac { .. } => HMAC_NAME,
        }
    }

    /// Checks this key's signature on `note`: Ok(false) when the note has none by this key.
    fn check(&self, body: &str, sigs: &[(&str, Vec<u8>)]) -> Result<bool, String> {
        let (name, id) = match self {
            Self::Ed25519 { name, id, .. } => (name.as_str(), *id),
            Self::Hmac { key } => (HMAC_NAME, hmac_id(key)),
        };
        let mut found = false;
        for (n, blob) in sigs.iter().filter(|(n, b)| *n == name && b.len() >= 4) {
            if blob[..4] != id {
                continue;
            }
            found = true;
            let sig = &blob[4..];
            let ok = match self {
                Self::Ed25519 { key, .. } => ed25519_dalek::Signature::from_slice(sig)
                    .is_ok_and(|s| key.verify(body.as_bytes(), &s).is_ok()),
                Self::Hmac { key } => {
                    let mut m = hmac::Hmac::<Sha256>::new_from_slice(key).expect("any length");
                    m.update(body.as_bytes());
                    m.verify_slice(sig).is_ok()
                }
            };
            if !ok {
                return Err(format!("the signature by {n} does not verify: forged"));
            }
        }
        Ok(found)
    }
}

/// A note's signature lines: (key name, key hash and signature).
type Signatures<'a> = Vec<(&'a str, Vec<u8>)>;

/// Splits a signed note into its body and (name, signature blob) lines.
fn parse_note(note: &str) -> Result<(NoteBody, &str, Signatures<'_>), String> {
    let split = note
        .find("\n\n")
        .ok_or("its note has no blank line before the signatures")?;
    let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
    let mut lines = text.lines();
    let (Some(origin), Some(count), Some(head), None) =
        (lines.next(), lines.next(), lines.next(), lines.next())
    else {
        return Err("its note body is not origin, count and head".into());
    };
    let count = count
        .parse()
        .map_err(|_| format!("its note's count {count:?} is not a number"))?;
    let head: Link = head
        .as_bytes()
        .try_into()
        .ok()
        .filter(|h: &Link| h.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| format!("its note's head {head:?} is not a chain value"))?;
    let mut out = Vec::new();
    for l in sigs.lines() {
        let (name, blob) = l
            .strip_prefix(DASH)
            .and_then(|l| l.split_once(' '))
            .ok_or_else(|| format!("a signature line is malformed: {l:?}"))?;
        let blob = B64
            .decode(blob)
            .map_err(|e| format!("signature by {name}: {e}"))?;
        out.push((name, blob));
    }
    Ok((
        NoteBody {
            origin: origin.into(),
            count,
            head,
        },
        text,
        out,
    ))
}

/// The note body of a checkpoint line (signatures not checked): for a restart's count.
pub fn note_of(line: &[u8]) -> Option<NoteBody> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    parse_note(v["note"].as_str()?).ok().map(|(b, _, _)| b)
}

/// One line of the files being verified. `partial`: the file ends in it without a newline.
#[derive(Debug, Clone)]
pub struct Line {
    pub file: usize,
    pub number: u64,
    pub bytes: Vec<u8>,
    pub partial: bool,
}

/// What is wrong, and where: the first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: usize,
    pub line: u64,
    pub kind: ProblemKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    Edited,
    Deleted,
    Inserted,
    Reordered,
    Truncated,
    Checkpoint,
    Unchained,
    Broken,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Edited => "edited",
            Self::Deleted => "deleted",
            Self::Inserted => "inserted",
            Self::Reordered => "reordered",
            Self::Truncated => "truncated",
            Self::Checkpoint => "forged checkpoint",
            Self::Unchained => "not chained",
            Self::Broken => "chain broken",
        })
    }
}

/// Where the checked chain starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Anchor {
    #[default]
    Empty,
    /// The first line follows GENESIS: the whole log since it began.
    Genesis,
    /// The first line is a checkpoint: the chain before it is in files not given.
    Checkpoint { count: u64, signed: bool },
    /// The first line continues a chain not given and is not a checkpoint: it is taken as is.
    Unverified,
}

/// What an intact set holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub checkpoints: u64,
    /// Checkpoint signatures verified, per key.
    pub signatures: u64,
    pub anchor: Anchor,
    /// Lines after the last checkpoint (or all, when there is none): only the chain covers them.
    pub tail: u64,
    /// Where the last checkpoint is.
    pub last_checkpoint: Option<(usize, u64)>,
}

/// Checks lines in order against the chain and the checkpoints. `checkers` empty: signatures
/// are not checked (the chain and the checkpoints' counts and heads still are).
pub struct Verifier<'a> {
    checkers: &'a [Checker],
    prev: Option<Link>,
    /// The chain value before `prev` (to name an inserted line after the fact).
    before_prev: Option<Link>,
    prev_at: (usize, u64),
    /// Lines in the chain before the next one, when known.
    count: Option<u64>,
    last_seq: Option<u64>,
    summary: Summary,
}

fn seq_of(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

impl<'a> Verifier<'a> {
    pub fn new(checkers: &'a [Checker]) -> Self {
        Self {
            checkers,
            prev: None,
            before_prev: None,
            prev_at: (0, 0),
            count: None,
            last_seq: None,
            summary: Summary::default(),
        }
    }

    /// Checks `cur`; `next` (the line after it, if any) only sharpens what is reported.
    pub fn check(&mut self, cur: &Line, next: Option<&Line>) -> Result<(), Problem> {
        let problem = |kind, detail: String| Problem {
            file: cur.file,
            line: cur.number,
            kind,
            detail,
        };
        if cur.partial {
            return Err(problem(
                ProblemKind::Truncated,
                "the file ends in a partial line (cut in the middle of a record)".into(),
            ));
        }
        let Some((body, stated)) = split(&cur.bytes) else {
            return Err(problem(
                ProblemKind::Unchained,
                "the line does not end in a \"chain\" member".into(),
            ));
        };
        let checkpoint = if is_checkpoint(&cur.bytes) {
            Some(
                self.note(&cur.bytes)
                    .map_err(|d| problem(ProblemKind::Checkpoint, d))?,
            )
        } else {
            None
        };
        // The first line is checked too when its predecessor is known (genesis, or a signed
        // note's head); otherwise it is the anchor, taken as is.
        let mut check = true;
        let prev = match (self.prev, &checkpoint) {
            (Some(p), _) => p,
            (None, Some((body, signed))) => {
                self.summary.anchor = if body.count == 0 && body.head == GENESIS {
                    Anchor::Genesis
                } else {
                    Anchor::Checkpoint {
                        count: body.count,
                        signed: *signed,
                    }
                };
                self.count = Some(body.count);
                body.head
            }
            (None, None) if link(&GENESIS, body) == stated => {
                self.summary.anchor = Anchor::Genesis;
                self.count = Some(0);
                GENESIS
            }
            (None, None) => {
                self.summary.anchor = Anchor::Unverified;
                check = false;
                stated
            }
        };
        if check && link(&prev, body) != stated {
            return Err(self.classify(cur, next, prev, stated, body));
        }
        if let Some((note, _)) = &checkpoint {
            if note.head != prev {
                return Err(problem(
                    ProblemKind::Checkpoint,
                    format!(
                        "it signs chain head {} but the line before it has {}: lines before it \
                         were changed and their chain recomputed, or the checkpoint is forged",
                        String::from_utf8_lossy(&note.head),
                        String::from_utf8_lossy(&prev)
                    ),
                ));
            }
            match self.count {
                Some(c) if c != note.count => {
                    return Err(problem(
                        ProblemKind::Checkpoint,
                        format!(
                            "it says {} lines precede it, the chain has {c}: lines were {} \
                             before it",
                            note.count,
                            if c < note.count {
                                "deleted"
                            } else {
                                "inserted"
                            }
                        ),
                    ))
                }
                _ => self.count = Some(note.count),
            }
            self.summary.checkpoints += 1;
            self.summary.tail = 0;
            self.summary.last_checkpoint = Some((cur.file, cur.number));
        } else {
            self.summary.records += 1;
            self.summary.tail += 1;
            self.last_seq = seq_of(&cur.bytes).or(self.last_seq);
        }
        self.before_prev = self.prev;
        self.prev = Some(stated);
        self.prev_at = (cur.file, cur.number);
        self.count = self.count.map(|c| c + 1);
        Ok(())
    }

    /// The checkpoint's note, its signatures checked.
    fn note(&mut self, line: &[u8]) -> Result<(NoteBody, bool), String> {
        let v: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
        let note = v["note"].as_str().ok_or("it has no note")?;
        let (body, text, sigs) = parse_note(note)?;
        let mut signed = false;
        for c in self.checkers {
            if !c.check(text, &sigs)? {
                return Err(format!("it is not signed by the key {}", c.name()));
            }
            self.summary.signatures += 1;
            signed = true;
        }
        Ok((body, signed))
    }

    fn classify(
        &self,
        cur: &Line,
        next: Option<&Line>,
        prev: Link,
        stated: Link,
        body: &[u8],
    ) -> Problem {
        let at = |kind, (file, line): (usize, u64), detail: String| Problem {
            file,
            line,
            kind,
            detail,
        };
        let here = (cur.file, cur.number);
        let next = next.filter(|n| !n.partial).and_then(|n| split(&n.bytes));
        if self.before_prev.is_some_and(|bp| link(&bp, body) == stated) {
            return at(
                ProblemKind::Inserted,
                self.prev_at,
                "the line is not part of the chain: the next line follows the one before it".into(),
            );
        }
        if let Some((nbody, nstated)) = next {
            if link(&prev, nbody) == nstated {
                if link(&nstated, body) == stated {
                    return at(
                        ProblemKind::Reordered,
                        here,
                        "this line and the next are swapped".into(),
                    );
                }
                return at(
                    ProblemKind::Inserted,
                    here,
                    "the line is not part of the chain: the next line follows the one before it"
                        .into(),
                );
            }
            if link(&stated, nbody) == nstated {
                if let (Some(last), Some(seq)) = (self.last_seq, seq_of(&cur.bytes)) {
                    if seq > last + 1 {
                        return at(
                            ProblemKind::Deleted,
                            here,
                            format!(
                                "{} record(s) missing before it (seq {} follows {last})",
                                seq - last - 1,
                                seq
                            ),
                        );
                    }
                }
                if cur.number == 1 && cur.file != self.prev_at.0 {
                    return at(
                        ProblemKind::Deleted,
                        here,
                        "lines missing at the end of the previous file (truncated), or this \
                         line was edited"
                            .into(),
                    );
                }
                return at(
                    ProblemKind::Edited,
                    here,
                    "its content does not match its chain value (or a line without seq before \
                     it was deleted)"
                        .into(),
                );
            }
        }
        at(
            ProblemKind::Broken,
            here,
            "its chain value does not follow from the line before: a line was edited, deleted \
             or inserted here"
                .into(),
        )
    }

    pub fn finish(self) -> Summary {
        self.summary
    }
}

/// Verifies `lines` (in order) to the end, or to the first problem.
pub fn verify(
    checkers: &[Checker],
    lines: impl IntoIterator<Item = Line>,
) -> Result<Summary, Problem> {
    let mut v = Verifier::new(checkers);
    let mut it = lines.into_iter().peekable();
    while let Some(cur) = it.next() {
        v.check(&cur, it.peek())?;
    }
    Ok(v.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `n` records; a checkpoint after every `every` lines (0: none). Returns the lines.
    fn log(n: u64, every: u64, signers: &[Signer]) -> Vec<Vec<u8>> {
        let (mut prev, mut count, mut out) = (GENESIS, 0u64, Vec::new());
        let mut push = |obj: &[u8], prev: &mut Link, count: &mut u64| {
            let mut line = Vec::new();
            *prev = seal_into(&mut line, prev, obj).unwrap();
            line.pop();
            out.push(line);
            *count += 1;
        };
        for seq in 1..=n {
            let rec = format!("{{\"seq\":{seq},\"kind\":\"decision\",\"dst\":\"127.0.0.1\"}}\n");
            push(rec.as_bytes(), &mut prev, &mut count);
            if every > 0 && seq % every == 0 {
                let note = sign_note(
                    &NoteBody {
                        origin: "test".into(),
                        count,
                        head: prev,
                    },
                    signers,
                );
                push(&checkpoint_object("now", &note), &mut prev, &mut count);
            }
        }
        out
    }

    fn lines(files: &[Vec<Vec<u8>>]) -> Vec<Line> {
        files
            .iter()
            .enumerate()
            .flat_map(|(f, ls)| {
                ls.iter().enumerate().map(move |(i, b)| Line {
                    file: f,
                    number: i as u64 + 1,
                    bytes: b.clone(),
                    partial: false,
                })
            })
            .collect()
    }

    fn keys() -> (Signer, Checker) {
        let (private, public) = generate("test.example/audit").unwrap();
        (
            Signer::parse_ed25519(&private).unwrap(),
            Checker::parse_verifier(&public).unwrap(),
        )
    }

    fn first_problem(checkers: &[Checker], ls: Vec<Vec<u8>>) -> Problem {
        verify(checkers, lines(&[ls])).expect_err("a problem")
    }

    #[test]
    fn sealing_hashes_the_bytes_before_the_chain_member() {
        let mut out = Vec::new();
        let c = seal_into(&mut out, &GENESIS, b"{\"seq\":1}\n").unwrap();
        let mut h = Sha256::new();
        h.update([b'0'; 64]);
        h.update(b"{\"seq\":1");
        assert_eq!(c, hex(&h.finalize().into()));
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            text,
            format!(
                "{{\"seq\":1,\"chain\":\"{}\"}}\n",
                String::from_utf8_lossy(&c)
            )
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(split(&out[..out.len() - 1]).unwrap().1, c);
        assert_eq!(
            seal_into(&mut out, &GENESIS, b"{}"),
            Err(ChainError::NotAnObject)
        );
        assert_eq!(
            seal_into(&mut out, &GENESIS, b"[1]\n"),
            Err(ChainError::NotAnObject)
        );
    }

    #[test]
    fn an_intact_log_verifies_from_genesis() {
        let (s, c) = keys();
        let ls = log(50, 10, std::slice::from_ref(&s));
        let sum = verify(std::slice::from_ref(&c), lines(&[ls])).unwrap();
        assert_eq!(
            (sum.records, sum.checkpoints, sum.signatures, sum.tail),
            (50, 5, 5, 0)
        );
        assert_eq!(sum.anchor, Anchor::Genesis);
    }

    #[test]
    fn a_chain_continues_across_files_and_from_a_checkpoint_anchor() {
        let (s, c) = keys();
        let ls = log(40, 10, std::slice::from_ref(&s));
        // Rotated: split after the second checkpoint (line 22).
        let (a, b) = ls.split_at(22);
        let sum = verify(std::slice::from_ref(&c), lines(&[a.to_vec(), b.to_vec()])).unwrap();
        assert_eq!((sum.records, sum.checkpoints), (40, 4));
        // The older file removed: the set starts at a checkpoint, which anchors it.
        let ls = log(40, 10, std::slice::from_ref(&s));
        let sum = verify(std::slice::from_ref(&c), lines(&[ls[10..].to_vec()])).unwrap();
        assert_eq!(
            sum.anchor,
            Anchor::Checkpoint {
                count: 10,
                signed: true
            }
        );
        // Starting elsewhere: the first line is taken as is, the rest checked.
        let sum = verify(&[], lines(&[ls[3..].to_vec()])).unwrap();
        assert_eq!(sum.anchor, Anchor::Unverified);
    }

    #[test]
    fn each_kind_of_tampering_is_found_at_its_line() {
        let (s, c) = keys();
        let cs = std::slice::from_ref(&c);
        let intact = log(30, 10, std::slice::from_ref(&s));

        let mut ls = intact.clone();
        let i = ls[4].iter().position(|b| *b == b'7').unwrap();
        ls[4][i] = b'8';
        let p = first_problem(cs, ls);
        assert_eq!((p.kind, p.line), (ProblemKind::Edited, 5), "{p:?}");

        let mut ls = intact.clone();
        ls.remove(4);
        let p = first_problem(cs, ls);
        assert_eq!((p.kind, p.line), (ProblemKind::Deleted, 5), "{p:?}");

        let mut ls = intact.clone();
        ls.insert(4, intact[7].clone());
        let p = first_problem(cs, ls);
        assert_eq!((p.kind, p.line), (ProblemKind::Inserted, 5), "{p:?}");

        let mut ls = intact.clone();
        ls.swap(4, 5);
        let p = first_problem(cs, ls);
        assert_eq!((p.kind, p.line), (ProblemKind::Reordered, 5), "{p:?}");

        let mut lines = lines(std::slice::from_ref(&intact));
        let last = lines.len() - 1;
        lines[last].bytes.truncate(10);
        lines[last].partial = true;
        let p = verify(cs, lines).unwrap_err();
        assert_eq!(
            (p.kind, p.line),
            (ProblemKind::Truncated, intact.len() as u64)
        );
    }

    /// Rewrites lines from `from` on with a recomputed chain (what a forger without the key can
    /// do).
    fn rechain(ls: &mut [Vec<u8>], from: usize) {
        let mut prev = if from == 0 {
            GENESIS
        } else {
            split(&ls[from - 1]).unwrap().1
        };
        for l in &mut ls[from..] {
            let body = split(l).unwrap().0.to_vec();
            let mut obj = body;
            obj.push(b'}');
            let mut out = Vec::new();
            prev = seal_into(&mut out, &prev, &obj).unwrap();
            out.pop();
            *l = out;
        }
    }

    #[test]
    fn a_forged_checkpoint_and_a_rewritten_chain_are_found() {
        let (s, c) = keys();
        let cs = std::slice::from_ref(&c);
        let intact = log(30, 10, std::slice::from_ref(&s));
        // An edit with the chain recomputed: the next checkpoint no longer matches.
        let mut ls = intact.clone();
        let i = ls[4].iter().position(|b| *b == b'7').unwrap();
        ls[4][i] = b'8';
        rechain(&mut ls, 4);
        let p = first_problem(cs, ls);
        assert_eq!((p.kind, p.line), (ProblemKind::Checkpoint, 11), "{p:?}");
        // A checkpoint signed by another key, chained correctly.
        let (other, _) = keys();
        let mut ls = intact.clone();
        let note = sign_note(
            &NoteBody {
                origin: "test".into(),
                count: 10,
                head: split(&ls[9]).unwrap().1,
            },
            &[other],
        );
        let mut line = checkpoint_object("now", &note);
        line.pop();
        line.pop();
        line.extend_from_slice(b",\"chain\":\"");
        line.extend_from_slice(&GENESIS);
        line.extend_from_slice(b"\"}");
        ls[10] = line;
        rechain(&mut ls, 10);
        let p = first_problem(cs, ls);
        assert_eq!((p.kind, p.line), (ProblemKind::Checkpoint, 11), "{p:?}");
        assert!(p.detail.contains("not signed"), "{p:?}");
        // A signature that does not verify.
        let mut ls = intact.clone();
        let text = String::from_utf8(ls[10].clone()).unwrap();
        let j = text.find('\u{2014}').unwrap() + 30;
        let mut b = text.into_bytes();
        b[j] = if b[j] == b'A' { b'B' } else { b'A' };
        ls[10] = b;
        rechain(&mut ls, 10);
        let p = first_problem(cs, ls);
        assert_eq!((p.kind, p.line), (ProblemKind::Checkpoint, 11), "{p:?}");
        assert!(p.detail.contains("forged"), "{p:?}");
        // A deleted record followed by a recomputed chain: the count no longer matches.
        let mut ls = intact.clone();
        ls.remove(3);
        rechain(&mut ls, 3);
        let p = first_problem(&[], ls);
        assert_eq!((p.kind, p.line), (ProblemKind::Checkpoint, 10), "{p:?}");
    }

    #[test]
    fn a_log_opened_by_a_checkpoint_starts_at_genesis_and_its_first_line_is_checked() {
        let (s, c) = keys();
        let signers = std::slice::from_ref(&s);
        let note = sign_note(
            &NoteBody {
                origin: "test".into(),
                count: 0,
                head: GENESIS,
            },
            signers,
        );
        let mut first = Vec::new();
        let head = seal_into(&mut first, &GENESIS, &checkpoint_object("now", &note)).unwrap();
        first.pop();
        let mut rec = Vec::new();
        seal_into(&mut rec, &head, b"{\"seq\":1}").unwrap();
        rec.pop();
        let ls = vec![first.clone(), rec];
        let sum = verify(std::slice::from_ref(&c), lines(std::slice::from_ref(&ls))).unwrap();
        assert_eq!((sum.anchor, sum.records, sum.tail), (Anchor::Genesis, 1, 1));
        // Its own chain value is checked, although it is the first line.
        let mut bad = ls.clone();
        let n = bad[0].len();
        bad[0][n - 3] = if bad[0][n - 3] == b'0' { b'1' } else { b'0' };
        let p = first_problem(std::slice::from_ref(&c), bad);
        assert_eq!(p.line, 1, "{p:?}");
    }

    #[test]
    fn hmac_checkpoints_verify_only_with_the_key() {
        let s = Signer::hmac(b"0123456789abcdef0123456789abcdef\n").unwrap();
        let ls = log(20, 10, &[s]);
        let good = Checker::hmac(b"0123456789abcdef0123456789abcdef").unwrap();
        let sum = verify(
            std::slice::from_ref(&good),
            lines(std::slice::from_ref(&ls)),
        )
        .unwrap();
        assert_eq!(sum.signatures, 2);
        let bad = Checker::hmac(b"another key, 16 bytes or more").unwrap();
        assert_eq!(first_problem(&[bad], ls).kind, ProblemKind::Checkpoint);
    }

    #[test]
    fn keys_round_trip_and_bad_keys_are_refused() {
        let (private, public) = generate("node-1/audit").unwrap();
        assert!(private.starts_with("PRIVATE+KEY+node-1/audit+"));
        assert!(public.starts_with("node-1/audit+"));
        Signer::parse_ed25519(&format!("{private}\n")).unwrap();
        Checker::parse_verifier(&public).unwrap();
        assert!(Checker::parse_verifier(&public.replace("node-1", "node-2")).is_err());
        assert!(Signer::parse_ed25519(&public).is_err());
        assert!(generate("two words").is_err());
        assert!(Signer::hmac(b"short").is_err());
    }
}
