//! A Code Block as deployed: everything needed to start an instance of it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

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

/// The handler function when the manifest names none.
pub const DEFAULT_FUNCTION: &str = "main";

fn default_function() -> String {
    DEFAULT_FUNCTION.to_string()
}

/// One block of one deployment, fully resolved (source read, defaults applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSpec {
    pub name: String,
    pub language: Language,
    /// File name the source is stored under inside the instance (`/code/<source_name>`);
    /// kept from the manifest so tracebacks name the author's file.
    pub source_name: String,
    /// The block's source code (for a directory source: its handler's file).
    pub code: String,
    /// A directory source's other files: path relative to the block's directory (`/`
    /// separated, e.g. `lib/helper.py`) → contents. Empty for a single-file block.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// A directory source's files that are not UTF-8 text (images, models, data): path →
    /// bytes, laid out beside `files` byte for byte.
    #[serde(default)]
    pub binary_files: BTreeMap<String, Vec<u8>>,
    /// The project's shared directories this block lists (`shared = ["common"]`), in the
    /// order listed: visible read-only at `/shared/<name>` in its instances, and no others.
    /// One `Arc` per directory is shared by every block of the deployment that lists it.
    #[serde(default)]
    pub shared: Vec<Arc<crate::SharedDir>>,
    /// The handler function in `source_name`: the `function` of `handler =
    /// "module.function"` (default `main`).
    #[serde(default = "default_function")]
    pub function: String,
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
    /// Variables whose value is one of the project's secrets (`env = { TOKEN = { secret =
    /// "api-token" } }`): variable → secret name. Only the names are stored with the
    /// deployment; the pool reads the values when it starts an instance.
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    /// Outbound network (`network = true`): through a user-mode stack, never to the host's
    /// loopback, link-local or private ranges. False (the default): no network at all.
    #[serde(default)]
    pub network: bool,
    /// The dependency layer built at deploy from the block's `requirements.txt` /
    /// `package.json` (its key: a hex SHA-256, under the account's layer dir), mounted
    /// read-only into its instances. None: the block declares no dependencies.
    #[serde(default)]
    pub deps_layer: Option<String>,
}

impl BlockSpec {
    /// Every file of the block's code dir as the author wrote it: the handler's file and,
    /// for a directory source, the others (paths relative to the block's directory).
    pub fn source_files(&self) -> impl Iterator<Item = (&str, &str)> {
        std::iter::once((self.source_name.as_str(), self.code.as_str())).chain(
            self.files
                .iter()
                .map(|(path, contents)| (path.as_str(), contents.as_str())),
        )
    }

    /// Bytes of code: the handler's file and every other file of a directory source
    /// (binary ones included; not the shared directories, counted once per deployment).
    pub fn code_bytes(&self) -> usize {
        self.source_files().map(|(_, c)| c.len()).sum::<usize>()
            + self.binary_files.values().map(Vec::len).sum::<usize>()
    }
}
