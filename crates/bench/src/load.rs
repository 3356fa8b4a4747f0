//! A cheap HTTP/1.1 load generator for the warm-throughput figure: each connection is a
//! thread with a blocking keep-alive socket that writes one pre-built request and reads
//! its reply (status line, headers, a `Content-Length` body), back to back, as `wrk` does.
//!
//! A general client (reqwest, a JSON parse of every reply) costs about as much CPU per
//! request as the server itself, and on a 2-core machine the client and the server share
//! the cores: the figure then measures the client. This one spends a few µs per request;
//! the bench prints its CPU beside the server's.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// One reply: its round trip and what the bench counts in it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ms: f64,
    /// The body said `"status":"ok"` (an execution that succeeded).
    pub ok: bool,
    /// The body said `"cold":true`.
    pub cold: bool,
    /// The body's `"instance_id":"..."`, if any.
    pub instance_id: Option<String>,
}

/// A POST of `body` (JSON) to `path` with a bearer `key`, as bytes ready to write.
pub fn post_request(host: &str, path: &str, key: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `connections` threads each send `request` `per_connection` times over one keep-alive
/// connection to `addr`; every reply must be a 200. Returns every sample.
pub fn run(
    addr: SocketAddr,
    request: &[u8],
    connections: usize,
    per_connection: usize,
) -> Result<Vec<Sample>> {
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..connections)
            .map(|_| scope.spawn(|| connection(addr, request, per_connection)))
            .collect();
        let mut samples = Vec::with_capacity(connections * per_connection);
        for thread in threads {
            match thread.join() {
                Ok(result) => samples.extend(result?),
                Err(_) => bail!("a load-generator thread panicked"),
            }
        }
        Ok(samples)
    })
}

fn connection(addr: SocketAddr, request: &[u8], n: usize) -> Result<Vec<Sample>> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut buffer = Vec::with_capacity(4096);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        stream.write_all(request)?;
        let body = read_reply(&mut stream, &mut buffer)?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        samples.push(Sample {
            ms,
            ok: find(body, b"\"status\":\"ok\"").is_some(),
            cold: find(body, b"\"cold\":true").is_some(),
            instance_id: string_field(body, b"\"instance_id\":\""),
        });
    }
    Ok(samples)
}

/// Reads one reply into `buffer` (cleared first); returns its body. Fails on a status other
/// than 200, on a reply without `Content-Length` (the server sends one for JSON) and on a
/// closed connection.
fn read_reply<'b>(stream: &mut TcpStream, buffer: &'b mut Vec<u8>) -> Result<&'b [u8]> {
    buffer.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = find(buffer, b"\r\n\r\n") {
            break at + 4;
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            bail!("the server closed the connection mid-reply");
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = std::str::from_utf8(&buffer[..head_end]).context("a reply head that is not text")?;
    let ok_status = head.split(' ').nth(1) == Some("200");
    let status = head.lines().next().unwrap_or("").to_string();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .context("a reply without Content-Length")?;
    while buffer.len() < head_end + length {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            bail!("the server closed the connection mid-body");
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    let body = &buffer[head_end..head_end + length];
    if !ok_status {
        bail!("{status}: {}", String::from_utf8_lossy(body));
    }
    Ok(body)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The string value following `prefix` (`"name":"`), up to the closing quote.
fn string_field(body: &[u8], prefix: &[u8]) -> Option<String> {
    let start = find(body, prefix)? + prefix.len();
    let len = body[start..].iter().position(|&b| b == b'"')?;
    Some(String::from_utf8_lossy(&body[start..start + len]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that answers every request on one connection with `reply`.
    fn answer_with(reply: &'static [u8], requests: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 4096];
            for _ in 0..requests {
                let mut seen = Vec::new();
                while find(&seen, b"}").is_none() {
                    let n = stream.read(&mut buf).expect("read");
                    seen.extend_from_slice(&buf[..n]);
                }
                // Written in two parts, so that the reader must join them.
                let (a, b) = reply.split_at(reply.len() / 2);
                stream.write_all(a).expect("write");
                stream.flush().expect("flush");
                stream.write_all(b).expect("write");
            }
        });
        addr
    }

    #[test]
    fn reads_replies_back_to_back_and_finds_the_fields() {
        let addr = answer_with(
            b"HTTP/1.1 200 OK\r\ncontent-length: 37\r\n\r\n{\"cold\":true,\"instance_id\":\"i-1\",\"x\"}",
            3,
        );
        let request = post_request("h", "/p", "k", "{}");
        let samples = run(addr, &request, 1, 3).expect("run");
        assert_eq!(samples.len(), 3);
        assert!(samples.iter().all(|s| s.cold && !s.ok));
        assert_eq!(samples[0].instance_id.as_deref(), Some("i-1"));
    }

    #[test]
    fn a_refusal_is_an_error_with_its_body() {
        let addr = answer_with(
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 9\r\n\r\n{\"e\":\"q\"}",
            1,
        );
        let request = post_request("h", "/p", "k", "{}");
        let err = run(addr, &request, 1, 1).expect_err("a 429 fails the run");
        assert!(err.to_string().contains("429"), "{err}");
    }
}
