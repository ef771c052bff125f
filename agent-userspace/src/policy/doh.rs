//! Well-known public DNS-over-HTTPS / DNS-over-TLS resolver endpoints.
//!
//! An agent that reaches one of these can resolve any name out of the DNS proxy's sight, so:
//! a wildcard host rule never covers an endpoint name (only an exact `host:` does), and a CIDR
//! rule wider than a host route does not open ports 443 and 853 to an endpoint address (only a
//! rule naming the address exactly does). The lists are a speed bump against the common public
//! resolvers, not a complete census: any HTTPS server can relay DNS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Names of public DoH/DoT endpoints (lowercase, no trailing dot).
pub const ENDPOINT_NAMES: &[&str] = &[
    // Google
    "dns.google",
    "dns.google.com",
    "8888.google",
    "dns64.dns.google",
    // Cloudflare
    "cloudflare-dns.com",
    "one.one.one.one",
    "1dot1dot1dot1.cloudflare-dns.com",
    "mozilla.cloudflare-dns.com",
    "chrome.cloudflare-dns.com",
    "security.cloudflare-dns.com",
    "family.cloudflare-dns.com",
    // Quad9
    "dns.quad9.net",
    "dns9.quad9.net",
    "dns10.quad9.net",
    "dns11.quad9.net",
    "dns12.quad9.net",
    // OpenDNS / Cisco Umbrella
    "doh.opendns.com",
    "dns.opendns.com",
    "doh.familyshield.opendns.com",
    "doh.sandbox.opendns.com",
    "dns.umbrella.com",
    // AdGuard
    "dns.adguard-dns.com",
    "unfiltered.adguard-dns.com",
    "family.adguard-dns.com",
    "dns.adguard.com",
    "dns-unfiltered.adguard.com",
    "dns-family.adguard.com",
    // NextDNS (per-profile names are covered by ENDPOINT_DOMAINS)
    "dns.nextdns.io",
    // CleanBrowsing
    "doh.cleanbrowsing.org",
    "security-filter-dns.cleanbrowsing.org",
    "family-filter-dns.cleanbrowsing.org",
    "adult-filter-dns.cleanbrowsing.org",
    // Mullvad
    "doh.mullvad.net",
    "dns.mullvad.net",
    "adblock.dns.mullvad.net",
    "base.dns.mullvad.net",
    "extended.dns.mullvad.net",
    "family.dns.mullvad.net",
    "all.dns.mullvad.net",
    // Alibaba, DNSPod (Tencent), 360
    "dns.alidns.com",
    "doh.pub",
    "dot.pub",
    "sm2.doh.pub",
    "doh.360.cn",
    "dot.360.cn",
    // Control D
    "dns.controld.com",
    "freedns.controld.com",
    // Others in browsers' and stub resolvers' default lists
    "dns0.eu",
    "zero.dns0.eu",
    "kids.dns0.eu",
    "open.dns0.eu",
    "doh.dns.sb",
    "dot.sb",
    "dns.twnic.tw",
    "dns.switch.ch",
    "doh.libredns.gr",
    "dot.libredns.gr",
    "dns.digitale-gesellschaft.ch",
    "doh.applied-privacy.net",
    "dot1.applied-privacy.net",
    "doh.xfinity.com",
    "doh-01.spectrum.com",
    "doh-02.spectrum.com",
    "ordns.he.net",
    "doh.ffmuc.net",
    "dns.njal.la",
];

/// Domains whose every subdomain is an endpoint (per-account resolver names).
pub const ENDPOINT_DOMAINS: &[&str] = &[
    "dns.nextdns.io",
    "cloudflare-gateway.com",
    "dns.controld.com",
];

const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

#[allow(clippy::too_many_arguments)]
const fn v6(a: u16, b: u16, c: u16, d: u16, e: u16, f: u16, g: u16, h: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h))
}

/// Addresses of public DoH/DoT endpoints.
pub const ENDPOINT_ADDRS: &[IpAddr] = &[
    // Cloudflare (1.1.1.1, malware-blocking .2, family .3)
    v4(1, 1, 1, 1),
    v4(1, 0, 0, 1),
    v4(1, 1, 1, 2),
    v4(1, 0, 0, 2),
    v4(1, 1, 1, 3),
    v4(1, 0, 0, 3),
    v6(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1111),
    v6(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1001),
    v6(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1112),
    v6(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1002),
    v6(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1113),
    v6(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1003),
    // Google
    v4(8, 8, 8, 8),
    v4(8, 8, 4, 4),
    v6(0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8888),
    v6(0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8844),
    // Quad9
    v4(9, 9, 9, 9),
    v4(149, 112, 112, 112),
    v4(9, 9, 9, 10),
    v4(149, 112, 112, 10),
    v4(9, 9, 9, 11),
    v4(149, 112, 112, 11),
    v6(0x2620, 0xfe, 0, 0, 0, 0, 0, 0xfe),
    v6(0x2620, 0xfe, 0, 0, 0, 0, 0, 0x9),
    v6(0x2620, 0xfe, 0, 0, 0, 0, 0, 0x10),
    v6(0x2620, 0xfe, 0, 0, 0, 0, 0, 0x11),
    // OpenDNS
    v4(208, 67, 222, 222),
    v4(208, 67, 220, 220),
    v4(208, 67, 222, 123),
    v4(208, 67, 220, 123),
    v6(0x2620, 0x119, 0x35, 0, 0, 0, 0, 0x35),
    v6(0x2620, 0x119, 0x53, 0, 0, 0, 0, 0x53),
    // AdGuard
    v4(94, 140, 14, 14),
    v4(94, 140, 15, 15),
    v4(94, 140, 14, 140),
    v4(94, 140, 14, 141),
    v4(94, 140, 14, 15),
    v4(94, 140, 15, 16),
    v6(0x2a10, 0x50c0, 0, 0, 0, 0, 0xad1, 0xff),
    v6(0x2a10, 0x50c0, 0, 0, 0, 0, 0xad2, 0xff),
    // Alibaba, DNSPod
    v4(223, 5, 5, 5),
    v4(223, 6, 6, 6),
    v6(0x2400, 0x3200, 0, 0, 0, 0, 0, 0x1),
    v6(0x2400, 0x3200, 0xbaba, 0, 0, 0, 0, 0x1),
    v4(1, 12, 12, 12),
    v4(120, 53, 53, 53),
    // CleanBrowsing
    v4(185, 228, 168, 9),
    v4(185, 228, 169, 9),
    v4(185, 228, 168, 168),
    v4(185, 228, 169, 168),
    v6(0x2a0d, 0x2a00, 0x1, 0, 0, 0, 0, 0x2),
    v6(0x2a0d, 0x2a00, 0x2, 0, 0, 0, 0, 0x2),
    // NextDNS (anycast)
    v4(45, 90, 28, 0),
    v4(45, 90, 30, 0),
    v6(0x2a07, 0xa8c0, 0, 0, 0, 0, 0, 0),
    v6(0x2a07, 0xa8c1, 0, 0, 0, 0, 0, 0),
    // Control D
    v4(76, 76, 2, 0),
    v4(76, 76, 10, 0),
    v6(0x2606, 0x1a40, 0, 0, 0, 0, 0, 0),
    v6(0x2606, 0x1a40, 0x1, 0, 0, 0, 0, 0),
    // Mullvad
    v4(194, 242, 2, 2),
    v6(0x2a07, 0xe340, 0, 0, 0, 0, 0, 0x2),
    // dns0.eu, DNS.SB
    v4(193, 110, 81, 0),
    v4(185, 253, 5, 0),
    v4(185, 222, 222, 222),
    v4(45, 11, 45, 11),
];

/// Whether `name` (lowercase, no trailing dot, as `host::normalize_name` gives it) is a
/// well-known DoH/DoT endpoint.
pub fn is_endpoint_name(name: &str) -> bool {
    ENDPOINT_NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
        || ENDPOINT_DOMAINS.iter().any(|d| {
            name.len() > d.len() + 1
                && name.as_bytes()[name.len() - d.len() - 1] == b'.'
                && name[name.len() - d.len()..].eq_ignore_ascii_case(d)
        })
}

/// Whether `addr` is a well-known DoH/DoT endpoint address (IPv4-mapped IPv6 as IPv4).
pub fn is_endpoint_addr(addr: IpAddr) -> bool {
    let addr = match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        a => a,
    };
    ENDPOINT_ADDRS.contains(&addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::host::{normalize_name, HostPattern};

    #[test]
    fn the_lists_are_well_formed() {
        for name in ENDPOINT_NAMES.iter().chain(ENDPOINT_DOMAINS) {
            assert_eq!(normalize_name(name).as_deref(), Some(*name), "{name}");
            assert!(HostPattern::parse(name).unwrap().is_exact(), "{name}");
        }
        let mut addrs = ENDPOINT_ADDRS.to_vec();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), ENDPOINT_ADDRS.len(), "a repeated address");
        let mut names = ENDPOINT_NAMES.to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ENDPOINT_NAMES.len(), "a repeated name");
    }

    #[test]
    fn endpoint_names_and_addresses() {
        assert!(is_endpoint_name("dns.google"));
        assert!(is_endpoint_name("Cloudflare-DNS.com"));
        assert!(is_endpoint_name("abc123.dns.nextdns.io"));
        assert!(is_endpoint_name("team.cloudflare-gateway.com"));
        assert!(!is_endpoint_name("cloudflare-gateway.com"));
        assert!(!is_endpoint_name("google.com"));
        assert!(!is_endpoint_name("xdns.nextdns.io"));
        assert!(is_endpoint_addr("1.1.1.1".parse().unwrap()));
        assert!(is_endpoint_addr("::ffff:8.8.8.8".parse().unwrap()));
        assert!(is_endpoint_addr("2620:fe::fe".parse().unwrap()));
        assert!(!is_endpoint_addr("93.184.216.34".parse().unwrap()));
    }
}
