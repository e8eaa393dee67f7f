//! Fetching images over `http://` with hyper's client: one GET per connection, with
//! `Range` / `If-Range` so that an interrupted download resumes where it stopped. hyper
//! reads the body (`Content-Length`, chunked, or until the server closes) and says when a
//! connection ends before the body does; the download loop in [`super`] decides what to
//! do about redirects, ranges and cuts.
//!
//! hyper, hyper-util and http-body-util are already in every Ferro binary through tonic,
//! so this client costs no new crates. `https://` is not fetched yet: no image source
//! needs it today, and it would bring a TLS stack into the agent; [`super::Source::parse`]
//! says so.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Incoming};
use hyper::{Request, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// How long connecting, the response's head, or any one piece of its body may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// An `http://` URL: an absolute URI with a host and no user info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(Uri);

impl HttpUrl {
    /// Parses `http://host[:port][/path]`; `None` for anything else.
    pub fn parse(url: &str) -> Option<HttpUrl> {
        let uri: Uri = url.parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let authority = uri.authority()?;
        // The `http` crate keeps a port it cannot read as a number, as no port at all.
        let after_host = authority.as_str().get(authority.host().len()..);
        let bad_port = after_host != Some("") && authority.port_u16().is_none();
        if authority.host().is_empty() || authority.as_str().contains('@') || bad_port {
            return None;
        }
        Some(HttpUrl(uri))
    }

    /// The host name or address (IPv6 in brackets).
    pub fn host(&self) -> &str {
        self.0.host().unwrap_or_default()
    }

    /// The port, 80 unless given.
    pub fn port(&self) -> u16 {
        self.0.port_u16().unwrap_or(80)
    }

    /// The path and query, starting with `/`.
    pub fn path(&self) -> &str {
        self.0.path_and_query().map_or("/", |p| p.as_str())
    }

    /// Resolves a `Location` header against this URL. The `http` crate parses URIs but
    /// does not resolve references; the three shapes servers send are handled here
    /// rather than bringing in the `url` crate (and its IDNA tables) for it.
    pub fn join(&self, location: &str) -> Option<String> {
        if location.contains("://") {
            return Some(location.to_owned());
        }
        let authority = self.0.authority()?;
        if location.starts_with('/') {
            return Some(format!("http://{authority}{location}"));
        }
        let path = self.0.path();
        let dir = match path.rfind('/') {
            Some(i) => &path[..=i],
            None => "/",
        };
        Some(format!("http://{authority}{dir}{location}"))
    }
}

/// A response whose body has not been read yet.
pub struct Response {
    head: hyper::http::response::Parts,
    body: Incoming,
}

impl Response {
    /// The status code.
    pub fn status(&self) -> u16 {
        self.head.status.as_u16()
    }

    /// The reason phrase: the server's own, or the standard one for the status.
    pub fn reason(&self) -> String {
        match self.head.extensions.get::<hyper::ext::ReasonPhrase>() {
            Some(said) => String::from_utf8_lossy(said.as_bytes()).into_owned(),
            None => self
                .head
                .status
                .canonical_reason()
                .unwrap_or_default()
                .to_owned(),
        }
    }

    /// A header's value (the first of that name), if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.headers.get(name)?.to_str().ok()
    }

    /// The body's length, when the server said it.
    pub fn content_length(&self) -> Option<u64> {
        self.body.size_hint().exact()
    }

    /// The next piece of the body; `None` at its end. A connection that ends before the
    /// body does is an `UnexpectedEof` error, one that stalls a `TimedOut` error.
    pub async fn chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            let frame = match timed(self.body.frame()).await? {
                None => return Ok(None),
                Some(frame) => frame.map_err(body_error)?,
            };
            // Trailers carry nothing a download needs.
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
            {
                return Ok(Some(data));
            }
        }
    }
}

fn body_error(e: hyper::Error) -> std::io::Error {
    let kind = if e.is_incomplete_message() {
        std::io::ErrorKind::UnexpectedEof
    } else if e.is_timeout() {
        std::io::ErrorKind::TimedOut
    } else {
        std::io::ErrorKind::Other
    };
    std::io::Error::new(kind, e)
}

async fn timed<T>(io: impl Future<Output = T>) -> std::io::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, io).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no data for {IO_TIMEOUT:?}"),
        )
    })
}

/// Sends one GET and reads the response's head. `range_from` asks for the bytes from that
/// offset on; `if_range` (an ETag or Last-Modified value) makes the server send the whole
/// body instead if the resource changed since.
pub async fn get(
    url: &HttpUrl,
    range_from: Option<u64>,
    if_range: Option<&str>,
) -> std::io::Result<Response> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(IO_TIMEOUT));
    connector.set_nodelay(true);
    // One request per connection: downloads are few and long, and a pooled connection
    // the server has since closed would only fail the next one.
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        // Some mirrors (and proxies) still match header names case-sensitively.
        .http1_title_case_headers(true)
        .build(connector);
    let mut request = Request::get(url.0.clone())
        .header(header::USER_AGENT, "ferro-agent")
        .header(header::ACCEPT, "*/*")
        .header(header::ACCEPT_ENCODING, "identity");
    if let Some(from) = range_from {
        request = request.header(header::RANGE, format!("bytes={from}-"));
        if let Some(validator) = if_range {
            request = request.header(header::IF_RANGE, validator);
        }
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let response = timed(client.request(request))
        .await?
        .map_err(std::io::Error::other)?;
    let (head, body) = response.into_parts();
    Ok(Response { head, body })
}

/// The first byte and the total of a `Content-Range: bytes FIRST-LAST/TOTAL` (or
/// `bytes */TOTAL`) header; the total is `None` when the server wrote `*`. hyper leaves
/// header values to the caller, and this one is too small to take a crate for.
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
        let url = HttpUrl::parse("http://mirror.example:8080/img/a.qcow2?x=1").unwrap();
        assert_eq!(
            (url.host(), url.port(), url.path()),
            ("mirror.example", 8080, "/img/a.qcow2?x=1")
        );
        let bare = HttpUrl::parse("http://127.0.0.1").unwrap();
        assert_eq!((bare.port(), bare.path()), (80, "/"));
        let v6 = HttpUrl::parse("http://[::1]:81/a").unwrap();
        assert_eq!((v6.host(), v6.port()), ("[::1]", 81));
        for bad in [
            "https://x/y",
            "http://",
            "http://user@x/y",
            "http://x:port/y",
            "http://x/a b",
            "/relative",
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
