//! Certificate profiles: what the broker's CA may certify a guest as, and under which rules.
//!
//! ```json
//! "certificates": {
//!   "web": {
//!     "rules": ["web"],
//!     "dns": ["web.internal", "*.web.internal"],
//!     "ip": ["10.0.0.0/8"],
//!     "uri": ["spiffe://example.org/web"],
//!     "usages": ["serverAuth", "clientAuth"],
//!     "max_lifetime_hours": 24
//!   }
//! }
//! ```
//!
//! A `dns` entry is a name, or `*.` and a name: any one label in front of it (never the
//! wildcard itself, never deeper). An `ip` entry is an address or a network (`addr/len`).
//! A `uri` entry is exact. At least one kind of name must be granted; `usages` are
//! `serverAuth` and `clientAuth` (at least one); `max_lifetime_hours` is 1 to
//! [`MAX_LIFETIME_HOURS`] (default [`DEFAULT_LIFETIME_HOURS`]).

use std::net::IpAddr;

use serde_json::Value;

use super::{PolicyError, err, escape, valid_name};

/// The longest lifetime a profile may grant (90 days).
pub const MAX_LIFETIME_HOURS: u64 = 2160;
/// The lifetime of a profile that does not say (one day).
pub const DEFAULT_LIFETIME_HOURS: u64 = 24;
/// Most names of each kind in one profile.
const MAX_ENTRIES: usize = 256;
/// Longest URI.
const MAX_URI: usize = 512;

/// An extended key usage a profile grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Usage {
    /// TLS server (id-kp-serverAuth).
    ServerAuth,
    /// TLS client (id-kp-clientAuth).
    ClientAuth,
}

impl Usage {
    /// The policy keyword.
    pub fn name(self) -> &'static str {
        match self {
            Usage::ServerAuth => "serverAuth",
            Usage::ClientAuth => "clientAuth",
        }
    }
}

/// A checked certificate profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateProfile {
    pub(super) rules: Vec<String>,
    dns: Vec<String>,
    ip: Vec<(IpAddr, u8)>,
    uri: Vec<String>,
    usages: Vec<Usage>,
    max_lifetime_hours: u64,
}

/// A name a certificate request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestedName {
    /// A DNS name.
    Dns(String),
    /// An IP address.
    Ip(IpAddr),
    /// A URI (e.g. a SPIFFE ID).
    Uri(String),
}

impl std::fmt::Display for RequestedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestedName::Dns(n) => write!(f, "DNS name {n:?}"),
            RequestedName::Ip(a) => write!(f, "IP address {a}"),
            RequestedName::Uri(u) => write!(f, "URI {u:?}"),
        }
    }
}

/// A DNS name as certificates carry it: lowercase ASCII labels of letters, digits and
/// hyphens (not at either end), 1 to 63 bytes each, 253 in all, at least two labels.
pub fn valid_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').count() >= 2
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A URI: a scheme (a letter, then letters, digits, `+`, `-`, `.`), `:`, and printable
/// ASCII without spaces, at most 512 bytes.
pub fn valid_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once(':') else {
        return false;
    };
    uri.len() <= MAX_URI
        && !rest.is_empty()
        && scheme
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        && rest.bytes().all(|b| b.is_ascii_graphic())
}

fn network(entry: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match entry.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>().ok()?, l.parse::<u8>().ok()?),
        None => {
            let a = entry.parse::<IpAddr>().ok()?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return None;
    }
    // A network's address has no host bits set (10.0.0.0/8, not 10.1.2.3/8: a likely
    // mistake about what is granted).
    let (bits, width) = bits(addr);
    let host = u32::from(width - len);
    let host_bits = if host >= 128 {
        bits
    } else {
        bits & ((1u128 << host) - 1)
    };
    (host_bits == 0).then_some((addr, len))
}

fn bits(a: IpAddr) -> (u128, u8) {
    match a {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

fn in_network(addr: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    if addr.is_ipv4() != net.is_ipv4() {
        return false;
    }
    let (a, width) = bits(addr);
    let (n, _) = bits(net);
    if len == 0 {
        return true;
    }
    let shift = u32::from(width - len);
    (a >> shift) == (n >> shift)
}

impl CertificateProfile {
    /// Whether the profile grants `name`.
    pub fn permits(&self, name: &RequestedName) -> bool {
        match name {
            RequestedName::Dns(n) => {
                let n = n.to_ascii_lowercase();
                valid_dns_name(&n)
                    && self
                        .dns
                        .iter()
                        .any(|granted| match granted.strip_prefix("*.") {
                            Some(suffix) => n
                                .split_once('.')
                                .is_some_and(|(_, parent)| parent == suffix),
                            None => *granted == n,
                        })
            }
            RequestedName::Ip(a) => self.ip.iter().any(|net| in_network(*a, *net)),
            RequestedName::Uri(u) => valid_uri(u) && self.uri.iter().any(|g| g == u),
        }
    }

    /// The extended key usages granted.
    pub fn usages(&self) -> &[Usage] {
        &self.usages
    }

    /// The longest lifetime granted, in seconds.
    pub fn max_lifetime_secs(&self) -> u64 {
        self.max_lifetime_hours * 3600
    }

    /// The rules that grant it.
    pub fn rules(&self) -> &[String] {
        &self.rules
    }

    /// One line: the names, usages and lifetime granted.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.dns.is_empty() {
            parts.push(format!("dns {}", self.dns.join(", ")));
        }
        if !self.ip.is_empty() {
            let nets: Vec<String> = self.ip.iter().map(|(a, l)| format!("{a}/{l}")).collect();
            parts.push(format!("ip {}", nets.join(", ")));
        }
        if !self.uri.is_empty() {
            parts.push(format!("uri {}", self.uri.join(", ")));
        }
        let usages: Vec<&str> = self.usages.iter().map(|u| u.name()).collect();
        parts.push(format!("usages {}", usages.join(", ")));
        parts.push(format!("at most {} h", self.max_lifetime_hours));
        parts.join("; ")
    }
}

fn strings<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Vec<(String, &'a str)>, PolicyError> {
    let Some(v) = obj.get(key) else {
        return Ok(Vec::new());
    };
    let p = format!("{path}/{key}");
    let list = v
        .as_array()
        .ok_or_else(|| err(&p, "must be an array of strings"))?;
    if list.len() > MAX_ENTRIES {
        return Err(err(&p, format!("at most {MAX_ENTRIES} entries")));
    }
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let ep = format!("{p}/{i}");
            e.as_str()
                .map(|s| (ep.clone(), s))
                .ok_or_else(|| err(&ep, "must be a string"))
        })
        .collect()
}

/// Parses `/certificates/<name>`; `rule_exists` says whether a rule is defined.
pub(super) fn parse_profile(
    name: &str,
    body: &Value,
    rule_exists: impl Fn(&str) -> bool,
) -> Result<CertificateProfile, PolicyError> {
    let path = format!("/certificates/{}", escape(name));
    if !valid_name(name) {
        return Err(err(
            &path,
            "profile names use letters, digits, '.', '_', '-'",
        ));
    }
    let obj = body
        .as_object()
        .ok_or_else(|| err(&path, "a certificate profile is an object"))?;
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "rules" | "dns" | "ip" | "uri" | "usages" | "max_lifetime_hours" | "description"
        ) {
            return Err(err(
                &format!("{path}/{}", escape(key)),
                format!(
                    "unknown field {key:?} (expected rules, dns, ip, uri, usages, max_lifetime_hours, description)"
                ),
            ));
        }
    }
    if obj.get("description").is_some_and(|d| !d.is_string()) {
        return Err(err(&format!("{path}/description"), "must be a string"));
    }
    if !obj.contains_key("rules") {
        return Err(err(
            &format!("{path}/rules"),
            "required: an array of rule names",
        ));
    }
    let mut rules = Vec::new();
    for (p, r) in strings(obj, "rules", &path)? {
        if !rule_exists(r) {
            return Err(err(&p, format!("no rule named {r:?}")));
        }
        rules.push(r.to_string());
    }
    let mut dns = Vec::new();
    for (p, d) in strings(obj, "dns", &path)? {
        let base = d.strip_prefix("*.").unwrap_or(d);
        if !valid_dns_name(base) {
            return Err(err(
                &p,
                "a lowercase DNS name, or \"*.\" and one (any single label in front of it)",
            ));
        }
        dns.push(d.to_string());
    }
    let mut ip = Vec::new();
    for (p, a) in strings(obj, "ip", &path)? {
        ip.push(network(a).ok_or_else(|| err(&p, "an IP address or a network (addr/len)"))?);
    }
    let mut uri = Vec::new();
    for (p, u) in strings(obj, "uri", &path)? {
        if !valid_uri(u) {
            return Err(err(
                &p,
                "a URI (scheme:…, printable ASCII, at most 512 bytes)",
            ));
        }
        uri.push(u.to_string());
    }
    if dns.is_empty() && ip.is_empty() && uri.is_empty() {
        return Err(err(&path, "grants no name: give dns, ip or uri"));
    }
    let mut usages = Vec::new();
    for (p, u) in strings(obj, "usages", &path)? {
        let usage = match u {
            "serverAuth" => Usage::ServerAuth,
            "clientAuth" => Usage::ClientAuth,
            _ => return Err(err(&p, "serverAuth or clientAuth")),
        };
        if !usages.contains(&usage) {
            usages.push(usage);
        }
    }
    if usages.is_empty() {
        return Err(err(
            &format!("{path}/usages"),
            "required: serverAuth, clientAuth or both",
        ));
    }
    usages.sort();
    let max_lifetime_hours = match obj.get("max_lifetime_hours") {
        None => DEFAULT_LIFETIME_HOURS,
        Some(v) => v
            .as_u64()
            .filter(|h| (1..=MAX_LIFETIME_HOURS).contains(h))
            .ok_or_else(|| {
                err(
                    &format!("{path}/max_lifetime_hours"),
                    format!("an integer from 1 to {MAX_LIFETIME_HOURS}"),
                )
            })?,
    };
    Ok(CertificateProfile {
        rules,
        dns,
        ip,
        uri,
        usages,
        max_lifetime_hours,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profile(body: Value) -> Result<CertificateProfile, PolicyError> {
        parse_profile("web", &body, |r| r == "r")
    }

    #[test]
    fn names_are_granted_exactly_or_one_label_deep() {
        let p = profile(json!({
            "rules": ["r"],
            "dns": ["web.internal", "*.svc.internal"],
            "ip": ["10.1.0.0/16", "::1"],
            "uri": ["spiffe://example.org/web"],
            "usages": ["clientAuth", "serverAuth"]
        }))
        .unwrap();
        for (name, granted) in [
            (RequestedName::Dns("web.internal".into()), true),
            (RequestedName::Dns("WEB.internal".into()), true),
            (RequestedName::Dns("a.svc.internal".into()), true),
            (RequestedName::Dns("svc.internal".into()), false),
            (RequestedName::Dns("a.b.svc.internal".into()), false),
            (RequestedName::Dns("*.svc.internal".into()), false),
            (RequestedName::Dns("evil-web.internal".into()), false),
            (RequestedName::Ip("10.1.255.3".parse().unwrap()), true),
            (RequestedName::Ip("10.2.0.1".parse().unwrap()), false),
            (RequestedName::Ip("::1".parse().unwrap()), true),
            (RequestedName::Ip("::2".parse().unwrap()), false),
            (RequestedName::Uri("spiffe://example.org/web".into()), true),
            (
                RequestedName::Uri("spiffe://example.org/web/x".into()),
                false,
            ),
        ] {
            assert_eq!(p.permits(&name), granted, "{name}");
        }
        assert_eq!(p.usages(), &[Usage::ServerAuth, Usage::ClientAuth]);
        assert_eq!(p.max_lifetime_secs(), 24 * 3600);
    }

    #[test]
    fn malformed_profiles_name_their_path() {
        for (body, path) in [
            (
                json!({"dns": ["a.b"], "usages": ["serverAuth"]}),
                "/certificates/web/rules",
            ),
            (
                json!({"rules": ["x"], "dns": ["a.b"], "usages": ["serverAuth"]}),
                "/certificates/web/rules/0",
            ),
            (
                json!({"rules": ["r"], "usages": ["serverAuth"]}),
                "/certificates/web",
            ),
            (
                json!({"rules": ["r"], "dns": ["A.b"], "usages": ["serverAuth"]}),
                "/certificates/web/dns/0",
            ),
            (
                json!({"rules": ["r"], "dns": ["*.*.b"], "usages": ["serverAuth"]}),
                "/certificates/web/dns/0",
            ),
            (
                json!({"rules": ["r"], "ip": ["10.0.0.0/33"], "usages": ["serverAuth"]}),
                "/certificates/web/ip/0",
            ),
            (
                json!({"rules": ["r"], "ip": ["10.1.2.3/8"], "usages": ["serverAuth"]}),
                "/certificates/web/ip/0",
            ),
            (
                json!({"rules": ["r"], "uri": ["no scheme"], "usages": ["serverAuth"]}),
                "/certificates/web/uri/0",
            ),
            (
                json!({"rules": ["r"], "dns": ["a.b"]}),
                "/certificates/web/usages",
            ),
            (
                json!({"rules": ["r"], "dns": ["a.b"], "usages": ["codeSigning"]}),
                "/certificates/web/usages/0",
            ),
            (
                json!({"rules": ["r"], "dns": ["a.b"], "usages": ["serverAuth"], "max_lifetime_hours": 0}),
                "/certificates/web/max_lifetime_hours",
            ),
            (
                json!({"rules": ["r"], "dns": ["a.b"], "usages": ["serverAuth"], "max_lifetime_hours": 2161}),
                "/certificates/web/max_lifetime_hours",
            ),
            (
                json!({"rules": ["r"], "dns": ["a.b"], "usages": ["serverAuth"], "ttl": 1}),
                "/certificates/web/ttl",
            ),
        ] {
            let e = profile(body.clone()).unwrap_err();
            assert_eq!(e.path, path, "{body}: {e}");
        }
    }
}
