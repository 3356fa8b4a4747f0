//! What can go wrong in the store, worded for the person who has to fix it.

use std::path::PathBuf;

/// Every failure of a [`crate::Store`] method.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error(
        "creating data directory {}: {source}; check that its parent exists and is writable \
         by this user, or pass another data directory",
        path.display()
    )]
    CreateDataDir {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The secrets key file (`<data_dir>/secrets.key`) could not be created or read.
    #[error(
        "secrets key {}: {message}; the file holds the 32-byte key that seals every project's \
         secrets: restore it from a backup of the data directory, or (losing every stored \
         secret) move it away and set the secrets again",
        path.display()
    )]
    SecretKey { path: PathBuf, message: String },

    /// A secret the caller named does not exist.
    #[error("project `{project}` has no secret `{name}`: `refinery secrets list {project}` shows the names it has")]
    SecretNotFound { project: String, name: String },

    /// A project already holds the most secrets it may.
    #[error("project `{project}` already has {limit} secrets, the most a project may hold: delete one it no longer needs (`refinery secrets delete {project} NAME`)")]
    TooManySecrets { project: String, limit: usize },

    /// The database file could not be opened or created.
    #[error(
        "opening database {}: {source}; check that the file and its directory are writable \
         and that the disk is not full",
        path.display()
    )]
    Open { path: PathBuf, source: sqlx::Error },

    /// The schema migrations could not be applied (or the database is newer than this
    /// binary).
    #[error(
        "migrating database {}: {source}; if the database was written by a newer Refinery, \
         upgrade this binary; otherwise restore it from a backup",
        path.display()
    )]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },

    /// `create_account` with a name already taken.
    #[error("an account named `{0}` already exists; choose another name")]
    AccountExists(String),

    /// An API key whose hash is already registered (practically: the same key twice).
    #[error("this API key is already registered; generate a new key")]
    KeyExists,

    /// An operation named an account id that does not exist.
    #[error("account `{0}` does not exist; create it first or check the id")]
    AccountNotFound(String),

    /// The account has no project of that name.
    #[error("project `{0}` not found; check the name, or deploy it first")]
    ProjectNotFound(String),

    /// The project has no deployment with that number.
    #[error(
        "deployment {number} of project `{project}` not found; list the project's \
         deployments to see the valid numbers"
    )]
    DeploymentNotFound { project: String, number: i64 },

    /// The deployment existed but retention pruned it (`Retention::keep`).
    #[error(
        "deployment {number} of project `{project}` was pruned (only the project's most \
         recent deployments are kept); list the kept ones, or deploy that version again"
    )]
    DeploymentPruned { project: String, number: i64 },

    /// A deploy would take the account's deployments over its storage quota; nothing
    /// was stored.
    #[error(
        "this deployment needs {needed_bytes} bytes of storage; the account holds \
         {used_bytes} bytes (of which {freed_bytes} would be pruned), and its quota is \
         {limit_bytes} bytes"
    )]
    StorageQuota {
        used_bytes: u64,
        needed_bytes: u64,
        freed_bytes: u64,
        limit_bytes: u64,
    },

    /// Concurrent deploys of one project kept colliding on the deployment number.
    #[error(
        "deploying project `{0}`: other deploys of the same project kept taking the next \
         deployment number; retry the deploy"
    )]
    DeployContention(String),

    /// A database operation failed; `operation` says which.
    #[error("{operation}: {source}")]
    Database {
        operation: String,
        source: sqlx::Error,
    },

    /// A stored row holds a value this binary cannot read back.
    /// A failure of the execution writer (its own connection, see `execution_writer.rs`).
    #[error("{operation}: {source}")]
    Write {
        operation: String,
        source: rusqlite::Error,
    },

    /// The filesystem holding the database was full: nothing of the operation was written
    /// (see [`StoreError::is_disk_full`], which also recognises the other variants' forms).
    #[error("{operation}")]
    DiskFull { operation: String },

    #[error("starting the thread of {what}: {source}; check the process and thread limits")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },

    #[error("the store is closed (the server is shutting down): {0} can no longer be written")]
    Closed(&'static str),

    /// A writer thread gave up an operation before it was written (it panicked: a bug):
    /// nothing of it was written.
    #[error(
        "{0} was not written: it failed unexpectedly on the store's writer thread and was \
         rolled back (a bug: the server log has the panic); retry it, and report it"
    )]
    Interrupted(&'static str),

    #[error("database holds invalid data ({0}); restore from a backup or report a bug")]
    Corrupt(String),
}

impl StoreError {
    /// Whether this failed because the filesystem holding the database is full (SQLite's
    /// `SQLITE_FULL`, or `ENOSPC` from a file operation): an outage of the host, worth a
    /// retry once space returns, not a bug.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull { .. } => true,
            StoreError::Write { source, .. } => {
                source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            }
            StoreError::Database { source, .. } | StoreError::Open { source, .. } => {
                sqlx_disk_full(source)
            }
            StoreError::Migrate {
                source: sqlx::migrate::MigrateError::Execute(source),
                ..
            } => sqlx_disk_full(source),
            StoreError::CreateDataDir { source, .. } => {
                source.kind() == std::io::ErrorKind::StorageFull
            }
            _ => false,
        }
    }

    pub(crate) fn write(
        operation: impl Into<String>,
    ) -> impl FnOnce(rusqlite::Error) -> StoreError {
        let operation = operation.into();
        move |source| StoreError::Write { operation, source }
    }

    /// Wraps a sqlx error with the operation that failed, e.g. `inserting execution X`.
    pub(crate) fn db(operation: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
        let operation = operation.into();
        move |source| StoreError::Database { operation, source }
    }
}

/// SQLite's primary result code for "database or disk is full".
const SQLITE_FULL: i32 = 13;

fn sqlx_disk_full(e: &sqlx::Error) -> bool {
    match e {
        // sqlx reports the extended result code; its low byte is the primary one.
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| code & 0xff == SQLITE_FULL),
        sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::StorageFull,
        _ => false,
    }
}
