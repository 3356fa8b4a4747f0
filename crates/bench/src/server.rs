//! A real `refinery serve` started for the bench on a loopback port, and a small JSON client
//! for its API. The server is stopped (SIGTERM, then waited for) when [`Server`] drops.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub struct Server {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
    pub operator_key: String,
}

impl Server {
    /// The server's host pid (its memory is part of the burst figure).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process, which we have not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Starts `binary serve` with quotas raised so the figures measure the platform, not the
/// default quotas; `extra` flags are appended (e.g. `--no-zygotes`).
pub fn start(binary: &Path, extra: &[&str]) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut child = Command::new(binary)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--keep-alive",
            "10m",
            "--quota-rate",
            "1000000",
            "--quota-burst",
            "1000000",
            "--quota-instances",
            "2000",
            "--quota-memory-mb",
            "1000000",
            "--scale-up-limit",
            "1000/10s",
            "--queue-timeout",
            "60s",
            "--data-dir",
        ])
        .arg(&data)
        .args(extra)
        .env("REFINERY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut url = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("Refinery listening on ") {
            url = Some(rest.trim().to_string());
            break;
        }
    }
    let Some(url) = url else {
        let _ = child.wait();
        bail!(
            "{} serve exited before listening (its stderr above says why)",
            binary.display()
        );
    };
    let operator_key = std::fs::read_to_string(data.join("operator.key"))
        .context("reading the server's operator.key")?
        .trim()
        .to_string();
    Ok(Server {
        child,
        url,
        _dir: dir,
        operator_key,
    })
}

#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub url: String,
}

impl Api {
    pub fn new(server: &Server) -> Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .build()?,
            url: server.url.clone(),
        })
    }

    pub async fn post(&self, key: &str, path: &str, body: &Value) -> Result<Value> {
        self.send_json(reqwest::Method::POST, key, path, body).await
    }

    pub async fn put(&self, key: &str, path: &str, body: &Value) -> Result<Value> {
        self.send_json(reqwest::Method::PUT, key, path, body).await
    }

    /// Sends `body` as JSON; any non-2xx answer is an error carrying the server's reply.
    async fn send_json(
        &self,
        method: reqwest::Method,
        key: &str,
        path: &str,
        body: &Value,
    ) -> Result<Value> {
        let response = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        let value: Value = response.json().await?;
        if !status.is_success() {
            bail!("{path}: HTTP {status}: {value}");
        }
        Ok(value)
    }

    /// POSTs and returns the status and the body (parsed if JSON), never failing on a
    /// refusal: the burst and the flood count statuses.
    pub async fn post_raw(&self, key: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    pub async fn get(&self, key: &str, path: &str) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(key)
            .send()
            .await?;
        let status = response.status();
        let value: Value = response.json().await?;
        if !status.is_success() {
            bail!("{path}: HTTP {status}: {value}");
        }
        Ok(value)
    }

    /// Creates an account; returns its API key.
    pub async fn account(&self, operator_key: &str, name: &str) -> Result<String> {
        let account = self
            .post(
                operator_key,
                "/v1/accounts",
                &serde_json::json!({ "name": name }),
            )
            .await?;
        Ok(account["api_key"]
            .as_str()
            .context("the account reply has no api_key")?
            .to_string())
    }

    /// Deploys an inline manifest (no files).
    pub async fn deploy(&self, key: &str, manifest: &str) -> Result<Value> {
        self.post(
            key,
            "/v1/deployments",
            &serde_json::json!({ "manifest": manifest, "files": {} }),
        )
        .await
    }
}
