use std::path::PathBuf;

/// Errors of a dump. Variants name the file, line, row or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {what}")]
    BadLine {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("{path}: no records (the input is empty)")]
    EmptyInput { path: PathBuf },
    #[error("invalid setting `{field}`: {what}")]
    Setting { field: String, what: String },
    #[error("{dir}: another teacher-dump is writing into this folder (lock {lock} is held)")]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("{dir}: already holds a dump; pass --resume to continue it or choose another folder")]
    Exists { dir: PathBuf },
    #[error("{dir}: cannot resume: {field} differs from the interrupted dump ({what})")]
    ResumeMismatch {
        dir: PathBuf,
        field: String,
        what: String,
    },
    #[error("{}: row `{id}` (line {line}): {what}", path.display())]
    Row {
        path: PathBuf,
        id: String,
        line: usize,
        what: String,
    },
    #[error(transparent)]
    Model(#[from] kd_model::Error),
    #[error(transparent)]
    Shard(#[from] kd_shard::Error),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<kd_fs::IoError> for Error {
    fn from(e: kd_fs::IoError) -> Self {
        Error::Io {
            path: e.path,
            source: e.source,
        }
    }
}
