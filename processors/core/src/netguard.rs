//! The outbound-address guard (promise 9): where a caller chooses the destination (a webhook
//! recipient) or the config names one that carries message data (alert and status URLs), Herald
//! connects only to public addresses, or to loopback/private/link-local/multicast/unspecified
//! ones the operator allowed by exact `host:port` or CIDR (`security.outbound_allow`).
//!
//! The check applies to the address actually connected: the HTTP clients built by
//! [`Guard::client`] resolve names through a resolver that drops forbidden addresses (so a name
//! that resolves to a public address at one moment and to 127.0.0.1 the next — DNS rebinding —
//! still never reaches loopback), IP-literal URLs are checked before the request
//! ([`Guard::check_url`]; the resolver never sees them), and redirects are not followed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    /// Exact host (name or IP literal, lower case) and port.
    HostPort(String, u16),
    /// A network: its address and prefix length.
    Cidr(IpAddr, u8),
}

impl Allow {
    pub fn parse(s: &str) -> Result<Allow, String> {
        let s = s.trim();
        if let Some((net, len)) = s.split_once('/') {
            let ip: IpAddr = net
                .parse()
                .map_err(|_| format!("{s:?}: not an IP network"))?;
            let len: u8 = len
                .parse()
                .map_err(|_| format!("{s:?}: bad prefix length"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if len > max {
                return Err(format!("{s:?}: prefix longer than {max}"));
            }
            return Ok(Allow::Cidr(ip, len));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: want host:port or a CIDR"))?;
        let port: u16 = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        Ok(Allow::HostPort(host.to_ascii_lowercase(), port))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let Allow::Cidr(net, len) = self else {
            return false;
        };
        match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                u32::from(*n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                u128::from(*n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Whether `ip` is an ordinary public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared address space (CGNAT)
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) // benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link local
                || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
                || (seg[0] == 0x64 && seg[1] == 0xff9b)) // NAT64 of anything, v4 included
        }
    }
}

/// The guard built from `security.outbound_allow`.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow: Arc<Vec<Allow>>,
}

impl Guard {
    /// From the config's entries (validated at load; unparsable ones are skipped here).
    pub fn new(entries: &[String]) -> Guard {
        Guard {
            allow: Arc::new(
                entries
                    .iter()
                    .filter_map(|e| Allow::parse(e).ok())
                    .collect(),
            ),
        }
    }

    /// Whether connecting to `ip:port` for a URL naming `host` is allowed.
    pub fn permits(&self, host: &str, ip: IpAddr, port: u16) -> bool {
        if is_public(ip) {
            return true;
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let ip_text = ip.to_string();
        self.allow.iter().any(|a| match a {
            Allow::HostPort(h, p) => *p == port && (*h == host || *h == ip_text),
            Allow::Cidr(..) => a.contains(ip),
        })
    }

    /// Names the operator allowed by `host:port`: their resolved addresses may be private, on
    /// the ports listed (checked by [`Guard::check_url`]).
    fn named(&self, host: &str) -> bool {
        self.allow
            .iter()
            .any(|a| matches!(a, Allow::HostPort(h, _) if h.eq_ignore_ascii_case(host)))
    }

    /// Checks a URL before any connection: the scheme, an IP-literal host in full, `localhost`,
    /// and the port of a host the allow list names. Names are checked again, address by
    /// address, when the guarded client resolves them.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err("only http and https destinations".into());
        }
        let port = u.port_or_known_default().unwrap_or(0);
        let refused = |what: &str| Err(format!("destination {what} is not allowed"));
        match u.host() {
            None => Err("URL has no host".into()),
            Some(url::Host::Ipv4(a)) => {
                if self.permits(&a.to_string(), IpAddr::V4(a), port) {
                    Ok(())
                } else {
                    refused(&format!("{a}:{port}"))
                }
            }
            Some(url::Host::Ipv6(a)) => {
                if self.permits(&a.to_string(), IpAddr::V6(a), port) {
                    Ok(())
                } else {
                    refused(&format!("[{a}]:{port}"))
                }
            }
            Some(url::Host::Domain(d)) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                let local = d == "localhost" || d.ends_with(".localhost");
                let named = self.named(&d);
                let port_listed = self
                    .allow
                    .iter()
                    .any(|a| matches!(a, Allow::HostPort(h, p) if *h == d && *p == port));
                if (local || named) && !port_listed {
                    return refused(&format!("{d}:{port}"));
                }
                Ok(())
            }
        }
    }

    /// A client builder whose every connection goes through the guard: names resolve only to
    /// permitted addresses, redirects are not followed, and proxies named in the environment
    /// (`HTTP(S)_PROXY`, `ALL_PROXY`) are ignored — through one, the guard would only ever see
    /// the proxy's address, never the destination's.
    pub fn client(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        builder
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                guard: self.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
    }
}

/// Resolves a name with the system resolver and keeps only the addresses the guard permits for
/// it: a name the allow list names may resolve to private addresses (its ports are checked by
/// [`Guard::check_url`]), any other only to public ones or allowed networks.
struct GuardedResolver {
    guard: Guard,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let named = guard.named(&host);
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| {
                    named || is_public(a.ip()) || guard.allow.iter().any(|x| x.contains(a.ip()))
                })
                .collect();
            if addrs.is_empty() {
                return Err(format!("destination {host} resolves to no allowed address").into());
            }
            let it: Addrs = Box::new(addrs.into_iter());
            Ok(it)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(&[
            "127.0.0.1:18100".into(),
            "127.0.9.0/24".into(),
            "hooks.internal:8443".into(),
        ])
    }

    #[test]
    fn loopback_private_and_link_local_literals_are_refused_unless_allowed() {
        let g = guard();
        for url in [
            "http://127.0.0.1:9464/metrics",
            "http://127.0.0.2/",
            "http://[::1]:8080/",
            "http://169.254.169.254/latest/meta-data",
            "http://192.168.1.1/",
            "http://172.16.0.1/",
            "http://10.0.0.1/",
            "http://0.0.0.0:8080/",
            "http://[::ffff:127.0.0.1]/",
            "http://[fe80::1]/",
            "http://224.0.0.1/",
            "http://localhost:8080/",
            "http://api.localhost/",
            "http://hooks.internal:22/",
            "ftp://example.com/",
        ] {
            assert!(g.check_url(url).is_err(), "{url} must be refused");
        }
        // Checked without any connection: an allowed loopback port and network, an allowed
        // name on its listed port, and public names.
        for url in [
            "http://127.0.0.1:18100/_alerts",
            "http://127.0.9.4:9000/hook",
            "https://hooks.internal:8443/x",
            "https://example.com/hook",
        ] {
            assert!(g.check_url(url).is_ok(), "{url} must pass");
        }
    }

    #[test]
    fn allow_entries_parse() {
        assert_eq!(
            Allow::parse("127.0.0.1:18100"),
            Ok(Allow::HostPort("127.0.0.1".into(), 18100))
        );
        assert!(Allow::parse("10.0.0.0/33").is_err());
        assert!(Allow::parse("nohost").is_err());
        assert!(Allow::parse("[::1]:80").is_ok());
    }

    #[tokio::test]
    async fn the_guarded_client_never_connects_to_a_refused_name() {
        // `localhost` resolves to loopback: the resolver drops it, so no connection is made.
        let client = Guard::default()
            .client(reqwest::Client::builder())
            .build()
            .unwrap();
        let err = client.get("http://localhost:9/").send().await.unwrap_err();
        assert!(format!("{err:?}").contains("no allowed address"), "{err:?}");
    }
}
