//! The URL guard: owns the decision whether a URL, or an address a host name resolved to,
//! may be fetched. Image URLs come from KIE callbacks whose signature does not cover the
//! body, so every URL is untrusted input; the guard keeps the daemon from being pointed at
//! loopback, the private network or a cloud metadata endpoint, on the first request and
//! on every redirect hop and DNS answer. It must not do I/O other than DNS resolution.
//!
//! Three places apply it, and together they cover every way a connection can be made:
//! [`UrlGuard::check_url`] before the first request (scheme, credentials, host allow-list,
//! IP-literal hosts), [`UrlGuard::redirect_policy`] on every redirect hop (the same check,
//! at most [`MAX_REDIRECTS`] hops), and [`GuardedResolver`] on every DNS answer (addresses
//! refused before any connection is made). The HTTP client must not use a proxy, since the
//! resolver would then check the proxy's address and not the target's.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::Policy;
use url::{Host, Url};

use crate::config::DownloadConfig;

/// Redirect hops followed before a fetch is refused.
pub const MAX_REDIRECTS: usize = 5;

/// Why a URL or address may not be fetched: a short human reason such as
/// "refused URL: host 10.0.0.1 is a private address". Never contains a query string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The fetch policy from `[download]`: allowed schemes, hosts and address ranges.
#[derive(Debug, Clone)]
pub struct UrlGuard {
    allow_http: bool,
    /// Lower-cased; empty means any host.
    allowed_hosts: Vec<String>,
    allow_private_networks: bool,
    /// Allowed even when private networks are refused (tests serve from loopback).
    trusted_addrs: Vec<IpAddr>,
}

impl UrlGuard {
    pub fn new(cfg: &DownloadConfig) -> UrlGuard {
        UrlGuard {
            allow_http: cfg.allow_http,
            allowed_hosts: cfg
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            allow_private_networks: cfg.allow_private_networks,
            trusted_addrs: Vec::new(),
        }
    }

    /// Addresses that pass [`check_addr`](Self::check_addr) even when private networks are
    /// refused. For tests: a fake served from 127.0.0.1 can then prove that a redirect to
    /// 127.0.0.2 or 10.0.0.1 is still refused.
    pub fn with_trusted_addrs(mut self, addrs: Vec<IpAddr>) -> Self {
        self.trusted_addrs = addrs;
        self
    }

    /// Checks everything that can be decided from the URL alone: scheme (https; http only
    /// with `allow_http`), no credentials, host in `allowed_hosts` when that is non-empty,
    /// and the address itself when the host is an IP literal. Host names are checked again
    /// after resolution by [`GuardedResolver`].
    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(refused_url(
                    "plain http is not allowed (download.allow_http is off)",
                ));
            }
            other => return Err(refused_url(&format!("scheme {other} is not allowed"))),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refused_url("credentials in the URL are not allowed"));
        }
        let host = url.host().ok_or_else(|| refused_url("no host"))?;
        let ip = match host {
            Host::Domain(_) => None,
            Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        };
        // `Url` lower-cases domains of http(s) URLs; IPv6 hosts carry brackets in host_str.
        let host_name = match ip {
            Some(ip) => ip.to_string(),
            None => url.host_str().unwrap_or_default().to_ascii_lowercase(),
        };
        // An IPv6 entry may be written with or without brackets in the config; `*.domain`
        // lists the domain's subdomains (never an IP literal, never the domain itself).
        let listed = |h: &String| match h.strip_prefix("*.") {
            Some(domain) => {
                ip.is_none()
                    && host_name
                        .strip_suffix(domain)
                        .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
            }
            None => h.trim_start_matches('[').trim_end_matches(']') == host_name,
        };
        if !self.allowed_hosts.is_empty() && !self.allowed_hosts.iter().any(listed) {
            return Err(refused_url(&format!(
                "host {host_name} is not in download.allowed_hosts"
            )));
        }
        if let Some(ip) = ip
            && let Some(class) = self.refused_class(ip)
        {
            return Err(refused_url(&format!("host {ip} is {class} address")));
        }
        Ok(())
    }

    /// Refuses loopback, private, link-local, unique-local, shared (CGNAT), multicast,
    /// unspecified, broadcast, documentation and reserved addresses, including their
    /// IPv4-mapped, IPv4-compatible, SIIT, NAT64, 6to4 and Teredo IPv6 forms, unless
    /// `allow_private_networks` is set or the address is trusted.
    pub fn check_addr(&self, ip: IpAddr) -> Result<(), Refused> {
        match self.refused_class(ip) {
            None => Ok(()),
            Some(class) => Err(Refused(format!("refused address: {ip} is {class} address"))),
        }
    }

    fn refused_class(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow_private_networks
            || self.trusted_addrs.contains(&ip)
            || self.trusted_addrs.contains(&ip.to_canonical())
        {
            return None;
        }
        non_public_class(ip)
    }

    /// A redirect policy that re-runs [`check_url`](Self::check_url) on every hop and stops
    /// after [`MAX_REDIRECTS`] hops.
    pub fn redirect_policy(&self) -> Policy {
        let guard = self.clone();
        Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                let reason = format!("refused URL: more than {MAX_REDIRECTS} redirects");
                return attempt.error(Refused(reason));
            }
            match guard.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(refused) => attempt.error(Refused(format!("{refused} (redirect target)"))),
            }
        })
    }

    /// A DNS resolver for `ClientBuilder::dns_resolver` that drops refused addresses.
    pub fn resolver(&self) -> GuardedResolver {
        GuardedResolver {
            guard: Arc::new(self.clone()),
        }
    }
}

fn refused_url(reason: &str) -> Refused {
    Refused(format!("refused URL: {reason}"))
}

/// Resolves with tokio's `lookup_host` and keeps only the addresses the guard allows; fails
/// with a [`Refused`] error when none remain, so a host name that resolves to a private
/// address never gets a connection.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    guard: Arc<UrlGuard>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let mut allowed: Vec<SocketAddr> = Vec::new();
            let mut refused: BTreeSet<String> = BTreeSet::new();
            for addr in resolved {
                match guard.refused_class(addr.ip()) {
                    None => allowed.push(addr),
                    Some(class) => {
                        refused.insert(format!("{} is {class} address", addr.ip()));
                    }
                }
            }
            if allowed.is_empty() {
                let reason = if refused.is_empty() {
                    format!("refused URL: {host} resolved to no address")
                } else {
                    let list: Vec<String> = refused.into_iter().collect();
                    format!(
                        "refused URL: all addresses of {host} are refused: {}",
                        list.join(", ")
                    )
                };
                return Err(Box::new(Refused(reason)) as Box<dyn std::error::Error + Send + Sync>);
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The class of a non-public address, with its article ("a private"), or `None` for a
/// public one.
fn non_public_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if o[0] == 0 {
        Some("an unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("a loopback")
    } else if ip.is_private() {
        Some("a private")
    } else if ip.is_link_local() {
        Some("a link-local")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("a shared (CGNAT)")
    } else if ip.is_broadcast() {
        Some("a broadcast")
    } else if ip.is_multicast() {
        Some("a multicast")
    } else if ip.is_documentation() {
        Some("a documentation")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("a reserved (192.0.0.0/24)")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("a benchmarking (198.18.0.0/15)")
    } else if o[0] >= 240 {
        Some("a reserved (240.0.0.0/4)")
    } else {
        None
    }
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        Some("an unspecified")
    } else if ip.is_loopback() {
        Some("a loopback")
    } else if let Some(embedded) = embedded_v4(ip) {
        // Classified by the IPv4 address(es) it stands for: refused if any is non-public.
        embedded.into_iter().flatten().find_map(non_public_v4)
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        Some("a local-use NAT64")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("a link-local")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("a site-local")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("a unique-local")
    } else if (s[0] & 0xff00) == 0xff00 {
        Some("a multicast")
    } else if (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] <= 0x0fff) {
        Some("a documentation")
    } else if s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0 {
        Some("a discard-only")
    } else {
        None
    }
}

/// The IPv4 address(es) an IPv6 address stands for, when it is one of the forms that
/// carry one and reach it through a translator or tunnel:
/// - IPv4-mapped `::ffff:a.b.c.d` and IPv4-compatible `::a.b.c.d`;
/// - SIIT's IPv4-translated `::ffff:0:a.b.c.d` (RFC 6145, RFC 2765);
/// - the well-known NAT64 prefix `64:ff9b::a.b.c.d` (RFC 6052);
/// - 6to4 `2002:AABB:CCDD::/48` (RFC 3056);
/// - Teredo `2001:0:SSSS:SSSS:…:CCCC:CCCC` (RFC 4380): the server's address, and the
///   client's, stored inverted in the last 32 bits.
///
/// NAT64 with a network-specific prefix cannot be told from a public address; the local-use
/// prefix `64:ff9b:1::/48` (RFC 8215) is refused as a whole by [`non_public_v6`].
fn embedded_v4(ip: Ipv6Addr) -> Option<[Option<Ipv4Addr>; 2]> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some([Some(v4), None]);
    }
    let s = ip.segments();
    let o = ip.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..6] == [0, 0, 0, 0, 0, 0]
        || s[..6] == [0, 0, 0, 0, 0xffff, 0]
        || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        Some([Some(last), None])
    } else if s[0] == 0x2002 {
        Some([Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])), None])
    } else if s[0] == 0x2001 && s[1] == 0 {
        let server = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
        let client = Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]);
        Some([Some(server), Some(client)])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(allow_http: bool, hosts: &[&str], allow_private: bool) -> DownloadConfig {
        DownloadConfig {
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            allow_http,
            allow_private_networks: allow_private,
            ..crate::config::Config::default().download
        }
    }

    fn strict() -> UrlGuard {
        UrlGuard::new(&cfg(false, &[], false))
    }

    #[test]
    fn check_addr_table() {
        // (address, refused by the strict guard, expected words in the reason)
        let table: &[(&str, bool, &str)] = &[
            ("8.8.8.8", false, ""),
            ("1.1.1.1", false, ""),
            ("172.32.0.1", false, ""),
            ("100.128.0.1", false, ""),
            ("2606:4700::1111", false, ""),
            ("::ffff:8.8.8.8", false, ""),
            ("127.0.0.1", true, "loopback"),
            ("127.0.0.2", true, "loopback"),
            ("10.0.0.1", true, "private"),
            ("172.16.0.1", true, "private"),
            ("172.31.255.255", true, "private"),
            ("192.168.1.1", true, "private"),
            ("169.254.169.254", true, "link-local"),
            ("169.254.0.1", true, "link-local"),
            ("100.64.0.1", true, "CGNAT"),
            ("100.127.255.255", true, "CGNAT"),
            ("224.0.0.1", true, "multicast"),
            ("239.255.255.250", true, "multicast"),
            ("0.0.0.0", true, "unspecified"),
            ("0.1.2.3", true, "unspecified"),
            ("255.255.255.255", true, "broadcast"),
            ("192.0.2.1", true, "documentation"),
            ("198.51.100.1", true, "documentation"),
            ("203.0.113.1", true, "documentation"),
            ("192.0.0.8", true, "reserved"),
            ("198.18.0.1", true, "benchmarking"),
            ("240.0.0.1", true, "reserved"),
            ("::1", true, "loopback"),
            ("::", true, "unspecified"),
            ("fe80::1", true, "link-local"),
            ("febf::1", true, "link-local"),
            ("fec0::1", true, "site-local"),
            ("fc00::1", true, "unique-local"),
            ("fd12:3456::1", true, "unique-local"),
            ("ff02::1", true, "multicast"),
            ("2001:db8::1", true, "documentation"),
            ("3fff::1", true, "documentation"),
            ("100::1", true, "discard-only"),
            ("64:ff9b:1::1", true, "NAT64"),
            ("::ffff:127.0.0.1", true, "loopback"),
            ("::ffff:10.0.0.1", true, "private"),
            ("::ffff:169.254.169.254", true, "link-local"),
            ("::127.0.0.1", true, "loopback"),
            ("::10.1.2.3", true, "private"),
            ("64:ff9b::127.0.0.1", true, "loopback"),
            ("64:ff9b::a9fe:a9fe", true, "link-local"),
            ("2002:7f00:1::", true, "loopback"),
            ("2002:c0a8:101::1", true, "private"),
            ("2002:a00:1::1", true, "private"),
            ("2002:808:808::1", false, ""),
            // SIIT's IPv4-translated form (RFC 6145 / RFC 2765): ::ffff:0:a.b.c.d.
            ("::ffff:0:127.0.0.1", true, "loopback"),
            ("::ffff:0:10.0.0.1", true, "private"),
            ("::ffff:0:169.254.169.254", true, "link-local"),
            ("::ffff:0:8.8.8.8", false, ""),
            // Well-known NAT64 prefix (RFC 6052) with a private or a public IPv4 inside.
            ("64:ff9b::10.0.0.1", true, "private"),
            ("64:ff9b::192.168.0.1", true, "private"),
            ("64:ff9b::8.8.8.8", false, ""),
            // Teredo (RFC 4380): server IPv4 in bits 32..64, client IPv4 inverted in the
            // last 32 bits.
            ("2001:0:4136:e378:8000:63bf:f5ff:fffe", true, "private"),
            ("2001:0:a00:1:8000:63bf:f7f7:f7f7", true, "private"),
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", true, "loopback"),
            ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", false, ""),
        ];
        let open = UrlGuard::new(&cfg(false, &[], true));
        for &(addr, refused, words) in table {
            let ip: IpAddr = addr.parse().expect(addr);
            match strict().check_addr(ip) {
                Ok(()) => assert!(!refused, "{addr} should be refused"),
                Err(Refused(reason)) => {
                    assert!(refused, "{addr} should be allowed, got {reason}");
                    assert!(reason.contains(words), "{addr}: {reason} lacks {words}");
                    assert!(
                        reason.contains(&ip.to_string()),
                        "{addr}: {reason} lacks the address"
                    );
                }
            }
            assert_eq!(
                open.check_addr(ip),
                Ok(()),
                "{addr} with private networks allowed"
            );
        }
    }

    #[test]
    fn trusted_addrs_pass_only_themselves() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let guard = strict().with_trusted_addrs(vec![lo]);
        assert_eq!(guard.check_addr(lo), Ok(()));
        assert_eq!(
            guard.check_addr("::ffff:127.0.0.1".parse().unwrap()),
            Ok(())
        );
        assert!(guard.check_addr("127.0.0.2".parse().unwrap()).is_err());
        assert!(guard.check_addr("10.0.0.1".parse().unwrap()).is_err());
        assert!(guard.check_addr("::1".parse().unwrap()).is_err());
    }

    #[test]
    fn check_url_table() {
        let any = cfg(true, &[], false);
        let https_only = cfg(false, &[], false);
        let listed = cfg(false, &["tempfile.aiquickdraw.com", "203.0.113.7"], true);
        // (config, URL, None = allowed / Some(words in the reason))
        let table: Vec<(&DownloadConfig, &str, Option<&str>)> = vec![
            (
                &https_only,
                "https://tempfile.aiquickdraw.com/s/a.png",
                None,
            ),
            (&https_only, "https://8.8.8.8/a.png", None),
            (&https_only, "https://[2606:4700::1111]/a.png", None),
            (&https_only, "http://example.com/a.png", Some("plain http")),
            (&any, "http://example.com/a.png", None),
            (&any, "file:///etc/passwd", Some("scheme file")),
            (&any, "ftp://example.com/a.png", Some("scheme ftp")),
            (
                &any,
                "data:image/png;base64,iVBORw0KGgo=",
                Some("scheme data"),
            ),
            (&any, "gopher://example.com/", Some("scheme gopher")),
            (
                &any,
                "https://user:pw@example.com/a.png",
                Some("credentials"),
            ),
            (&any, "https://user@example.com/a.png", Some("credentials")),
            (
                &any,
                "https://10.0.0.1/x.png",
                Some("host 10.0.0.1 is a private address"),
            ),
            (
                &any,
                "http://169.254.169.254/latest/meta-data",
                Some("link-local"),
            ),
            (&any, "http://127.0.0.1:8080/a.png", Some("loopback")),
            (&any, "http://[::1]/a.png", Some("loopback")),
            (&any, "http://[::ffff:127.0.0.1]/a.png", Some("loopback")),
            (&any, "http://[fe80::1]/a.png", Some("link-local")),
            (&any, "http://0x7f.1/a.png", Some("loopback")),
            (&any, "http://2130706433/a.png", Some("loopback")),
            (&any, "http://localhost/a.png", None), // a name: the resolver decides
            (&listed, "https://tempfile.aiquickdraw.com/s/a.png", None),
            (&listed, "https://TEMPFILE.AIQUICKDRAW.COM/s/a.png", None),
            (&listed, "https://203.0.113.7/a.png", None),
            (
                &listed,
                "https://evil.example/a.png",
                Some("not in download.allowed_hosts"),
            ),
            (
                &listed,
                "https://tempfile.aiquickdraw.com.evil.example/a",
                Some("allowed_hosts"),
            ),
            (
                &listed,
                "https://sub.tempfile.aiquickdraw.com/a",
                Some("allowed_hosts"),
            ),
        ];
        for (cfg, url, expected) in table {
            let parsed = Url::parse(url).expect(url);
            let got = UrlGuard::new(cfg).check_url(&parsed);
            match (got, expected) {
                (Ok(()), None) => {}
                (Err(Refused(reason)), Some(words)) => {
                    assert!(reason.starts_with("refused URL: "), "{url}: {reason}");
                    assert!(reason.contains(words), "{url}: {reason} lacks {words}");
                }
                (got, expected) => panic!("{url}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    /// `*.domain` lists the subdomains of a domain: not the domain itself, not a longer
    /// name that merely ends the same way, not an IP literal.
    #[test]
    fn wildcard_entries_list_subdomains_only() {
        let wild = cfg(false, &["*.aiquickdraw.com", "*.kie.ai"], false);
        let guard = UrlGuard::new(&wild);
        for (url, allowed) in [
            ("https://tempfile.aiquickdraw.com/a.png", true),
            ("https://file.aiquickdraw.com/s/vocal.mp3", true),
            ("https://a.b.aiquickdraw.com/x.wav", true),
            ("https://MUSICFILE.KIE.AI/t.jpeg", true),
            ("https://aiquickdraw.com/a.png", false),
            ("https://evilaiquickdraw.com/a.png", false),
            ("https://kie.ai.evil.example/a.png", false),
            ("https://cdn1.suno.ai/s.mp3", false),
            ("https://203.0.113.7/a.png", false),
        ] {
            let got = guard.check_url(&Url::parse(url).unwrap());
            assert_eq!(got.is_ok(), allowed, "{url}: {got:?}");
        }
        // The built-in list is SPEC's.
        assert_eq!(
            crate::config::Config::default().download.allowed_hosts,
            ["*.aiquickdraw.com", "*.kie.ai"]
        );
    }

    #[test]
    fn check_url_never_echoes_the_query() {
        let guard = UrlGuard::new(&cfg(false, &["a.example"], false));
        for url in [
            "https://b.example/x.png?token=SECRET",
            "http://a.example/x.png?token=SECRET",
            "https://10.0.0.1/x.png?token=SECRET",
        ] {
            let Err(Refused(reason)) = guard.check_url(&Url::parse(url).unwrap()) else {
                panic!("{url} allowed");
            };
            assert!(!reason.contains("SECRET"), "{reason}");
        }
    }

    #[tokio::test]
    async fn resolver_refuses_names_of_loopback() {
        let name: Name = "localhost".parse().unwrap();
        let err = match strict().resolver().resolve(name).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(err) => err,
        };
        let refused = err.downcast_ref::<Refused>().expect("a Refused error");
        assert!(
            refused
                .0
                .starts_with("refused URL: all addresses of localhost are refused: "),
            "{refused}"
        );
        assert!(refused.0.contains("loopback"), "{refused}");

        let open = UrlGuard::new(&cfg(false, &[], true)).resolver();
        let addrs: Vec<_> = open
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        assert!(!addrs.is_empty());
    }
}
