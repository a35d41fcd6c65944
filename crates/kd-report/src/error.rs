//! The crate's typed error. Every variant that concerns a file names it, and a bad JSON Lines
//! record also names its line, so a message reads `runs/sft/metrics.jsonl:7: ...`.

use std::path::{Path, PathBuf};

/// Everything that can go wrong reading a study folder or writing its report.
///
/// Match on variants, not on messages: the messages are for people. Each message is complete
/// on its own (it includes the underlying cause), so print it with `{}` or `{:#}` alike.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error on `path` (missing file, permission, full disk).
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// `path` is not valid JSON or does not have the expected shape; the message carries the
    /// line and column.
    #[error("{}: {message}", path.display())]
    Json { path: PathBuf, message: String },
    /// Line `line` (1-based) of the JSON Lines file `path` is not a valid record; the message
    /// carries the column.
    #[error("{}:{line}: {message}", path.display())]
    JsonLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// The run's `metrics.jsonl` at `path` has no evaluation line (an object with an `eval`
    /// field), so the method has no held-out curve.
    #[error(
        "{}: no evaluation lines (objects with an \"eval\" field); the run must evaluate at least once",
        path.display()
    )]
    NoEvalLines { path: PathBuf },
    /// `path` is well-formed but its content cannot be used (e.g. a manifest with 0 positions).
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    /// plotters failed while drawing the plot `plot` (a file name such as `kl.png`).
    #[error("{plot}: drawing failed: {what}")]
    Plot { plot: String, what: String },
    /// The font bundled in the crate could not be parsed (a corrupt build).
    #[error("the bundled font fonts/DejaVuSans.ttf could not be parsed")]
    Font,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub(crate) fn io(path: &Path, err: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            err,
        }
    }

    /// A whole-file JSON error on `path`.
    pub(crate) fn json(path: &Path, err: &serde_json::Error) -> Self {
        Error::Json {
            path: path.to_path_buf(),
            message: err.to_string(),
        }
    }

    /// A JSON error on line `line` of the JSON Lines file `path`. serde_json sees one line as
    /// the whole document, so its "at line 1 column C" becomes "at column C".
    pub(crate) fn json_line(path: &Path, line: usize, err: &serde_json::Error) -> Self {
        let full = err.to_string();
        let suffix = format!(" at line {} column {}", err.line(), err.column());
        let message = match full.strip_suffix(&suffix) {
            Some(head) if err.line() == 1 => format!("{head} at column {}", err.column()),
            _ => full,
        };
        Error::JsonLine {
            path: path.to_path_buf(),
            line,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_message_names_file_line_and_column() {
        let err = serde_json::from_str::<serde_json::Value>("{\"step\": }").unwrap_err();
        let e = Error::json_line(Path::new("runs/sft/metrics.jsonl"), 7, &err);
        assert_eq!(
            e.to_string(),
            "runs/sft/metrics.jsonl:7: expected value at column 10"
        );
    }
}
