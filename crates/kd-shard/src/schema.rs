//! The canonical Arrow schema of a v1 shard, its Parquet metadata keys, and the
//! machine-readable description kept in `schemas/shard-v1.json`.

use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde_json::{Value, json};

use crate::{Error, FORMAT_VERSION, MANIFEST_FILE, PARTIAL_MANIFEST_FILE};

/// Parquet key-value metadata key holding the format version (decimal string).
pub const META_FORMAT_VERSION: &str = "kd.format_version";
/// Parquet key-value metadata key holding `k`, the number of entries per position.
pub const META_TOP_K: &str = "kd.top_k";

/// Name of the list element field (the Parquet LIST convention's `element`).
pub(crate) const LIST_ITEM: &str = "element";

/// Column names in file order.
pub const COLUMNS: [&str; 7] = [
    "id",
    "source",
    "input_ids",
    "prompt_len",
    "topk_ids",
    "topk_logprobs",
    "token_logprob",
];

fn list_of(dt: DataType) -> DataType {
    DataType::List(Arc::new(Field::new(LIST_ITEM, dt, false)))
}

/// The canonical schema of a v1 shard: seven non-null columns, lists of non-null items.
pub fn arrow_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("input_ids", list_of(DataType::UInt32), false),
        Field::new("prompt_len", DataType::UInt32, false),
        Field::new("topk_ids", list_of(DataType::UInt32), false),
        Field::new("topk_logprobs", list_of(DataType::Float32), false),
        Field::new("token_logprob", list_of(DataType::Float32), false),
    ]))
}

/// Whether a type found in a file is acceptable where `expected` is canonical: list element
/// names and nullability are not compared (other writers name them `item`), and the string
/// columns may also be dictionary-encoded strings.
fn type_compatible(expected: &DataType, found: &DataType) -> bool {
    match (expected, found) {
        (DataType::List(e), DataType::List(f)) => e.data_type() == f.data_type(),
        (DataType::Utf8, DataType::Utf8) => true,
        (DataType::Utf8, DataType::Dictionary(key, value)) => {
            key.is_dictionary_key_type() && **value == DataType::Utf8
        }
        (e, f) => e == f,
    }
}

/// Checks that `found` has exactly the v1 columns, in order, with compatible types.
pub(crate) fn check_arrow_schema(path: &Path, found: &Schema) -> Result<(), Error> {
    let expected = arrow_schema();
    let names: Vec<&str> = found.fields().iter().map(|f| f.name().as_str()).collect();
    if names != COLUMNS {
        return Err(Error::schema(
            path,
            format!("columns are {names:?}, expected {COLUMNS:?}"),
        ));
    }
    for (e, f) in expected.fields().iter().zip(found.fields()) {
        if !type_compatible(e.data_type(), f.data_type()) {
            return Err(Error::schema(
                path,
                format!(
                    "column {} has type {}, expected {}",
                    e.name(),
                    f.data_type(),
                    e.data_type()
                ),
            ));
        }
    }
    Ok(())
}

/// Machine-readable description of the shard columns, the position convention, the Parquet
/// metadata keys and the manifest fields. Equal to the content of `schemas/shard-v1.json`
/// (a test keeps the two in sync; `KD_BLESS=1 cargo test -p kd-shard` rewrites the file).
pub fn schema_json() -> Value {
    json!({
        "$comment": "Generated from kd_shard::schema_json(); edit the code, then run `KD_BLESS=1 cargo test -p kd-shard schema_file` to rewrite this file.",
        "format": "kd-shard",
        "format_version": FORMAT_VERSION,
        "container": {
            "file_type": "parquet",
            "file_extension": ".parquet",
            "compression": "zstd",
            "row": "one row per sequence",
            "value_encodings": "written with BYTE_STREAM_SPLIT for topk_logprobs and token_logprob and dictionary encoding for ids; readers must accept any standard Parquet encoding",
            "readers": "any Parquet reader (pyarrow, DuckDB, polars, parquet-rs)"
        },
        "parquet_key_value_metadata": {
            META_FORMAT_VERSION: {
                "type": "string",
                "description": "format version as a decimal integer; readers refuse versions newer than they support"
            },
            META_TOP_K: {
                "type": "string",
                "description": "k, the number of top entries stored per distilled position, as a decimal integer"
            },
            "ARROW:schema": {
                "type": "string",
                "description": "Arrow IPC schema written by the Arrow Parquet writer (informative)"
            }
        },
        "position_convention": {
            "description": "Distilled position t runs over prompt_len-1 ..= len(input_ids)-2 and holds the teacher's distribution for predicting input_ids[t+1]. Position j = t-(prompt_len-1) owns topk_ids[j*k..(j+1)*k], topk_logprobs[j*k..(j+1)*k] and token_logprob[j].",
            "n_pos": "len(input_ids) - prompt_len",
            "first_position": "prompt_len - 1",
            "last_position": "len(input_ids) - 2",
            "target_of_position_t": "input_ids[t+1]",
            "temperature": "log-softmax at T=1, never tempered; apply any temperature later",
            "tail_mass": "1 - sum(exp(topk_logprobs[j*k..(j+1)*k]))"
        },
        "columns": [
            {
                "name": "id",
                "type": "utf8",
                "nullable": false,
                "description": "stable id of the prompt or document"
            },
            {
                "name": "source",
                "type": "utf8",
                "nullable": false,
                "enum": ["generated", "scored"],
                "description": "generated: the teacher wrote the response; scored: existing text scored by the teacher (dictionary-encoded utf8 is also accepted on read)"
            },
            {
                "name": "input_ids",
                "type": "list<uint32>",
                "nullable": false,
                "length": "len",
                "description": "the whole sequence: prompt then response; every id < vocab_size"
            },
            {
                "name": "prompt_len",
                "type": "uint32",
                "nullable": false,
                "description": "number of leading tokens that are not distilled; 1 <= prompt_len <= len"
            },
            {
                "name": "topk_ids",
                "type": "list<uint32>",
                "nullable": false,
                "length": "n_pos * k",
                "description": "top-k token ids per position, position-major, sorted by log-prob descending; distinct within a position; every id < vocab_size"
            },
            {
                "name": "topk_logprobs",
                "type": "list<float32>",
                "nullable": false,
                "length": "n_pos * k",
                "description": "teacher log-probabilities at T=1 aligned with topk_ids; finite, <= 0 (slack 1e-4), non-increasing within a position, sum(exp) <= 1 (slack 1e-3)"
            },
            {
                "name": "token_logprob",
                "type": "list<float32>",
                "nullable": false,
                "length": "n_pos",
                "description": "teacher log-probability of the token that actually follows, input_ids[t+1]; finite, <= 0 (slack 1e-4)"
            }
        ],
        "manifest": {
            "file": MANIFEST_FILE,
            "partial_file": PARTIAL_MANIFEST_FILE,
            "json_schema": "manifest-v1.schema.json",
            "commit_point": "manifest.json is written last, atomically; a directory without it holds no published data",
            "fields": {
                "format": "always \"kd-shard\"",
                "format_version": "integer; readers refuse versions newer than they support",
                "producer": "name and version of the program that wrote the cache",
                "teacher": "object identifying the teacher; must contain vocab_size",
                "tokenizer": "object identifying the tokenizer; must contain fingerprint and vocab_size",
                "input": "object identifying the input (path, sha256, rows)",
                "settings": "every dump setting; must contain top_k",
                "part": "{index, count} for one slice of a --part job, null for a whole job",
                "fingerprint": "sha256 hex of the canonical JSON (sorted keys, no whitespace) of {format_version, teacher, tokenizer, input, settings}",
                "complete": "true once every shard of the job is listed",
                "shards": "per shard: file (relative to the manifest's directory), rows, tokens, positions, response_tokens, bytes, sha256",
                "totals": "sums of rows, tokens, positions, response_tokens and bytes over shards"
            },
            "counts": {
                "tokens": "sum of len(input_ids)",
                "positions": "sum of n_pos",
                "response_tokens": "sum of n_pos over rows whose source is generated (tokens the teacher wrote)",
                "bytes": "file size in bytes",
                "sha256": "hex sha256 of the whole file"
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_schemas_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
    }

    /// `schema_json()` and `schemas/shard-v1.json` stay equal; `KD_BLESS=1` rewrites the file.
    #[test]
    fn schema_file_matches_code() {
        let path = repo_schemas_dir().join("shard-v1.json");
        let code = schema_json();
        if std::env::var_os("KD_BLESS").is_some() {
            let text = serde_json::to_string_pretty(&code).unwrap() + "\n";
            std::fs::write(&path, text).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run KD_BLESS=1 cargo test -p kd-shard schema_file",
                path.display()
            )
        });
        let file: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            file,
            code,
            "{} differs from schema_json(); run KD_BLESS=1 cargo test -p kd-shard schema_file",
            path.display()
        );
    }

    #[test]
    fn schema_json_lists_the_arrow_columns() {
        let v = schema_json();
        let names: Vec<&str> = v["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, COLUMNS);
        let schema = arrow_schema();
        for (c, f) in v["columns"].as_array().unwrap().iter().zip(schema.fields()) {
            let ty = match f.data_type() {
                DataType::Utf8 => "utf8".to_string(),
                DataType::UInt32 => "uint32".to_string(),
                DataType::List(item) => match item.data_type() {
                    DataType::UInt32 => "list<uint32>".to_string(),
                    DataType::Float32 => "list<float32>".to_string(),
                    other => panic!("unexpected item type {other}"),
                },
                other => panic!("unexpected type {other}"),
            };
            assert_eq!(c["type"], ty.as_str(), "column {}", f.name());
            assert_eq!(c["nullable"], f.is_nullable());
        }
    }

    #[test]
    fn schema_check_accepts_canonical_and_rejects_others() {
        let p = Path::new("x.parquet");
        check_arrow_schema(p, &arrow_schema()).unwrap();
        let mut fields: Vec<Field> = arrow_schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields[5] = Field::new("topk_logprobs", list_of(DataType::Float64), false);
        let r = check_arrow_schema(p, &Schema::new(fields.clone()));
        assert!(matches!(r, Err(Error::Schema { .. })));
        fields.pop();
        let r = check_arrow_schema(p, &Schema::new(fields));
        assert!(matches!(r, Err(Error::Schema { .. })));
    }
}
