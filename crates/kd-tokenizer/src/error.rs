//! Typed errors: every failure names the file, metadata key or JSON field at fault.

use std::path::PathBuf;

/// Everything that can go wrong while loading a tokenizer or rendering a chat template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file is not valid JSON.
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// An error inside a file, wrapped so that the message names the file.
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },

    /// A required GGUF metadata key or JSON field is absent.
    #[error("missing field `{field}`")]
    MissingField { field: String },

    /// A field is present but holds the wrong kind of value.
    #[error("field `{field}` should be {expected}")]
    WrongType {
        field: String,
        expected: &'static str,
    },

    /// A field has the right type but an unusable value.
    #[error("field `{field}`: {message}")]
    InvalidField { field: String, message: String },

    /// A merge rule names a token that is not in the vocabulary.
    #[error("merge #{index} `{left} {right}` in `{field}`: {message}")]
    BadMerge {
        field: String,
        index: usize,
        left: String,
        right: String,
        message: String,
    },

    /// `tokenizer.ggml.pre` (or a `from_parts` caller) names a pre-tokenizer this crate does not know.
    #[error("unknown pre-tokenizer `{name}` (supported: {supported})")]
    UnknownPreTokenizer {
        name: String,
        supported: &'static str,
    },

    /// A valid configuration this crate does not implement (say, a normalizer).
    #[error("unsupported {what}")]
    Unsupported { what: String },

    /// A pre-tokenizer regex does not compile.
    #[error("invalid pre-tokenizer regex `{pattern}`: {message}")]
    Regex { pattern: String, message: String },

    /// The chat template does not parse.
    #[error("chat template does not compile: {message}")]
    TemplateSyntax { message: String },

    /// Rendering the chat template failed (undefined operation, bad value, ...).
    #[error("chat template failed to render: {message}")]
    TemplateRender { message: String },

    /// The chat template called `raise_exception(message)`, e.g. to reject a role order.
    #[error("chat template raised an exception: {message}")]
    TemplateRaised { message: String },
}

impl Error {
    /// The innermost error, looking through [`Error::InFile`] wrappers; handy
    /// for matching on the variant that describes the actual problem.
    pub fn root(&self) -> &Error {
        match self {
            Error::InFile { source, .. } => source.root(),
            other => other,
        }
    }

    pub(crate) fn in_file(self, path: &std::path::Path) -> Error {
        match self {
            // Already names its file.
            e @ (Error::Io { .. } | Error::Json { .. } | Error::InFile { .. }) => e,
            e => Error::InFile {
                path: path.to_path_buf(),
                source: Box::new(e),
            },
        }
    }

    pub(crate) fn missing(field: impl Into<String>) -> Error {
        Error::MissingField {
            field: field.into(),
        }
    }

    pub(crate) fn wrong_type(field: impl Into<String>, expected: &'static str) -> Error {
        Error::WrongType {
            field: field.into(),
            expected,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
