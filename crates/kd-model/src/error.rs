use std::path::PathBuf;

/// Errors from loading or running a model. Every file-related variant names its file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable GGUF file: {source}")]
    Gguf {
        path: PathBuf,
        source: Box<candle_core::Error>,
    },
    /// The GGUF header is inconsistent with the file (see [`crate::gguf_check`]); refused
    /// before candle reads it.
    #[error("{path}: not a valid GGUF file: {what}")]
    BadGguf { path: PathBuf, what: String },
    #[error("{path}: missing metadata field `{field}`")]
    MissingField { path: PathBuf, field: String },
    #[error("{path}: field `{field}`: {what}")]
    BadField {
        path: PathBuf,
        field: String,
        what: String,
    },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: unsupported architecture `{arch}` (supported: llama, mistral, qwen2, qwen3)")]
    Architecture { path: PathBuf, arch: String },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}", in_file(path, source))]
    Tokenizer {
        path: PathBuf,
        source: Box<kd_tokenizer::Error>,
    },
    #[error(
        "{path}: no model found (expected a .gguf file or a directory with config.json, *.safetensors and tokenizer.json)"
    )]
    NotAModel { path: PathBuf },
    #[error("sequence of {len} tokens exceeds the model's context of {max} tokens")]
    TooLong { len: usize, max: usize },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("layer {index} does not exist: the teacher has {n_layers} layers")]
    LayerOutOfRange { index: usize, n_layers: usize },
    #[error("no layers selected: a student needs at least one layer")]
    EmptyLayerSelection,
    #[error("{path}: unexpected tensor `{name}` (not a parameter of this model)")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{path}: safetensors: {source}")]
    Safetensors {
        path: PathBuf,
        source: Box<candle_core::Error>,
    },
    #[error("invalid batch: {what}")]
    InvalidBatch { what: String },
    #[error("tensor computation failed: {0}")]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `source` prefixed with `path` unless its message already starts with it.
fn in_file(path: &std::path::Path, source: &impl std::fmt::Display) -> String {
    let msg = source.to_string();
    let p = path.display().to_string();
    if msg.starts_with(&p) {
        msg
    } else {
        format!("{p}: {msg}")
    }
}
