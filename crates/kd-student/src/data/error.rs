//! The loader's typed error. Every variant about a file carries its path; every variant about
//! a row carries its id.

use std::path::PathBuf;

/// Everything that can go wrong opening, caching, splitting, batching or joining shard sets.
///
/// Match on variants, not on messages: the messages are for people.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The shard format library refused a file (manifest shape, Parquet decoding, ...).
    #[error(transparent)]
    Shard(#[from] kd_shard::Error),
    /// An operating-system I/O error on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `manifest.json` at `path` says `complete: false`: the dump did not finish.
    #[error("{}: manifest is not complete (the dump did not commit)", path.display())]
    Incomplete { path: PathBuf },
    /// The manifest's recorded `fingerprint` is not the hash of its identity fields.
    #[error("{}: fingerprint: recorded {recorded}, identity hashes to {computed}", path.display())]
    Fingerprint {
        path: PathBuf,
        recorded: String,
        computed: String,
    },
    /// A manifest field is missing or inconsistent (`field` is its JSON path, e.g. `totals`).
    #[error("{}: manifest field {field}: {what}", path.display())]
    Manifest {
        path: PathBuf,
        field: String,
        what: String,
    },
    /// Shard `path` does not have the size the manifest recorded.
    #[error("{}: size mismatch: manifest says {expected} bytes, file has {actual}", path.display())]
    ShardSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// Shard `path` does not have the sha256 the manifest recorded.
    #[error("{}: sha256 mismatch: manifest says {expected}, file has {actual}", path.display())]
    ShardHash {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// Row `index` of shard `path` breaks the format's invariants; no cache was published.
    #[error("{}: row {index} (id {id:?}): {what}", path.display())]
    InvalidRow {
        path: PathBuf,
        index: usize,
        id: String,
        what: String,
    },
    /// The decoded cache at `path` is not what its header promises.
    #[error("{}: a shard file the manifest does not list (from another dump?); move it away or re-dump", path.display())]
    Unlisted { path: PathBuf },

    #[error("{}: cache: {what}", path.display())]
    Cache { path: PathBuf, what: String },
    /// A loader setting is out of range (`field` names it).
    #[error("config {field}: {what}")]
    Config { field: String, what: String },
    /// Two shard sets that must describe the same data differ at `field` (e.g.
    /// `tokenizer.fingerprint`), or teacher `teacher` disagrees with teacher 0 on row `id`.
    #[error("teacher {teacher}: {}{field}: {what}", id.as_deref().map(|i| format!("row {i:?}: ")).unwrap_or_default())]
    Mismatch {
        teacher: usize,
        id: Option<String>,
        field: String,
        what: String,
    },
    /// A loader position does not fit the data it is restored into.
    #[error("restore: {what}")]
    Restore { what: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(field: &str, what: impl Into<String>) -> Self {
        Error::Config {
            field: field.to_string(),
            what: what.into(),
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
