//! [`Client`]: a JSON client of a server's API whose calls return errors instead of
//! panicking (what the benchmarks use; the tests use [`Server`]'s own requests).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::Server;

/// A client of one server's API, with a connection pool sized for load generation.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub url: String,
}

impl Client {
    pub fn new(server: &Server) -> Result<Client> {
        Ok(Client {
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
            .post(operator_key, "/v1/accounts", &json!({ "name": name }))
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
            &json!({ "manifest": manifest, "files": {} }),
        )
        .await
    }
}
