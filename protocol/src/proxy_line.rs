//! The PROXY protocol v1 line (HAProxy's text form) the proxy sends a chat
//! server before a client's first line, so the server knows which address
//! the client connected from (failed-login limits count per source):
//!
//! `PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\r\n` (`TCP6` for IPv6).
//!
//! Only what the proxy writes is accepted: `TCP4`/`TCP6` with addresses of
//! that family, decimal ports, single spaces. `UNKNOWN` is refused: the
//! proxy always knows the client's address.

use std::net::{IpAddr, SocketAddr};

use crate::error::{ErrorCode, ParseError};

/// The spec's bound on a v1 line, `\r\n` included.
pub const MAX_LEN: usize = 107;

/// The line for a client that connected from `src` to `dst`. With mixed
/// families (a v4 client on a v6 socket) both are written as IPv6.
pub fn format(src: SocketAddr, dst: SocketAddr) -> String {
    let (s, d) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            return format!("PROXY TCP4 {s} {d} {} {}\r\n", src.port(), dst.port())
        }
        (s, d) => (to_v6(s), to_v6(d)),
    };
    format!("PROXY TCP6 {s} {d} {} {}\r\n", src.port(), dst.port())
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Whether a line is meant as a PROXY line (to refuse one that is not trusted).
pub fn is_proxy_line(line: &[u8]) -> bool {
    line.starts_with(b"PROXY ")
}

/// The client's address from a PROXY line (without `\n`; a trailing `\r` is
/// dropped). Pure.
pub fn parse(line: &[u8]) -> Result<SocketAddr, ParseError> {
    let bad = || ParseError::new(ErrorCode::BadFirstLine, "malformed PROXY line");
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() + 2 > MAX_LEN {
        return Err(bad());
    }
    let line = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut w = line.split(' ');
    let (Some("PROXY"), Some(family), Some(src), Some(dst), Some(sport), Some(dport), None) = (
        w.next(),
        w.next(),
        w.next(),
        w.next(),
        w.next(),
        w.next(),
        w.next(),
    ) else {
        return Err(bad());
    };
    let src: IpAddr = src.parse().map_err(|_| bad())?;
    let dst: IpAddr = dst.parse().map_err(|_| bad())?;
    let family_ok = match family {
        "TCP4" => src.is_ipv4() && dst.is_ipv4(),
        "TCP6" => src.is_ipv6() && dst.is_ipv6(),
        _ => false,
    };
    let port = |p: &str| {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse::<u16>().ok()
    };
    match (family_ok, port(sport), port(dport)) {
        (true, Some(sport), Some(_)) => Ok(SocketAddr::new(src, sport)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_of_format_is_the_source() {
        for (src, dst) in [
            ("192.0.2.7:51000", "10.0.0.1:7000"),
            ("[2001:db8::1]:4000", "[2001:db8::2]:7000"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let line = format(src, dst);
            assert!(line.len() <= MAX_LEN && line.ends_with("\r\n"), "{line:?}");
            let line = line.trim_end_matches('\n');
            assert_eq!(parse(line.as_bytes()), Ok(src));
        }
        let mixed = format(
            "192.0.2.7:1".parse().unwrap(),
            "[2001:db8::2]:7000".parse().unwrap(),
        );
        assert_eq!(mixed, "PROXY TCP6 ::ffff:192.0.2.7 2001:db8::2 1 7000\r\n");
    }

    #[test]
    fn refuses_anything_else() {
        for line in [
            &b"PROXY UNKNOWN"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2",
            b"PROXY TCP4 ::1 ::1 1 2",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2",
            b"PROXY TCP4 1.2.3.4\x1b 5.6.7.8 1 2",
        ] {
            assert!(parse(line).is_err(), "{line:?}");
        }
        let long = format!("PROXY TCP6 {} ::1 1 2", "0:".repeat(60));
        assert!(parse(long.as_bytes()).is_err());
    }
}
