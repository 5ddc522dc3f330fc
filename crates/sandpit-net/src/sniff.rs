//! What a connection or a query asks for, read from its first bytes (pure parsing): the server
//! name (SNI) and the application protocols (ALPN) of a TLS ClientHello, the `Host` of an
//! HTTP/1 request, the question of a DNS query. Also domain patterns (`example.com`,
//! `*.example.com`) and the few DNS messages the domain filter writes.
//!
//! Every parser takes untrusted bytes from a sandbox: they never index out of bounds and
//! answer [`Sniff::NeedMore`] only while the input is shorter than what it announces.

use std::net::Ipv4Addr;

/// The outcome of reading the start of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// The name the client asked for (lowercase, no port, no trailing dot).
    Name(String),
    /// Not enough bytes yet.
    NeedMore,
    /// Not this protocol, or no name in it.
    NoName,
}

/// Longest accepted domain name (RFC 1035: 253 characters in text form).
const MAX_NAME: usize = 253;

/// A valid, normalized host name: lowercase LDH labels of 1–63 characters, 253 in all, no
/// trailing dot. `None` if `text` is not one.
pub fn normalize_name(text: &str) -> Option<String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() || name.len() > MAX_NAME {
        return None;
    }
    let ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    ok.then_some(name)
}

/// Checks and normalizes an `allow_domains` entry: a host name (that name only) or
/// `*.<name>` (every name below it, not the name itself).
pub fn normalize_pattern(text: &str) -> Result<String, String> {
    let (wild, rest) = match text.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let Some(name) = normalize_name(rest) else {
        return Err(format!(
            "{text:?} is not a domain name or a *.<domain> wildcard"
        ));
    };
    if wild && !name.contains('.') {
        return Err(format!("{text:?} would match a whole top-level domain"));
    }
    Ok(if wild { format!("*.{name}") } else { name })
}

/// Whether the normalized `name` matches one of the normalized `patterns`.
pub fn name_allowed(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(parent) => name
            .strip_suffix(parent)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => p == name,
    })
}

/// The server name of a TLS ClientHello (the `server_name` extension).
pub fn tls_sni(buf: &[u8]) -> Sniff {
    let body = match hello_extension(buf, EXT_SERVER_NAME) {
        Ok(Some(body)) => body,
        Ok(None) => return Sniff::NoName,
        Err(s) => return s,
    };
    // server_name: list length, then entries (type 0 = host name).
    let name = (|| {
        let mut sni = Reader(body);
        let list = sni.u16()? as usize;
        let mut list = Reader(sni.take(list)?);
        while let Some(name_type) = list.u8() {
            let len = list.u16()? as usize;
            let name = list.take(len)?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().and_then(normalize_name);
            }
        }
        None
    })();
    name.map_or(Sniff::NoName, Sniff::Name)
}

/// Most protocols [`tls_alpn`] accepts in one ClientHello (browsers send two or three).
pub const MAX_ALPN: usize = 16;

/// The protocols a complete TLS ClientHello offers in its ALPN extension (RFC 7301), in the
/// client's order: empty when it has no such extension. `None` when `buf` does not start with
/// a whole ClientHello, or its ALPN extension is malformed (an empty list or name, trailing
/// bytes, more than [`MAX_ALPN`] names): a caller then offers no protocol at all.
pub fn tls_alpn(buf: &[u8]) -> Option<Vec<Vec<u8>>> {
    let Some(body) = hello_extension(buf, EXT_ALPN).ok()? else {
        return Some(Vec::new());
    };
    let mut ext = Reader(body);
    let len = ext.u16()? as usize;
    let mut list = Reader(ext.take(len)?);
    if !ext.0.is_empty() || list.0.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    while !list.0.is_empty() {
        let len = list.u8()? as usize;
        if len == 0 || out.len() == MAX_ALPN {
            return None;
        }
        out.push(list.take(len)?.to_vec());
    }
    Some(out)
}

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// The body of the extension `kind` of the ClientHello at the start of `buf` (`None` when it
/// has none). `Err(NeedMore)` while the first record is incomplete, `Err(NoName)` when it is
/// not a ClientHello or does not parse. A ClientHello split over several records is rare
/// (and then has no extensions in the first): treated as not parsing.
fn hello_extension(buf: &[u8], kind: u16) -> Result<Option<&[u8]>, Sniff> {
    // Record header: type 22 (handshake), version 3.x, length.
    if buf.len() < 5 {
        return Err(if buf.first().is_none_or(|&b| b == 22) {
            Sniff::NeedMore
        } else {
            Sniff::NoName
        });
    }
    if buf[0] != 22 || buf[1] != 3 {
        return Err(Sniff::NoName);
    }
    let record_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    let Some(record) = buf.get(5..5 + record_len) else {
        return Err(Sniff::NeedMore);
    };
    // Handshake header: type 1 (ClientHello), 24-bit length.
    let mut r = Reader(record);
    if r.u8() != Some(1) {
        return Err(Sniff::NoName);
    }
    let hello = r.u24().and_then(|len| r.take(len)).ok_or(Sniff::NoName)?;
    let mut h = Reader(hello);
    let found = (|| {
        h.take(2 + 32)?; // version, random
        let session = h.u8()? as usize;
        h.take(session)?;
        let suites = h.u16()? as usize;
        h.take(suites)?;
        let compression = h.u8()? as usize;
        h.take(compression)?;
        let ext_len = h.u16()? as usize;
        let mut exts = Reader(h.take(ext_len)?);
        while let Some(k) = exts.u16() {
            let len = exts.u16()? as usize;
            let body = exts.take(len)?;
            if k == kind {
                return Some(Some(body));
            }
        }
        Some(None)
    })();
    found.ok_or(Sniff::NoName)
}

/// The `Host` of an HTTP/1 request (header, or the authority of an absolute-form target).
pub fn http_host(buf: &[u8]) -> Sniff {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > 16 * 1024 {
            Sniff::NoName
        } else {
            Sniff::NeedMore
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Sniff::NoName;
    };
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (Some(_method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Sniff::NoName;
    };
    if !version.starts_with("HTTP/1.") {
        return Sniff::NoName;
    }
    let authority = target
        .strip_prefix("http://")
        .map(|rest| rest.split('/').next().unwrap_or_default().to_string());
    let header = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("host")
            .then(|| v.trim().to_string())
    });
    let Some(host) = authority.or(header) else {
        return Sniff::NoName;
    };
    // Drop a port; IPv6 literals are not names.
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
        _ => host,
    };
    normalize_name(&host).map_or(Sniff::NoName, Sniff::Name)
}

/// The question of a DNS query: (id, name, type, end of the question section).
pub fn dns_question(msg: &[u8]) -> Option<(u16, String, u16, usize)> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return None; // short, or a response
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    if u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None; // exactly one question
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // compression pointers do not belong in a question
        }
        labels.push(std::str::from_utf8(msg.get(pos..pos + len)?).ok()?);
        pos += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]);
    msg.get(pos + 2..pos + 4)?;
    let name = normalize_name(&labels.join("."))?;
    Some((id, name, qtype, pos + 4))
}

/// A REFUSED answer to `query` (its header and question, no records).
pub fn dns_refused(query: &[u8]) -> Option<Vec<u8>> {
    let (_, _, _, end) = dns_question(query)?;
    let mut out = query[..end].to_vec();
    out[2] = 0x80 | (query[2] & 0x79); // QR, opcode and RD kept
    out[3] = 0x80 | 5; // RA, REFUSED
    out[6..12].fill(0); // no answer, authority or additional records
    Some(out)
}

/// An A query for `name` with the given id, recursion desired.
pub fn dns_a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The A records of a response to the query with `id`.
pub fn dns_a_answers(msg: &[u8], id: u16) -> Vec<Ipv4Addr> {
    let parse = || -> Option<Vec<Ipv4Addr>> {
        if msg.len() < 12 || u16::from_be_bytes([msg[0], msg[1]]) != id || msg[2] & 0x80 == 0 {
            return None;
        }
        let questions = u16::from_be_bytes([msg[4], msg[5]]);
        let answers = u16::from_be_bytes([msg[6], msg[7]]);
        let mut r = Reader(&msg[12..]);
        for _ in 0..questions {
            r.skip_name()?;
            r.take(4)?;
        }
        let mut out = Vec::new();
        for _ in 0..answers {
            r.skip_name()?;
            let kind = r.u16()?;
            let class = r.u16()?;
            r.take(4)?; // TTL
            let len = r.u16()? as usize;
            let data = r.take(len)?;
            if kind == 1 && class == 1 && len == 4 {
                out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
            }
        }
        Some(out)
    };
    parse().unwrap_or_default()
}

/// A minimal TLS 1.3 ClientHello naming `name` in its SNI extension (for tests and probes:
/// enough for [`tls_sni`], not for a real handshake).
pub fn client_hello(name: &str) -> Vec<u8> {
    client_hello_with_alpn(name, &[])
}

/// [`client_hello`], offering `alpn` (in that order) when it is not empty.
pub fn client_hello_with_alpn(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    let mut exts = Vec::new();
    exts.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // ec_point_formats
    exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
    exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    exts.extend_from_slice(&sni);
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        exts.extend_from_slice(&EXT_ALPN.to_be_bytes());
        exts.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
        exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
        exts.extend_from_slice(&list);
    }
    let mut hello = vec![3, 3];
    hello.extend_from_slice(&[7; 32]);
    hello.push(0); // session id
    hello.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    hello.extend_from_slice(&[1, 0]); // null compression
    hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    hello.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&hello);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// A cursor over untrusted bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
    /// Skips a possibly compressed name.
    fn skip_name(&mut self) -> Option<()> {
        loop {
            let len = self.u8()?;
            match len {
                0 => return Some(()),
                l if l & 0xC0 == 0xC0 => {
                    self.u8()?;
                    return Some(());
                }
                l if l <= 63 => {
                    self.take(l as usize)?;
                }
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_of_a_client_hello() {
        let hello = client_hello("API.Example.com");
        assert_eq!(tls_sni(&hello), Sniff::Name("api.example.com".into()));
        for cut in 0..hello.len() {
            assert_eq!(tls_sni(&hello[..cut]), Sniff::NeedMore, "cut at {cut}");
        }
        assert_eq!(tls_sni(b"GET / HTTP/1.1\r\n"), Sniff::NoName);
        let mut bad = hello.clone();
        bad[5] = 2; // not a ClientHello
        assert_eq!(tls_sni(&bad), Sniff::NoName);
    }

    #[test]
    fn alpn_of_a_client_hello() {
        let offered: [&[u8]; 2] = [b"h2", b"http/1.1"];
        let hello = client_hello_with_alpn("api.example.com", &offered);
        assert_eq!(
            tls_alpn(&hello),
            Some(vec![b"h2".to_vec(), b"http/1.1".to_vec()])
        );
        assert_eq!(tls_sni(&hello), Sniff::Name("api.example.com".into()));
        assert_eq!(tls_alpn(&client_hello("api.example.com")), Some(vec![]));
        for cut in 0..hello.len() {
            assert_eq!(tls_alpn(&hello[..cut]), None, "cut at {cut}");
        }
        assert_eq!(tls_alpn(b"GET / HTTP/1.1\r\n\r\n"), None);
        // The ALPN extension is the last: its list of protocols ends the buffer.
        let list_at = hello.len() - (1 + 2 + 1 + 8) - 2;
        // An empty protocol name, an empty list, a name longer than the list.
        let mut bad = hello.clone();
        bad[list_at + 2] = 0;
        assert_eq!(tls_alpn(&bad), None);
        let mut bad = hello.clone();
        bad[list_at..list_at + 2].copy_from_slice(&[0, 0]);
        assert_eq!(tls_alpn(&bad), None, "list shorter than the extension");
        let mut bad = hello.clone();
        bad[list_at + 2] = 40;
        assert_eq!(tls_alpn(&bad), None);
        // Too many names.
        let many: Vec<&[u8]> = vec![b"x"; MAX_ALPN + 1];
        assert_eq!(tls_alpn(&client_hello_with_alpn("a.test", &many)), None);
        let enough: Vec<&[u8]> = vec![b"x"; MAX_ALPN];
        assert_eq!(
            tls_alpn(&client_hello_with_alpn("a.test", &enough)).map(|l| l.len()),
            Some(MAX_ALPN)
        );
    }

    #[test]
    fn host_of_an_http_request() {
        let req = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nhost: Example.com:8080\r\n\r\n";
        assert_eq!(http_host(req), Sniff::Name("example.com".into()));
        assert_eq!(http_host(&req[..20]), Sniff::NeedMore);
        assert_eq!(
            http_host(b"GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n"),
            Sniff::Name("a.test".into())
        );
        assert_eq!(http_host(b"GET / HTTP/1.1\r\n\r\n"), Sniff::NoName);
        assert_eq!(
            http_host(b"\x16\x03\x01\x00\x05hello\r\n\r\n"),
            Sniff::NoName
        );
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n"),
            Sniff::NoName
        );
    }

    #[test]
    fn patterns() {
        assert_eq!(normalize_pattern("Example.COM.").unwrap(), "example.com");
        assert_eq!(normalize_pattern("*.github.com").unwrap(), "*.github.com");
        for bad in [
            "",
            "*",
            "*.com",
            "a..b",
            "-a.com",
            "exa mple.com",
            "*.*.a.com",
            "a.com/x",
        ] {
            assert!(normalize_pattern(bad).is_err(), "{bad:?}");
        }
        let p = vec!["example.com".to_string(), "*.github.com".to_string()];
        assert!(name_allowed(&p, "example.com"));
        assert!(!name_allowed(&p, "www.example.com"));
        assert!(name_allowed(&p, "api.github.com"));
        assert!(name_allowed(&p, "a.b.github.com"));
        assert!(!name_allowed(&p, "github.com"));
        assert!(!name_allowed(&p, "evilgithub.com"));
        assert!(!name_allowed(&p, "github.com.evil.org"));
    }

    #[test]
    fn dns_messages() {
        let q = dns_a_query(0x1234, "api.example.com");
        assert_eq!(
            dns_question(&q),
            Some((0x1234, "api.example.com".to_string(), 1, q.len()))
        );
        let refused = dns_refused(&q).unwrap();
        assert_eq!(refused[3] & 0x0f, 5);
        assert_eq!(dns_question(&refused), None, "a response is not a query");
        assert!(dns_a_answers(&refused, 0x1234).is_empty());
        // A response with one compressed A record.
        let mut resp = q.clone();
        resp[2] |= 0x80;
        resp[7] = 1;
        resp.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 1, 2, 3]);
        assert_eq!(
            dns_a_answers(&resp, 0x1234),
            vec![Ipv4Addr::new(10, 1, 2, 3)]
        );
        assert!(dns_a_answers(&resp, 0x9999).is_empty(), "another id");
        assert!(dns_a_answers(&resp[..resp.len() - 1], 0x1234).is_empty());
        assert_eq!(dns_question(&q[..q.len() - 1]), None);
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = tls_sni(&bytes);
            let _ = tls_alpn(&bytes);
            let _ = http_host(&bytes);
            let _ = dns_question(&bytes);
            let _ = dns_refused(&bytes);
            let _ = dns_a_answers(&bytes, 1);
        }

        #[test]
        fn sni_round_trips(name in "[a-z][a-z0-9-]{0,20}(\\.[a-z][a-z0-9]{0,10}){1,3}") {
            proptest::prop_assume!(!name.contains("-."));
            proptest::prop_assert_eq!(tls_sni(&client_hello(&name)), Sniff::Name(name.clone()));
        }

        #[test]
        fn alpn_round_trips(
            protocols in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..40), 1..=MAX_ALPN),
        ) {
            let refs: Vec<&[u8]> = protocols.iter().map(|p| p.as_slice()).collect();
            let hello = client_hello_with_alpn("a.example.com", &refs);
            proptest::prop_assert_eq!(tls_alpn(&hello), Some(protocols.clone()));
            proptest::prop_assert_eq!(tls_sni(&hello), Sniff::Name("a.example.com".into()));
        }

        #[test]
        fn alpn_of_a_damaged_hello_never_panics(
            protocols in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..10), 1..4),
            at in 0usize..400,
            byte in proptest::num::u8::ANY,
        ) {
            let refs: Vec<&[u8]> = protocols.iter().map(|p| p.as_slice()).collect();
            let mut hello = client_hello_with_alpn("a.example.com", &refs);
            let at = at % hello.len();
            hello[at] = byte;
            if let Some(list) = tls_alpn(&hello) {
                proptest::prop_assert!(list.len() <= MAX_ALPN);
                proptest::prop_assert!(list.iter().all(|p| !p.is_empty()));
            }
        }
    }
}
