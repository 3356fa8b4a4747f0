//! Project shared files (Refinery's "shared files"): directories of the project several
//! blocks use — common code, data, models — declared once in the manifest and listed by the
//! blocks that see them.
//!
//! ```toml
//! [[shared]]
//! name = "common"            # the directory's name inside instances: /shared/common
//! source = "common/"         # a directory of the project (the trailing `/` is optional)
//!
//! [[blocks]]
//! name = "greet"
//! # ...
//! shared = ["common"]        # the shared directories this block sees
//! ```
//!
//! - Uploaded once per deploy (not per block) and stored with the deployment; a rollback
//!   brings back the shared files of the deployment rolled back to.
//! - Inside an instance each listed directory is `/shared/<name>`, read-only (and mounted
//!   `noexec`: data and source, not native libraries). A block that does not list a shared
//!   directory cannot see it: its instances have no `/shared/<name>`.
//! - Python: every listed `/shared/<name>` is on `sys.path` right after the block's own
//!   code (in name order), so `import common_util` finds `common/common_util.py`. Node:
//!   `/shared` is on the CommonJS search path (`NODE_PATH`), so `require("common/util")`
//!   finds `/shared/common/util.js`; an ES module imports it by path (`import x from
//!   "/shared/common/util.mjs"`). Any language reads the files at `/shared/<name>/...`.
//! - Files are any bytes (binary ones travel as base64 in the deploy request); the same
//!   path rules, symlink rule and limits as a directory source apply to each shared
//!   directory ([`crate::source`]), and every shared file counts towards the deploy's
//!   totals and the account's storage.
//! - At most [`MAX_SHARED_DIRS`] shared directories per project. Each declared one must be
//!   listed by some block (an unlisted one would be uploaded and stored for nothing).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most `[[shared]]` directories in one manifest.
pub const MAX_SHARED_DIRS: usize = 16;

/// One shared directory of a deployment: its name and its files (path relative to the
/// directory → bytes; text files as their UTF-8 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedDir {
    pub name: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl SharedDir {
    /// Bytes of its files.
    pub fn bytes(&self) -> usize {
        self.files.values().map(Vec::len).sum()
    }
}
