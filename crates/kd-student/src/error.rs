//! The crate's typed error. The loader's own errors are [`crate::data::Error`]; every other
//! library this crate calls keeps its type inside a variant.

use std::path::PathBuf;

/// Everything that can go wrong preparing, training, evaluating or exporting a student.
///
/// Match on variants, not on messages: the messages are for people.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Settings that cannot run together, or a student that does not fit the data (its
    /// vocabulary, its engine, its initialisation).
    #[error("{what}")]
    Setting { what: String },
    /// A checkpoint that does not belong to this run.
    #[error("{what}")]
    Resume { what: String },
    /// Training stopped: a loss that is not finite, a batch with nothing to distil, an
    /// interrupt (a checkpoint is written first).
    #[error("{what}")]
    Training { what: String },
    /// Data the model cannot take (a token outside its vocabulary, a row beyond its context,
    /// a parameter of the wrong shape).
    #[error("{what}")]
    Input { what: String },
    /// What `what` says, caused by `source`.
    #[error("{what}: {source}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },
    /// A file that is not the JSON it should be.
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Io(#[from] kd_fs::IoError),
    #[error(transparent)]
    Lock(#[from] kd_fs::LockError),
    #[error(transparent)]
    Data(#[from] crate::data::Error),
    #[error(transparent)]
    Shard(#[from] kd_shard::Error),
    #[error(transparent)]
    Model(#[from] kd_model::Error),
    #[error(transparent)]
    Tokenizer(#[from] kd_tokenizer::Error),
    #[error(transparent)]
    Resolve(#[from] crate::resolve::ResolveError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Serialize(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// This error as the cause of `what`.
    pub fn context(self, what: impl Into<String>) -> Error {
        Error::Context {
            what: what.into(),
            source: Box::new(self),
        }
    }
}

/// `return Err(Error::<Kind> { what: format!(…) })`.
macro_rules! refuse {
    ($kind:ident, $($fmt:tt)*) => {
        return Err($crate::error::Error::$kind { what: format!($($fmt)*) })
    };
}

/// `Error::<Kind> { what: format!(…) }`.
macro_rules! error {
    ($kind:ident, $($fmt:tt)*) => {
        $crate::error::Error::$kind { what: format!($($fmt)*) }
    };
}

pub(crate) use {error, refuse};
