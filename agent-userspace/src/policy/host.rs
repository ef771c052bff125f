//! Host-name patterns of `host:` / `hosts:` rules, and the name rules they and DNS query names
//! follow.
//!
//! Three forms: `api.example.com` (that name), `*.example.com` (exactly one label more) and
//! `**.example.com` (one label more or any number). Names are compared lowercase, without the
//! trailing dot. A wildcard covers a registrable domain at least: `*.com` is refused.

use std::fmt;
use std::net::IpAddr;

use super::raw::quoted;

/// Longest name in presentation form, without the trailing dot (RFC 1035: 255 octets on the
/// wire).
pub const MAX_NAME_BYTES: usize = 253;
/// Longest label (RFC 1035).
pub const MAX_LABEL_BYTES: usize = 63;

/// One entry of a rule's `hosts`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `api.example.com`: this name only.
    Exact(String),
    /// `*.example.com` (the suffix is stored): exactly one label before the suffix.
    OneLabel(String),
    /// `**.example.com` (the suffix is stored): one or more labels before the suffix.
    AnyDepth(String),
}

impl HostPattern {
    /// Checks and normalizes a pattern as written in a policy (one trailing dot is stripped,
    /// letters are lowercased). The error is the reason.
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let shown = quoted(s);
        if !s.is_ascii() {
            return Err(format!(
                "host {shown} is not ASCII: write IDNs in punycode (xn--...)"
            ));
        }
        let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        if name == "*" || name == "**" {
            return Err(format!(
                "host {shown} would allow every name; list the names or write a wildcard over \
                 a domain (*.example.com)"
            ));
        }
        let (kind, rest): (fn(String) -> HostPattern, &str) =
            if let Some(rest) = name.strip_prefix("**.") {
                (HostPattern::AnyDepth, rest)
            } else if let Some(rest) = name.strip_prefix("*.") {
                (HostPattern::OneLabel, rest)
            } else {
                (HostPattern::Exact, name.as_str())
            };
        if rest.contains('*') {
            return Err(format!(
                "host {shown}: a wildcard may only be the whole first label (*.example.com or \
                 **.example.com)"
            ));
        }
        if is_ip_address(rest) {
            return Err(format!(
                "host {shown} is an IP address; write it as `cidr: {}`",
                rest.trim_start_matches('[').trim_end_matches(']')
            ));
        }
        check_name(rest).map_err(|why| format!("invalid host {shown}: {why}"))?;
        let pattern = kind(rest.to_string());
        if !pattern.is_exact() && rest.split('.').count() < 2 {
            return Err(format!(
                "host {shown}: a wildcard over a top-level domain alone is refused; name the \
                 domain (*.example.{rest})"
            ));
        }
        if !pattern.is_exact() && name.len() > MAX_NAME_BYTES {
            return Err(format!(
                "invalid host {shown}: longer than {MAX_NAME_BYTES} characters"
            ));
        }
        Ok(pattern)
    }

    /// Whether `name` (as [`normalize_name`] gives it: lowercase, no trailing dot) is covered.
    /// Letter case is ignored anyway.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(exact) => name.eq_ignore_ascii_case(exact),
            HostPattern::OneLabel(suffix) => {
                below(name, suffix).is_some_and(|prefix| !prefix.contains('.'))
            }
            HostPattern::AnyDepth(suffix) => below(name, suffix).is_some(),
        }
    }

    /// Whether this is an exact name (no wildcard).
    pub fn is_exact(&self) -> bool {
        matches!(self, HostPattern::Exact(_))
    }
}

/// The labels of `name` before `.suffix`, when there is at least one.
fn below<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = name.len().checked_sub(suffix.len() + 1)?;
    let (prefix, tail) = (name.get(..cut)?, name.get(cut..)?);
    let ok = !prefix.is_empty()
        && !prefix.ends_with('.')
        && tail.as_bytes()[0] == b'.'
        && tail[1..].eq_ignore_ascii_case(suffix);
    ok.then_some(prefix)
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::OneLabel(suffix) => write!(f, "*.{suffix}"),
            HostPattern::AnyDepth(suffix) => write!(f, "**.{suffix}"),
        }
    }
}

/// A query name off the wire in the form patterns compare against: lowercase, without the
/// trailing dot. `None` when it breaks the name rules (empty or overlong labels, characters
/// outside a-z 0-9 '-' '_', a label starting or ending with '-', longer than 253), or is the
/// root.
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    check_name(name).ok()?;
    Some(name.to_ascii_lowercase())
}

/// The label rules; the reason when broken. Letter case is ignored.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("longer than {MAX_NAME_BYTES} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label (..)".into());
        }
        if label.len() > MAX_LABEL_BYTES {
            return Err(format!(
                "label {} is longer than {MAX_LABEL_BYTES} characters",
                quoted(label)
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(if c.is_ascii() {
                format!("character {c:?} is not allowed (a-z, 0-9, '-', '_')")
            } else {
                "not ASCII: write IDNs in punycode (xn--...)".into()
            });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {} starts or ends with '-'", quoted(label)));
        }
    }
    Ok(())
}

/// An address written where a name belongs: `192.0.2.1`, `2001:db8::1`, `[::1]`; also
/// all-numeric dotted names, which resolvers read as IPv4 addresses.
fn is_ip_address(s: &str) -> bool {
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok()
        || (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[track_caller]
    fn refused(s: &str, needle: &str) {
        match HostPattern::parse(s) {
            Ok(p) => panic!("{s:?} parsed as {p:?}"),
            Err(e) => assert!(e.contains(needle), "{s:?}: {e:?} lacks {needle:?}"),
        }
    }

    #[test]
    fn forms_are_normalized_and_shown_as_written() {
        assert_eq!(
            ok("API.Example.com."),
            HostPattern::Exact("api.example.com".into())
        );
        assert_eq!(
            ok("*.example.com"),
            HostPattern::OneLabel("example.com".into())
        );
        assert_eq!(
            ok("**.Example.COM"),
            HostPattern::AnyDepth("example.com".into())
        );
        assert_eq!(
            ok("_dmarc.x-y.example.com").to_string(),
            "_dmarc.x-y.example.com"
        );
        assert_eq!(ok("*.example.com.").to_string(), "*.example.com");
        assert_eq!(ok("**.a.example.com").to_string(), "**.a.example.com");
        assert_eq!(
            ok("xn--bcher-kva.example").to_string(),
            "xn--bcher-kva.example"
        );
        // A single-label exact name is fine (search domains, "localhost").
        assert!(ok("localhost").is_exact());
        assert!(!ok("*.co.uk").is_exact());
        let label = "a".repeat(63);
        ok(&format!("{label}.example.com"));
        let long = format!("{label}.{label}.{label}.{}", "b".repeat(61));
        assert_eq!(long.len(), 253);
        ok(&long);
        ok(&format!("{long}."));
    }

    #[test]
    fn malformed_patterns_are_refused_with_a_reason() {
        refused("*", "every name");
        refused("**", "every name");
        refused("*.", "every name");
        refused("*.com", "top-level domain");
        refused("**.com", "top-level domain");
        refused("api*.x.com", "whole first label");
        refused("a.*.x.com", "whole first label");
        refused("*x.com", "whole first label");
        refused("***.x.com", "whole first label");
        refused("x.com*", "whole first label");
        refused("", "empty name");
        refused(".", "empty name");
        refused("a..b.com", "empty label");
        refused(".a.com", "empty label");
        refused("a.com..", "empty label");
        refused(&format!("{}.com", "a".repeat(64)), "longer than 63");
        let label = "a".repeat(63);
        refused(
            &format!("{label}.{label}.{label}.{}", "b".repeat(62)),
            "longer than 253",
        );
        refused(
            &format!("**.{label}.{label}.{label}.{}", "b".repeat(59)),
            "longer than 253",
        );
        refused("a b.com", "' '");
        refused("a/b.com", "'/'");
        refused("-a.com", "starts or ends with '-'");
        refused("a-.com", "starts or ends with '-'");
        refused("192.0.2.1", "IP address");
        refused("2001:db8::1", "IP address");
        refused("[::1]", "IP address");
        refused("bücher.example", "punycode (xn--...)");
        refused("*.bücher.example", "punycode (xn--...)");
    }

    #[test]
    fn wildcard_depth() {
        let one = ok("*.example.com");
        assert!(one.matches("a.example.com"));
        assert!(one.matches("A.Example.com"));
        assert!(!one.matches("example.com"));
        assert!(!one.matches("a.b.example.com"));
        assert!(!one.matches("aexample.com"));
        assert!(!one.matches(".example.com"));
        assert!(!one.matches("a.example.org"));
        let any = ok("**.example.com");
        assert!(any.matches("a.example.com"));
        assert!(any.matches("a.b.c.example.com"));
        assert!(!any.matches("example.com"));
        assert!(!any.matches("badexample.com"));
        assert!(!any.matches("a.example.com.evil.net"));
        let exact = ok("example.com");
        assert!(exact.matches("example.com"));
        assert!(!exact.matches("a.example.com"));
    }

    #[test]
    fn wire_names_are_normalized_or_refused() {
        assert_eq!(
            normalize_name("WWW.Example.COM.").as_deref(),
            Some("www.example.com")
        );
        assert_eq!(
            normalize_name("_srv._tcp.x.org").as_deref(),
            Some("_srv._tcp.x.org")
        );
        assert_eq!(normalize_name("."), None);
        assert_eq!(normalize_name(""), None);
        assert_eq!(normalize_name("a..b"), None);
        assert_eq!(normalize_name("a b.com"), None);
        assert_eq!(normalize_name("a\0.com"), None);
        assert_eq!(normalize_name("-x.com"), None);
        assert_eq!(normalize_name("ü.com"), None);
        assert_eq!(
            normalize_name(&"a.".repeat(127)).map(|n| n.len()),
            Some(253)
        );
        assert_eq!(normalize_name(&"a.".repeat(128)), None);
    }
}
