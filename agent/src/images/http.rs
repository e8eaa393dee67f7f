//! A small HTTP/1.1 client for fetching images over `http://`: one GET per connection,
//! with `Range` / `If-Range` so an interrupted download resumes where it stopped, and the
//! body read as `Content-Length`, chunked, or until the server closes.
//!
//! It is deliberately tiny: image mirrors speak plain HTTP/1.1 GET, and this avoids a
//! client stack in the agent for one request shape. `https://` is not fetched yet (the
//! agent carries no TLS stack); [`super::Source::parse`] says so.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long connecting, or any one read, may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The most header bytes a response may have.
const MAX_HEADER_BYTES: usize = 64 << 10;

/// An `http://` URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// The host name or address (IPv6 without brackets).
    pub host: String,
    /// The port, 80 unless given.
    pub port: u16,
    /// The path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    /// Parses `http://host[:port][/path]`; `None` for anything else.
    pub fn parse(url: &str) -> Option<HttpUrl> {
        let rest = url.strip_prefix("http://")?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => 80,
                None => return None,
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), port.parse().ok()?),
                None => (authority.to_owned(), 80),
            }
        };
        if host.is_empty() || path.contains([' ', '\r', '\n']) {
            return None;
        }
        Some(HttpUrl { host, port, path })
    }

    /// The `Host` header's value.
    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Resolves a `Location` header against this URL.
    pub fn join(&self, location: &str) -> Option<String> {
        if location.contains("://") {
            return Some(location.to_owned());
        }
        if location.starts_with('/') {
            return Some(format!("http://{}{location}", self.host_header()));
        }
        let dir = match self.path.rfind('/') {
            Some(i) => &self.path[..=i],
            None => "/",
        };
        Some(format!("http://{}{dir}{location}", self.host_header()))
    }
}

/// A response whose body has not been read yet.
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    headers: Vec<(String, String)>,
    body: Body,
    stream: BufReader<TcpStream>,
}

enum Body {
    Length(u64),
    Chunked { left: u64, done: bool },
    UntilClose,
}

impl Response {
    /// A header's value (the first of that name, case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body's length, when the server said it.
    pub fn content_length(&self) -> Option<u64> {
        match self.body {
            Body::Length(n) => Some(n),
            _ => None,
        }
    }

    /// Reads the next piece of the body into `buf`; 0 at its end. A connection that ends
    /// before the body does is an `UnexpectedEof` error.
    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match &mut self.body {
                Body::Length(0) => return Ok(0),
                Body::Length(left) => {
                    let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let n = timed(self.stream.read(&mut buf[..want])).await?;
                    if n == 0 {
                        return Err(eof("the connection closed before the body ended"));
                    }
                    *left -= n as u64;
                    return Ok(n);
                }
                Body::UntilClose => return timed(self.stream.read(buf)).await,
                Body::Chunked { done: true, .. } => return Ok(0),
                Body::Chunked { left: 0, done } => {
                    let line = read_line(&mut self.stream).await?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size, 16).map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("bad chunk size {line:?}"),
                        )
                    })?;
                    if size == 0 {
                        // Trailers, then the empty line.
                        while !read_line(&mut self.stream).await?.is_empty() {}
                        *done = true;
                    } else if let Body::Chunked { left, .. } = &mut self.body {
                        *left = size;
                    }
                }
                Body::Chunked { left, .. } => {
                    let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let n = timed(self.stream.read(&mut buf[..want])).await?;
                    if n == 0 {
                        return Err(eof("the connection closed inside a chunk"));
                    }
                    *left -= n as u64;
                    if *left == 0 {
                        // The CRLF after the chunk's data.
                        let rest = read_line(&mut self.stream).await?;
                        if !rest.is_empty() {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "a chunk is longer than it said",
                            ));
                        }
                    }
                    return Ok(n);
                }
            }
        }
    }
}

fn eof(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what.to_owned())
}

async fn timed<T>(io: impl Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, io).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no data for {IO_TIMEOUT:?}"),
        )
    })?
}

/// One header line without its CRLF.
async fn read_line(stream: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = Vec::new();
    let n = timed(
        (&mut *stream)
            .take(MAX_HEADER_BYTES as u64)
            .read_until(b'\n', &mut line),
    )
    .await?;
    if n == 0 || !line.ends_with(b"\n") {
        return Err(eof("the connection closed inside the headers"));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "headers not UTF-8"))
}

/// Sends one GET and reads the response's head. `range_from` asks for the bytes from that
/// offset on; `if_range` (an ETag or Last-Modified value) makes the server send the whole
/// body instead if the resource changed since.
pub async fn get(
    url: &HttpUrl,
    range_from: Option<u64>,
    if_range: Option<&str>,
) -> std::io::Result<Response> {
    let stream = timed(TcpStream::connect((url.host.as_str(), url.port))).await?;
    stream.set_nodelay(true)?;
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ferro-agent\r\nAccept: */*\r\n\
         Accept-Encoding: identity\r\nConnection: close\r\n",
        url.path,
        url.host_header()
    );
    if let Some(from) = range_from {
        request.push_str(&format!("Range: bytes={from}-\r\n"));
        if let Some(validator) = if_range {
            request.push_str(&format!("If-Range: {validator}\r\n"));
        }
    }
    request.push_str("\r\n");
    let mut stream = BufReader::with_capacity(1 << 16, stream);
    timed(stream.get_mut().write_all(request.as_bytes())).await?;

    let status_line = read_line(&mut stream).await?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP/1.x response: {status_line:?}"),
        ));
    };
    let reason = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    let mut total = 0;
    loop {
        let line = read_line(&mut stream).await?;
        if line.is_empty() {
            break;
        }
        total += line.len();
        if total > MAX_HEADER_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response headers too large",
            ));
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let body =
        if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            Body::Chunked {
                left: 0,
                done: false,
            }
        } else if let Some(length) = find("content-length") {
            Body::Length(length.parse().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad Content-Length {length:?}"),
                )
            })?)
        } else if status == 204 || status == 304 {
            Body::Length(0)
        } else {
            Body::UntilClose
        };
    Ok(Response {
        status,
        reason,
        headers,
        body,
        stream,
    })
}

/// The first byte and the total of a `Content-Range: bytes FIRST-LAST/TOTAL` (or
/// `bytes */TOTAL`) header; the total is `None` when the server wrote `*`.
pub fn content_range(value: &str) -> Option<(Option<u64>, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes")?.trim();
    let (range, total) = spec.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let first = match range.trim() {
        "*" => None,
        r => Some(r.split_once('-')?.0.trim().parse().ok()?),
    };
    Some((first, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        assert_eq!(
            HttpUrl::parse("http://mirror.example:8080/img/a.qcow2?x=1").unwrap(),
            HttpUrl {
                host: "mirror.example".into(),
                port: 8080,
                path: "/img/a.qcow2?x=1".into()
            }
        );
        let bare = HttpUrl::parse("http://127.0.0.1").unwrap();
        assert_eq!((bare.port, bare.path.as_str()), (80, "/"));
        let v6 = HttpUrl::parse("http://[::1]:81/a").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 81));
        for bad in [
            "https://x/y",
            "http://",
            "http://user@x/y",
            "http://x:port/y",
            "http://x/a b",
        ] {
            assert_eq!(HttpUrl::parse(bad), None, "{bad}");
        }
        let url = HttpUrl::parse("http://h:81/dir/file").unwrap();
        assert_eq!(url.join("/other").unwrap(), "http://h:81/other");
        assert_eq!(url.join("next").unwrap(), "http://h:81/dir/next");
        assert_eq!(url.join("http://z/q").unwrap(), "http://z/q");
    }

    #[test]
    fn content_ranges_are_read() {
        assert_eq!(
            content_range("bytes 100-199/1000"),
            Some((Some(100), Some(1000)))
        );
        assert_eq!(content_range("bytes */1000"), Some((None, Some(1000))));
        assert_eq!(content_range("bytes 5-9/*"), Some((Some(5), None)));
        assert_eq!(content_range("items 1-2/3"), None);
    }
}
