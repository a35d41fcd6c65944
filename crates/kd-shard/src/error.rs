//! The crate's typed error. Every variant that concerns a file carries its path.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing or checking a shard directory.
///
/// Match on variants, not on messages: the messages are for people.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The Parquet library rejected `path` (unreadable footer, corrupt page, ...).
    #[error("{}: parquet: {source}", path.display())]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// Arrow failed while decoding or assembling batches of `path`.
    #[error("{}: arrow: {source}", path.display())]
    Arrow {
        path: PathBuf,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// `path` is not valid JSON or does not have the manifest's shape; the message
    /// carries the line and column.
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// `path` was written by a newer format than this library reads.
    #[error(
        "{}: format version {found} is newer than the supported version {supported}; upgrade kd-shard",
        path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// `path` is well-formed but its schema (columns, types, metadata keys, manifest fields)
    /// is not the one this format requires.
    #[error("{}: schema: {what}", path.display())]
    Schema { path: PathBuf, what: String },
    /// `path` decodes but its content is inconsistent (bad row, null value, count mismatch).
    #[error("{}: corrupt: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    /// The sha256 of `path` is not the one the manifest recorded.
    #[error("{}: sha256 mismatch: manifest says {expected}, file has {actual}", path.display())]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A row handed to the writer for `path` is invalid; nothing was published.
    #[error("{}: row {index} (id {id:?}): {what}", path.display())]
    InvalidRow {
        path: PathBuf,
        index: usize,
        id: String,
        what: String,
    },
    /// A shard file name is not a safe relative path below the shard directory `path`;
    /// `what` quotes the name.
    #[error("{}: invalid shard path: {what}", path.display())]
    InvalidPath { path: PathBuf, what: String },
    /// Two manifests that must describe the same job differ at `field`
    /// (e.g. `settings.top_k: 32 vs 20`).
    #[error("identity mismatch at {field}: {what}")]
    Identity { field: String, what: String },
    /// The parts handed to [`crate::merge_manifests`] do not cover `0..count` exactly once.
    #[error("part coverage: {what}")]
    PartCoverage { what: String },
    /// An operation that would overwrite or mix what it must not (a merge into a folder that
    /// already holds a cache, a part that is not complete).
    #[error("{}: {what}", path.display())]
    Refused { path: PathBuf, what: String },
    /// The output folder is held by another process.
    #[error(transparent)]
    Lock(#[from] kd_fs::LockError),
}

impl From<kd_fs::IoError> for Error {
    fn from(e: kd_fs::IoError) -> Self {
        Error::Io {
            path: e.path,
            source: e.source,
        }
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parquet(path: impl Into<PathBuf>, source: parquet::errors::ParquetError) -> Self {
        Error::Parquet {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            what: what.into(),
        }
    }

    pub(crate) fn schema(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Schema {
            path: path.into(),
            what: what.into(),
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
