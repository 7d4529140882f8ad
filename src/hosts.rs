//! Which `Host` a keyless service answers: a defence against DNS rebinding.
//!
//! Without API keys every caller is admin, which is only safe while the only callers are on this machine.
//! A web page the developer visits can still reach `127.0.0.1` through the browser: it makes its own name
//! resolve to 127.0.0.1 and sends requests to it, which carry the page's host name. Answering only requests
//! whose `Host` is a loopback name or address (or one the operator allowed) shuts that door; a keyed
//! service needs no such check, as the page cannot know a key.

use std::net::IpAddr;

/// The host names a keyless service answers besides loopback ones (`ALLOWED_HOSTS`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    names: Vec<String>,
}

impl AllowedHosts {
    /// Parses `ALLOWED_HOSTS`: host names or IP addresses, without ports, separated by commas.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut names = Vec::new();
        for entry in text
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            let name = normalise(entry)
                .filter(|name| name.as_str() == entry.to_ascii_lowercase().trim_end_matches('.'))
                .ok_or_else(|| {
                    format!(
                        "`{entry}` is not a host name or IP address: list names such as \
                         dataapi.internal or 10.0.0.5, without scheme or port, separated by commas"
                    )
                })?;
            names.push(name);
        }
        Ok(Self { names })
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether a request naming `host` (a `Host` header's value, port included or not) may be served
    /// without a key.
    pub fn admits(&self, host: &str) -> bool {
        normalise(host).is_some_and(|name| is_loopback(&name) || self.names.contains(&name))
    }
}

/// The host name of a `Host` value: lowercase, without port, trailing dot or IPv6 brackets; None if it
/// is not a host name or address at all.
fn normalise(host: &str) -> Option<String> {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [IPv6] or [IPv6]:port
        let (address, after) = rest.split_once(']')?;
        if !(after.is_empty() || valid_port(after.strip_prefix(':')?)) {
            return None;
        }
        address.parse::<std::net::Ipv6Addr>().ok()?;
        address
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if valid_port(port) => name,
            Some(_) => return None,
            None => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && (name.parse::<IpAddr>().is_ok()
            || name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }));
    valid.then_some(name)
}

fn valid_port(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

/// `localhost`, names under `.localhost` (RFC 6761: always this machine), and loopback addresses.
fn is_loopback(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_addresses_are_admitted_with_or_without_port() {
        let none = AllowedHosts::default();
        for host in [
            "localhost",
            "LOCALHOST:8000",
            "localhost.",
            "app.localhost:3000",
            "127.0.0.1",
            "127.0.0.1:8000",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:8000",
        ] {
            assert!(none.admits(host), "{host}");
        }
    }

    #[test]
    fn other_names_tricks_and_garbage_are_refused() {
        let none = AllowedHosts::default();
        for host in [
            "evil.example",
            "evil.example:8000",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "localhost@evil.example",
            "evil.example#localhost",
            "localhost:8000:9000",
            "localhost:port",
            "10.0.0.5",
            "[::2]:8000",
            "[::1",
            "::1",
            "",
            "0.0.0.0",
            "local host",
        ] {
            assert!(!none.admits(host), "{host}");
        }
    }

    #[test]
    fn allowed_hosts_add_names_exactly() {
        let allowed = AllowedHosts::parse(" DataAPI.internal , 10.0.0.5,").unwrap();
        assert!(allowed.admits("dataapi.internal:8000"));
        assert!(allowed.admits("10.0.0.5"));
        assert!(allowed.admits("localhost"));
        assert!(!allowed.admits("api.dataapi.internal"));
        assert!(!allowed.admits("dataapi.internal.evil.example"));
        for bad in ["http://x", "x:8000", "a b", "*", "x/y"] {
            assert!(AllowedHosts::parse(bad).is_err(), "{bad}");
        }
        assert!(AllowedHosts::parse("").unwrap().is_empty());
    }
}
