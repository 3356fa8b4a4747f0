//! A thin HTTP client of the Refinery API: base URL, bearer key, and errors that carry
//! the server's own message.

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    /// A client of the server at `base` (`--url` / `REFINERY_URL`): `host:port` without a
    /// scheme means `http://host:port`; anything that is not an http(s) URL is refused here,
    /// with what was wrong, rather than reported as an unreachable server.
    pub fn new(base: &str, key: Option<String>) -> Result<Client> {
        Ok(Client {
            http: reqwest::Client::new(),
            base: server_url(base)?,
            key,
        })
    }

    /// The server's base URL (`http://host:port`).
    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.send(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(Method::POST, path, Some(body), &[]).await
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut request = self.http.request(method, &url);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        if self.key.is_none() && !path.starts_with("/v1/health") {
            bail!(
                "no API key given: set REFINERY_API_KEY (or pass --api-key) to an account's key, or to the operator key (in the server's <data-dir>/operator.key) for operator commands"
            );
        }
        let response = request.send().await.with_context(|| {
            format!("cannot reach the Refinery server at {}: is `refinery serve` running? (set REFINERY_URL)", self.base)
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .context("reading the server's reply")?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        Err(self.error_of(status, &value))
    }

    /// POST `body` asking for a stream of JSON lines (`Accept: application/x-ndjson`, the
    /// deploy route's progress): each event before the last goes to `on_event`; the last
    /// (`{"type":"result"|"error","status":N,"body":...}`) is the answer, as [`Client::send`]
    /// gives it. A server answering plain JSON is read as [`Client::send`] reads it.
    pub async fn post_streaming(
        &self,
        path: &str,
        body: &Value,
        mut on_event: impl FnMut(&Value),
    ) -> Result<Value> {
        let Some(key) = &self.key else {
            return self.post(path, body).await;
        };
        let url = format!("{}{}", self.base, path);
        let mut response = self
            .http
            .post(&url)
            .bearer_auth(key)
            .header(reqwest::header::ACCEPT, "application/x-ndjson")
            .json(body)
            .send()
            .await
            .with_context(|| {
                format!("cannot reach the Refinery server at {}: is `refinery serve` running? (set REFINERY_URL)", self.base)
            })?;
        let status = response.status();
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-ndjson"));
        if !streamed {
            let text = response
                .text()
                .await
                .context("reading the server's reply")?;
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            if status.is_success() {
                return Ok(value);
            }
            return Err(self.error_of(status, &value));
        }
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let chunk = response
                .chunk()
                .await
                .context("reading the server's progress stream")?;
            let ended = chunk.is_none();
            if let Some(chunk) = chunk {
                pending.extend_from_slice(&chunk);
            } else if !pending.is_empty() {
                pending.push(b'\n');
            }
            while let Some(at) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=at).collect();
                let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                match event["type"].as_str() {
                    Some("result") => return Ok(event["body"].clone()),
                    Some("error") => {
                        let status = event["status"]
                            .as_u64()
                            .and_then(|s| u16::try_from(s).ok())
                            .and_then(|s| StatusCode::from_u16(s).ok())
                            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                        return Err(self.error_of(status, &event["body"]));
                    }
                    _ => on_event(&event),
                }
            }
            if ended {
                bail!("the server's progress stream ended without an answer; see `refinery deployments PROJECT` for whether the deploy happened");
            }
        }
    }

    /// The error for a failed answer: the server's message and the status.
    fn error_of(&self, status: StatusCode, value: &Value) -> anyhow::Error {
        let message = value["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        if status == StatusCode::UNAUTHORIZED {
            // The server's message speaks of HTTP headers; say it once, in the CLI's terms.
            return anyhow!(
                "the API key given (REFINERY_API_KEY or --api-key) is not valid on the server at {}: check it (a rotated key stops working) and REFINERY_URL [HTTP 401]",
                self.base
            );
        }
        anyhow!("{message} [HTTP {}]", status.as_u16())
    }
}

/// The server's base URL from `--url` / `REFINERY_URL`, without a trailing `/`.
fn server_url(given: &str) -> Result<String> {
    let trimmed = given.trim();
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    };
    let explain = "expected the server's address, e.g. http://127.0.0.1:8710 or 127.0.0.1:8710";
    let url = reqwest::Url::parse(&with_scheme)
        .map_err(|e| anyhow!("REFINERY_URL / --url `{given}` is not a URL ({e}): {explain}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!(
            "REFINERY_URL / --url `{given}`: the scheme `{}` is not http or https: {explain}",
            url.scheme()
        );
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("REFINERY_URL / --url `{given}` names no host: {explain}");
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::server_url;

    #[test]
    fn server_urls() {
        assert_eq!(
            server_url("127.0.0.1:8710").ok().as_deref(),
            Some("http://127.0.0.1:8710")
        );
        assert_eq!(
            server_url("localhost:8710/").ok().as_deref(),
            Some("http://localhost:8710")
        );
        assert_eq!(
            server_url("https://x.example").ok().as_deref(),
            Some("https://x.example")
        );
        let bad = server_url("ftp://x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(bad.contains("not http or https"), "{bad}");
        let bad = server_url("http://")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            bad.contains("not a URL") || bad.contains("no host"),
            "{bad}"
        );
    }
}
