//! Platform-wide limits, in one place so documentation and code cannot drift apart.

/// Largest accepted invocation request body and largest returned output (6 MB, as Lambda).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// Deepest nesting of arrays and objects accepted in a block's input, output and backpack
/// (a scalar is 0 levels deep, `[]` and `{}` 1, `{"a": [1]}` 2). The edge refuses deeper
/// input (400), every runtime reports deeper output as an `OutputTooDeep` error. Well
/// inside serde_json's recursion limit of 128, so each protocol frame (which wraps a
/// payload in one more object) and each API reply (a few more) still parses.
pub const MAX_JSON_DEPTH: usize = 64;

/// serde_json's default recursion limit: every JSON document the platform parses (frames,
/// replies, records) must nest less deeply than this.
pub const SERDE_JSON_RECURSION_LIMIT: usize = 128;

// A payload at the limit, wrapped in a frame, a reply or a listing, must still parse.
const _: () = assert!(MAX_JSON_DEPTH + 8 < SERDE_JSON_RECURSION_LIMIT);

/// Total size of one block's environment variables (names plus values, in bytes), as
/// Lambda's 4 KB for all variables of a function together.
pub const MAX_ENV_BYTES: usize = 4 * 1024;

/// Input and output are stored with an execution record up to this many bytes; the
/// rest is cut and the record says it was truncated.
pub const RECORDED_PAYLOAD_BYTES: usize = 64 * 1024;

/// Logs (stdout + stderr) kept per execution; later bytes are dropped with a marker.
pub const RECORDED_LOG_BYTES: usize = 256 * 1024;

/// Largest source file of one block, and of any one file uploaded with a deploy.
pub const MAX_SOURCE_BYTES: usize = 5 * 1024 * 1024;

/// Largest `refinery.toml` text (a manifest is configuration; inline `code = "..."`
/// counts towards it, bigger code belongs in `source = "..."` files).
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// Most files uploaded with one deploy.
pub const MAX_DEPLOY_FILES: usize = 256;

/// Largest total size of the files uploaded with one deploy (the code, unzipped; Lambda
/// allows 250 MB unzipped for compiled packages, Refinery's blocks are source text).
pub const MAX_DEPLOY_FILES_BYTES: usize = 16 * 1024 * 1024;

/// Largest deploy request body: the manifest and the files at their limits, as JSON,
/// with room for escaping (quotes, newlines, backslashes).
pub const MAX_DEPLOY_BODY_BYTES: usize = 24 * 1024 * 1024;

/// Block memory bounds in MB (Refinery's: 128–3008).
pub const MIN_MEMORY_MB: u32 = 128;
pub const MAX_MEMORY_MB: u32 = 3008;
pub const DEFAULT_MEMORY_MB: u32 = 128;

/// Block timeout bounds in seconds (Refinery's: up to 900).
pub const MAX_TIMEOUT_S: u32 = 900;
pub const DEFAULT_TIMEOUT_S: u32 = 30;

/// Per-block concurrency bounds.
pub const MAX_CONCURRENCY: u32 = 1000;
pub const DEFAULT_MAX_CONCURRENCY: u32 = 100;

/// Size of each instance's private `/tmp`, in MB (counted against its memory).
pub const DEFAULT_TMP_MB: u32 = 64;
pub const MAX_TMP_MB: u32 = 512;

/// Processes (and threads) one instance may hold at once.
pub const INSTANCE_PIDS_MAX: u32 = 64;

/// Longest per-block keep-alive an author may ask for.
pub const MAX_KEEP_ALIVE_S: u32 = 3600;
