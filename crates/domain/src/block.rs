//! A Code Block as deployed: everything needed to start an instance of it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The languages a block can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Node,
    Shell,
}

impl Language {
    pub const ALL: [Language; 3] = [Language::Python, Language::Node, Language::Shell];

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Node => "node",
            Language::Shell => "shell",
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Language {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Language::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| format!("unknown language `{s}`: expected one of python, node, shell"))
    }
}

/// One block of one deployment, fully resolved (source read, defaults applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSpec {
    pub name: String,
    pub language: Language,
    /// File name the source is stored under inside the instance (`/code/<source_name>`);
    /// kept from the manifest so tracebacks name the author's file.
    pub source_name: String,
    /// The block's source code.
    pub code: String,
    pub memory_mb: u32,
    pub timeout_s: u32,
    pub max_concurrency: u32,
    /// Idle time after which a warm instance is reaped; `None` uses the server's default.
    pub keep_alive_s: Option<u32>,
    /// Provisioned concurrency: instances started at deploy, before any traffic, and kept
    /// warm (never reaped, replaced when discarded) while the deployment is live.
    #[serde(default)]
    pub min_warm: u32,
    /// Size of the instance's private `/tmp`.
    pub tmp_mb: u32,
    pub env: BTreeMap<String, String>,
    /// Outbound network (`network = true`): through a user-mode stack, never to the host's
    /// loopback, link-local or private ranges. False (the default): no network at all.
    #[serde(default)]
    pub network: bool,
}
