//! The grammars of values found throughout the schema: object names, label and annotation
//! keys, IP addresses, CIDRs, MAC addresses, image URLs and checksums.
//!
//! Each check returns the parsed value or the reason it was refused, phrased to follow
//! the field's path: `spec.subnets[0].cidr: 10.0.1.1/24 has host bits set; did you mean
//! 10.0.1.0/24?`. A value that failed to parse is shown in backticks, escaped and
//! shortened, since it can hold anything.

use std::net::IpAddr;

use ipnet::IpNet;

/// The longest DNS-1123 label, and the longest name part of a label key.
pub(super) const LABEL_MAX: usize = 63;
/// The longest DNS-1123 subdomain.
pub(super) const SUBDOMAIN_MAX: usize = 253;

/// A value as messages show it: in backticks, control characters escaped, cut at 64
/// characters.
pub(super) fn shown(value: &str) -> String {
    let mut out = String::from("`");
    for (i, c) in value.chars().enumerate() {
        if i == 64 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('`');
    out
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, of any length.
fn is_label_text(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && is_lower_alnum(b[0])
        && is_lower_alnum(b[b.len() - 1])
        && b.iter().all(|&c| is_lower_alnum(c) || c == b'-')
}

fn too_long(value: &str, max: usize) -> String {
    format!(
        "{} is {} characters long; at most {max} are allowed",
        shown(value),
        value.chars().count()
    )
}

/// A DNS-1123 label: at most 63 lower-case letters, digits and '-', starting and ending
/// with a letter or digit. Most object names, and every reference to them.
pub(super) fn dns_label(value: &str) -> Result<(), String> {
    if !is_label_text(value) {
        return Err(format!(
            "{} is not a DNS-1123 label: lower-case letters, digits and '-', starting and \
             ending with a letter or digit",
            shown(value)
        ));
    }
    if value.len() > LABEL_MAX {
        return Err(too_long(value, LABEL_MAX));
    }
    Ok(())
}

/// A DNS-1123 subdomain: at most 253 characters of dot-separated DNS-1123 labels
/// (`m1.tiny`). As in Kubernetes, the parts are not limited to 63 characters each.
pub(super) fn dns_subdomain(value: &str) -> Result<(), String> {
    if !value.split('.').all(is_label_text) {
        return Err(format!(
            "{} is not a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', each \
             dot-separated part starting and ending with a letter or digit",
            shown(value)
        ));
    }
    if value.len() > SUBDOMAIN_MAX {
        return Err(too_long(value, SUBDOMAIN_MAX));
    }
    Ok(())
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, the name part of a key and a label value.
fn is_key_name_text(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

const KEY_NAME_RULE: &str =
    "letters, digits, '-', '_' and '.', starting and ending with a letter or digit";

/// A Kubernetes qualified name: an optional DNS-1123 subdomain prefix and '/', then a
/// name of at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter
/// or digit. Label and annotation keys, finalizers, extra specs.
pub(super) fn qualified_name(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let (prefix, name) = match value.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, value),
    };
    if let Some(prefix) = prefix {
        if name.contains('/') {
            return Err(format!("{} has more than one '/'", shown(value)));
        }
        if prefix.is_empty() {
            return Err(format!("{} has an empty prefix before '/'", shown(value)));
        }
        if !prefix.split('.').all(is_label_text) || prefix.len() > SUBDOMAIN_MAX {
            return Err(format!(
                "prefix {} is not a DNS-1123 subdomain",
                shown(prefix)
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("{} has an empty name", shown(value)));
    }
    if !is_key_name_text(name) {
        return Err(format!(
            "name {} is not valid: {KEY_NAME_RULE}",
            shown(name)
        ));
    }
    if name.len() > LABEL_MAX {
        return Err(too_long(name, LABEL_MAX));
    }
    Ok(())
}

/// A label value: empty, or at most 63 letters, digits, '-', '_' and '.', starting and
/// ending with a letter or digit.
pub(super) fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    if !is_key_name_text(value) {
        return Err(format!("{} is not valid: {KEY_NAME_RULE}", shown(value)));
    }
    if value.len() > LABEL_MAX {
        return Err(too_long(value, LABEL_MAX));
    }
    Ok(())
}

/// An IPv4 or IPv6 address, without prefix length or zone.
pub(super) fn ip(value: &str) -> Result<IpAddr, String> {
    value
        .parse()
        .map_err(|_| format!("{} is not an IP address", shown(value)))
}

/// A CIDR whose host bits are zero: `10.0.1.0/24`, `fd00:1::/64`.
pub(super) fn cidr(value: &str) -> Result<IpNet, String> {
    let net: IpNet = match value.parse() {
        Ok(net) => net,
        Err(_) if value.parse::<IpAddr>().is_ok() => {
            return Err(format!(
                "{} lacks a prefix length (`/24`, `/32`, `/64`, …)",
                shown(value)
            ));
        }
        Err(_) => {
            return Err(format!(
                "{} is not a CIDR like 10.0.1.0/24 or fd00:1::/64",
                shown(value)
            ));
        }
    };
    if net.trunc() != net {
        return Err(format!(
            "{net} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// `IPv4` or `IPv6`, as the schema spells the families.
pub(super) fn family(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// An address as a number, for range arithmetic within one family.
pub(super) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

/// The address `offset` after the network address of `net`, if it is inside `net`.
pub(super) fn nth_address(net: &IpNet, offset: u128) -> Option<IpAddr> {
    let base = to_u128(net.network());
    let value = base.checked_add(offset)?;
    let ip = match net {
        IpNet::V4(_) => IpAddr::V4(u32::try_from(value).ok()?.into()),
        IpNet::V6(_) => IpAddr::V6(value.into()),
    };
    net.contains(&ip).then_some(ip)
}

/// A MAC address, `aa:bb:cc:dd:ee:ff`, lower case.
pub(super) fn mac(value: &str) -> Result<[u8; 6], String> {
    let invalid = || {
        format!(
            "{} is not a MAC address like fa:16:3e:00:00:01",
            shown(value)
        )
    };
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() != 6 {
        return Err(invalid());
    }
    let mut octets = [0u8; 6];
    for (octet, part) in octets.iter_mut().zip(&parts) {
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        *octet = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if value.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "{} must be written in lower case: {}",
            shown(value),
            value.to_ascii_lowercase()
        ));
    }
    Ok(octets)
}

/// A MAC address a NIC may own: unicast and not all zeros.
pub(super) fn unicast_mac(value: &str) -> Result<[u8; 6], String> {
    let octets = mac(value)?;
    if octets[0] & 1 == 1 {
        return Err(format!(
            "{value} is a multicast address (the first octet's low bit is set)"
        ));
    }
    if octets == [0; 6] {
        return Err(format!("{value} is the all-zero address"));
    }
    Ok(octets)
}

/// An image URL: `file:///absolute/path`, `http://host/…` or `https://host/…`.
pub(super) fn image_url(value: &str) -> Result<(), String> {
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{} contains whitespace or control characters",
            shown(value)
        ));
    }
    let Some((scheme, rest)) = value.split_once("://") else {
        return Err(format!(
            "{} is not a URL like file:///path, http://host/path or https://host/path",
            shown(value)
        ));
    };
    match scheme {
        "file" => {
            if !rest.starts_with('/') || rest.len() < 2 {
                return Err(format!(
                    "{} is not a file URL with an absolute path, like file:///var/lib/ferro/images/disk.raw",
                    shown(value)
                ));
            }
        }
        "http" | "https" => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if host.is_empty() {
                return Err(format!("{} has no host", shown(value)));
            }
        }
        // Bytes uploaded through the API (`ferro image upload`); see `crate::images`.
        "ferro" if value == crate::images::UPLOAD_URL => {}
        _ => {
            return Err(format!(
                "{} has scheme {}; use file, http or https (or ferro://upload for uploaded bytes)",
                shown(value),
                shown(scheme)
            ));
        }
    }
    Ok(())
}

/// An expected checksum: `sha256:` and 64 lower-case hex digits.
pub(super) fn sha256_checksum(value: &str) -> Result<(), String> {
    let valid = value.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{} is not `sha256:` followed by 64 lower-case hex digits",
            shown(value)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "web-1", "0", "a-b-c", &"a".repeat(63)] {
            assert_eq!(dns_label(ok), Ok(()), "{ok}");
        }
        let rule = "is not a DNS-1123 label: lower-case letters, digits and '-', starting and \
                    ending with a letter or digit";
        for bad in ["", "Web", "web_1", "-a", "a-", "a.b", "é", "a b"] {
            assert_eq!(dns_label(bad), Err(format!("`{bad}` {rule}")), "{bad}");
        }
        assert_eq!(
            dns_label(&"a".repeat(64)),
            Err(format!(
                "`{}` is 64 characters long; at most 63 are allowed",
                "a".repeat(64)
            ))
        );
    }

    #[test]
    fn dns_subdomains() {
        for ok in [
            "m1.tiny",
            "a",
            "a.b.c",
            &"a".repeat(100),
            &format!("{}b", "a.".repeat(126)),
        ] {
            assert_eq!(dns_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "M1.tiny", "a_b"] {
            assert!(
                dns_subdomain(bad)
                    .unwrap_err()
                    .ends_with("is not a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit"),
                "{bad}"
            );
        }
        assert!(
            dns_subdomain(&"a".repeat(254))
                .unwrap_err()
                .ends_with("is 254 characters long; at most 253 are allowed")
        );
    }

    #[test]
    fn qualified_names() {
        for ok in [
            "app",
            "App_1.x",
            "ferro.io/ports",
            "aggregate/ssd",
            "a/B",
            &"x".repeat(63),
        ] {
            assert_eq!(qualified_name(ok), Ok(()), "{ok}");
        }
        let cases = [
            ("", "must not be empty"),
            ("a/b/c", "`a/b/c` has more than one '/'"),
            ("/a", "`/a` has an empty prefix before '/'"),
            (
                "Ferro.io/a",
                "prefix `Ferro.io` is not a DNS-1123 subdomain",
            ),
            ("ferro.io/", "`ferro.io/` has an empty name"),
            (
                "a b",
                "name `a b` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
            ),
            (
                "_a",
                "name `_a` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
            ),
        ];
        for (value, want) in cases {
            assert_eq!(qualified_name(value), Err(want.to_owned()), "{value}");
        }
        assert!(
            qualified_name(&format!("p/{}", "x".repeat(64)))
                .unwrap_err()
                .ends_with("is 64 characters long; at most 63 are allowed")
        );
    }

    #[test]
    fn label_values() {
        for ok in ["", "true", "Web_1.x", &"v".repeat(63)] {
            assert_eq!(label_value(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            label_value("a b"),
            Err("`a b` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit".into())
        );
        assert!(label_value(&"v".repeat(64)).is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(cidr("10.0.1.0/24").unwrap().to_string(), "10.0.1.0/24");
        assert_eq!(cidr("fd00:1::/64").unwrap().to_string(), "fd00:1::/64");
        let cases = [
            (
                "10.0.1.1/24",
                "10.0.1.1/24 has host bits set; did you mean 10.0.1.0/24?",
            ),
            (
                "fd00:1::5/64",
                "fd00:1::5/64 has host bits set; did you mean fd00:1::/64?",
            ),
            (
                "10.0.1.5",
                "`10.0.1.5` lacks a prefix length (`/24`, `/32`, `/64`, …)",
            ),
            (
                "10.0.1.0/33",
                "`10.0.1.0/33` is not a CIDR like 10.0.1.0/24 or fd00:1::/64",
            ),
            ("", "`` is not a CIDR like 10.0.1.0/24 or fd00:1::/64"),
        ];
        for (value, want) in cases {
            assert_eq!(cidr(value).unwrap_err(), want, "{value}");
        }
    }

    #[test]
    fn ips() {
        assert!(ip("10.0.0.1").is_ok());
        assert!(ip("fd00::1").is_ok());
        for bad in [
            "10.0.0.256",
            "10.0.0.1/32",
            "fe80::1%eth0",
            "010.0.0.1",
            " 10.0.0.1",
        ] {
            assert_eq!(
                ip(bad).unwrap_err(),
                format!("`{bad}` is not an IP address")
            );
        }
    }

    #[test]
    fn nth_addresses_stay_inside_the_network() {
        let net: IpNet = "10.0.0.0/30".parse().unwrap();
        assert_eq!(nth_address(&net, 1), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(nth_address(&net, 4), None);
        let all: IpNet = "::/0".parse().unwrap();
        assert_eq!(
            nth_address(&all, u128::MAX),
            Some("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap())
        );
        let last: IpNet = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"
            .parse()
            .unwrap();
        assert_eq!(nth_address(&last, 1), None);
    }

    #[test]
    fn macs() {
        assert_eq!(
            unicast_mac("fa:16:3e:00:00:01"),
            Ok([0xfa, 0x16, 0x3e, 0, 0, 1])
        );
        let cases = [
            (
                "fa:16:3e:00:00",
                "`fa:16:3e:00:00` is not a MAC address like fa:16:3e:00:00:01",
            ),
            (
                "fa-16-3e-00-00-01",
                "`fa-16-3e-00-00-01` is not a MAC address like fa:16:3e:00:00:01",
            ),
            (
                "fa:16:3e:00:00:0g",
                "`fa:16:3e:00:00:0g` is not a MAC address like fa:16:3e:00:00:01",
            ),
            (
                "fa:16:3e:00:00:+1",
                "`fa:16:3e:00:00:+1` is not a MAC address like fa:16:3e:00:00:01",
            ),
            (
                "FA:16:3E:00:00:01",
                "`FA:16:3E:00:00:01` must be written in lower case: fa:16:3e:00:00:01",
            ),
            (
                "01:00:5e:00:00:01",
                "01:00:5e:00:00:01 is a multicast address (the first octet's low bit is set)",
            ),
            (
                "00:00:00:00:00:00",
                "00:00:00:00:00:00 is the all-zero address",
            ),
        ];
        for (value, want) in cases {
            assert_eq!(unicast_mac(value).unwrap_err(), want, "{value}");
        }
    }

    #[test]
    fn image_urls() {
        for ok in [
            "file:///var/lib/ferro/images/tiny.raw",
            "http://mirror/debian.qcow2",
            "https://example.org:8443/a?b",
            "ferro://upload",
        ] {
            assert_eq!(image_url(ok), Ok(()), "{ok}");
        }
        let cases = [
            (
                "/var/lib/x",
                "`/var/lib/x` is not a URL like file:///path, http://host/path or https://host/path",
            ),
            (
                "file://host/x",
                "`file://host/x` is not a file URL with an absolute path, like file:///var/lib/ferro/images/disk.raw",
            ),
            (
                "file:///",
                "`file:///` is not a file URL with an absolute path, like file:///var/lib/ferro/images/disk.raw",
            ),
            ("https:///x", "`https:///x` has no host"),
            (
                "ftp://host/x",
                "`ftp://host/x` has scheme `ftp`; use file, http or https (or ferro://upload for uploaded bytes)",
            ),
            (
                "HTTP://host/x",
                "`HTTP://host/x` has scheme `HTTP`; use file, http or https (or ferro://upload for uploaded bytes)",
            ),
            (
                "http://host/a b",
                "`http://host/a b` contains whitespace or control characters",
            ),
        ];
        for (value, want) in cases {
            assert_eq!(image_url(value).unwrap_err(), want, "{value}");
        }
    }

    #[test]
    fn checksums() {
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(sha256_checksum(&format!("sha256:{hex}")), Ok(()));
        for bad in [
            hex.clone(),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", &hex[1..]),
            format!("md5:{hex}"),
        ] {
            assert!(
                sha256_checksum(&bad)
                    .unwrap_err()
                    .ends_with("is not `sha256:` followed by 64 lower-case hex digits"),
                "{bad}"
            );
        }
    }

    #[test]
    fn shown_escapes_and_shortens() {
        assert_eq!(shown("a\nb"), "`a\\nb`");
        assert_eq!(shown(&"é".repeat(70)), format!("`{}…`", "é".repeat(64)));
    }
}
