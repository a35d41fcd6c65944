//! The canonical Arrow schemas of v1 and v2 shards, their Parquet metadata keys, and the
//! machine-readable descriptions kept in `schemas/shard-v1.json` and `schemas/shard-v2.json`.

use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde_json::{Value, json};

use crate::{Error, FORMAT_VERSION, MANIFEST_FILE, PARTIAL_MANIFEST_FILE};

/// Parquet key-value metadata key holding the format version (decimal string).
pub const META_FORMAT_VERSION: &str = "kd.format_version";
/// Parquet key-value metadata key holding `k`, the number of entries per position.
pub const META_TOP_K: &str = "kd.top_k";

/// Parquet key-value metadata key of a v2 shard holding the log-prob scale `S` (decimal
/// string): a stored integer `q` stands for the log-probability `-q / S`.
pub const META_LOGPROB_SCALE: &str = "kd.logprob_scale";

/// The log-prob scale v2 shards are written with: steps of 1/1024 nats, rounded down (toward
/// smaller probabilities), so every stored log-prob is within 1/1024 nats (< 1e-3) of the
/// exact one and never above it, and `-q / 1024` is exact in f32.
pub const LOGPROB_SCALE: u32 = 1024;

/// Name of the list element field (the Parquet LIST convention's `element`).
pub(crate) const LIST_ITEM: &str = "element";

/// Parquet key-value metadata key of a v2 shard holding the tail scale `T` (decimal string):
/// `tail_logmass_q` holds round(-ln(tail mass) · T).
pub const META_TAIL_SCALE: &str = "kd.tail_scale";

/// Parquet key-value metadata key of a v2 shard holding `n`, the number of sampled targets
/// per position (decimal string; 0 when the shard holds top-k targets only).
pub const META_SAMPLES: &str = "kd.samples";

/// Column names of a v2 shard with draws, in file order: the draws of a position are the next
/// token's (`sample_token_count` of them, with the log-prob `token_logprob_q`) and the other
/// distinct ids (`sample_ids`, `sample_logprob_gaps`, `sample_counts`). Shards without draws
/// end at `sample_logprob_q` ([`DRAW_COLUMNS_REPEATS`]); shards written before the next token
/// was taken out of the draws store each distinct id ([`DRAW_COLUMNS_BY_ID`]). Readers take
/// all three.
pub const COLUMNS_V2: [&str; 12] = [
    "id",
    "source",
    "input_ids",
    "prompt_len",
    "topk_ids",
    "topk_logprob_gaps",
    "token_logprob_q",
    "tail_logmass_q",
    "sample_ids",
    "sample_logprob_gaps",
    "sample_counts",
    "sample_token_count",
];

/// The draws' columns of a v2 shard without draws (its two sample lists are empty), and of
/// sampled shards written before `sample_counts`, which hold every draw with its repeats;
/// they follow the first eight columns of [`COLUMNS_V2`].
pub const DRAW_COLUMNS_REPEATS: [&str; 2] = ["sample_ids", "sample_logprob_q"];

/// The draws' columns of a sampled v2 shard written before the next token was taken out of
/// the draws: each position's distinct drawn ids ascending, with `ceil(-lp·S)` and a count
/// each.
pub const DRAW_COLUMNS_BY_ID: [&str; 3] = ["sample_ids", "sample_logprob_q", "sample_counts"];

/// How a v2 shard stores its draws, told by its columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DrawLayout {
    /// [`DRAW_COLUMNS_REPEATS`]: every draw with its repeats (empty lists without draws).
    Repeats,
    /// [`DRAW_COLUMNS_BY_ID`]: each distinct id once, ascending, with a count.
    ById,
    /// [`COLUMNS_V2`]: the next token's count, then the other distinct ids by log-prob.
    TokenFirst,
}

impl DrawLayout {
    /// The columns of this layout, in file order.
    pub(crate) fn columns(self) -> Vec<&'static str> {
        let draws: &[&'static str] = match self {
            DrawLayout::Repeats => &DRAW_COLUMNS_REPEATS,
            DrawLayout::ById => &DRAW_COLUMNS_BY_ID,
            DrawLayout::TokenFirst => &COLUMNS_V2[8..],
        };
        COLUMNS_V2[..8].iter().chain(draws).copied().collect()
    }

    /// The layout whose columns are `names`, if any.
    pub(crate) fn of(names: &[&str]) -> Option<DrawLayout> {
        [
            DrawLayout::Repeats,
            DrawLayout::ById,
            DrawLayout::TokenFirst,
        ]
        .into_iter()
        .find(|l| l.columns() == names)
    }
}

/// Column names of a v1 shard in file order.
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
    columns_schema(&COLUMNS, DataType::Float32)
}

/// The canonical schema of a v2 shard with draws: as v1, with the two log-prob columns stored
/// as integers (`topk_logprob_gaps`, `token_logprob_q`), then `tail_logmass_q` and the draws'
/// four columns ([`COLUMNS_V2`]).
pub fn arrow_schema_v2() -> SchemaRef {
    arrow_schema_v2_of(DrawLayout::TokenFirst)
}

/// The schema of a v2 shard whose draws are stored as `layout` says.
pub(crate) fn arrow_schema_v2_of(layout: DrawLayout) -> SchemaRef {
    let names = layout.columns();
    let base = columns_schema(names[..7].try_into().expect("seven"), DataType::UInt32);
    let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
    for name in &names[7..] {
        fields.push(Field::new(*name, list_of(DataType::UInt32), false));
    }
    Arc::new(Schema::new(fields))
}

/// id, source, input_ids, prompt_len, topk_ids, then two log-prob lists of `logprob` items.
fn columns_schema(names: &[&str; 7], logprob: DataType) -> SchemaRef {
    let types = [
        DataType::Utf8,
        DataType::Utf8,
        list_of(DataType::UInt32),
        DataType::UInt32,
        list_of(DataType::UInt32),
        list_of(logprob.clone()),
        list_of(logprob),
    ];
    Arc::new(Schema::new(
        names
            .iter()
            .zip(types)
            .map(|(n, t)| Field::new(*n, t, false))
            .collect::<Vec<_>>(),
    ))
}

/// The column names of format `version` (1 or 2), in file order.
pub(crate) fn columns_of(version: u32) -> &'static [&'static str] {
    if version >= 2 { &COLUMNS_V2 } else { &COLUMNS }
}

/// The canonical schema of format `version` (1 or 2).
pub fn arrow_schema_of(version: u32) -> SchemaRef {
    if version >= 2 {
        arrow_schema_v2()
    } else {
        arrow_schema()
    }
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

/// Checks that `found` has exactly the columns of format `version`, in order, with
/// compatible types.
/// Returns the draws' layout of a v2 shard (`None` for format 1).
pub(crate) fn check_arrow_schema(
    path: &Path,
    found: &Schema,
    version: u32,
) -> Result<Option<DrawLayout>, Error> {
    let want = columns_of(version);
    let names: Vec<&str> = found.fields().iter().map(|f| f.name().as_str()).collect();
    let layout = (version >= 2).then(|| DrawLayout::of(&names)).flatten();
    if names != want && layout.is_none() {
        return Err(Error::schema(
            path,
            format!(
                "columns are {names:?}, expected {want:?}{} (format version {version})",
                if version >= 2 {
                    format!(" (or ending {DRAW_COLUMNS_REPEATS:?} or {DRAW_COLUMNS_BY_ID:?})")
                } else {
                    String::new()
                }
            ),
        ));
    }
    let expected = match layout {
        Some(l) => arrow_schema_v2_of(l),
        None => arrow_schema_of(version),
    };
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
    Ok(layout)
}

/// Machine-readable description of the newest format ([`FORMAT_VERSION`]); see
/// [`schema_json_of`].
pub fn schema_json() -> Value {
    schema_json_of(FORMAT_VERSION)
}

/// Machine-readable description of format `version` (1 or 2): the shard columns, the position
/// convention, the Parquet metadata keys and the manifest fields. Equal to the content of
/// `schemas/shard-v{version}.json` (a test keeps them in sync; `KD_BLESS=1 cargo test -p
/// kd-shard` rewrites the files).
pub fn schema_json_of(version: u32) -> Value {
    let mut v = schema_json_v1();
    if version < 2 {
        return v;
    }
    v["format_version"] = json!(2);
    v["$comment"] = json!(
        "Generated from kd_shard::schema_json_of(2); edit the code, then run `KD_BLESS=1 cargo test -p kd-shard schema_file` to rewrite this file."
    );
    v["container"]["value_encodings"] = json!(
        "written with BYTE_STREAM_SPLIT for input_ids, topk_ids, topk_logprob_gaps, token_logprob_q, sample_ids, sample_logprob_gaps and sample_token_count and dictionary encoding for sample_counts, without column statistics or an embedded Arrow schema; readers must accept any standard Parquet encoding"
    );
    // Format 2 is written without the embedded Arrow schema.
    v["parquet_key_value_metadata"]
        .as_object_mut()
        .expect("metadata keys")
        .remove("ARROW:schema");
    v["parquet_key_value_metadata"][META_TOP_K] = json!({
        "type": "string",
        "description": "k, the number of top entries stored per distilled position, as a decimal integer; 0 when the shard holds sampled targets only (then kd.samples is positive)"
    });
    v["parquet_key_value_metadata"][META_SAMPLES] = json!({
        "type": "string",
        "description": "n, the number of sampled targets per distilled position, as a decimal integer; 0 when the shard holds top-k targets only"
    });
    v["parquet_key_value_metadata"][META_TAIL_SCALE] = json!({
        "type": "string",
        "description": "T, the tail scale, as a decimal integer (1048576): tail_logmass_q holds round(-ln(tail mass) * T)"
    });
    v["parquet_key_value_metadata"][META_LOGPROB_SCALE] = json!({
        "type": "string",
        "description": "S, the log-prob scale, as a decimal integer (1024): a stored integer q stands for the log-probability -q / S"
    });
    v["decoding"] = json!({
        "topk_logprobs": "lp = -np.cumsum(np.reshape(topk_logprob_gaps, (-1, k)), axis=1) / S (each within 1/S nats of the exact value), then per position lp += log((1 - tail) / sum(exp(lp))) with tail = exp(-tail_logmass_q / T) (0 where tail_logmass_q is 4294967295), so that the top-k and the tail mass add up to 1 as the teacher's did",
        "tail_mass": "exp(-tail_logmass_q / T): the teacher's probability outside the top k (1e-6 relative), 0 where tail_logmass_q is 4294967295",
        "token_logprob": "token_logprob = -token_logprob_q / S plus the position's shift log((1 - tail) / sum(exp(lp))) from the top-k decoding, so a next token in the top k decodes to its top-k value",
        "error_bound": "every decoded top-k log-prob is within 1/S nats (1/1024 < 1e-3) of the teacher's exact f32 value: the writer rounds -log_prob * S up to an integer and stores the differences of those integers within a position; the shift by the tail is a weighted mean of the rounding errors, so it keeps each entry within the bound; token_logprob, rounded up the same way and given the same shift, is within 1/S too",
        "rank_order": "within a position, entries stay sorted by log-prob descending, so the gaps are non-negative; equal decoded values may come from distinct exact values",
        "sample_logprobs": "-cumsum(sample_logprob_gaps within a position) / S for sample_ids and -token_logprob_q / S for the next token's draws, each within 1/S nats of the teacher's exact value",
        "sampled_targets": "position j's n draws are sample_token_count[j] draws of the next token input_ids[t+1] (log-prob -token_logprob_q[j] / S) and the distinct ids of sample_ids after those of position j-1, taken while their sample_counts add up to n - sample_token_count[j]; their log-probs are -cumsum(sample_logprob_gaps over those entries) / S. An id drawn c times is stored once with count c, so p_hat(id) = c / n is an unbiased estimate of the teacher's probability; forward KL at T=1 estimated as sum over distinct ids of c * (log p(id) - log q(id)) / n is unbiased, and so is its gradient q - p_hat. Readers give each position's n draws sorted by id, each id repeated by its count. Shards written before sample_token_count have the columns sample_ids, sample_logprob_q (ceil(-log_prob * S) of each id) and sample_counts, each position's distinct ids ascending with counts summing to n; shards without draws, and sampled shards written before sample_counts, end at sample_ids and sample_logprob_q with every draw and its repeats (empty lists without draws)."
    });
    v["position_convention"]["description"] = json!(
        "Distilled position t runs over prompt_len-1 ..= len(input_ids)-2 and holds the teacher's distribution for predicting input_ids[t+1]. Position j = t-(prompt_len-1) owns topk_ids[j*k..(j+1)*k], topk_logprob_gaps[j*k..(j+1)*k], token_logprob_q[j], tail_logmass_q[j], sample_token_count[j], and the distinct draws after position j-1's whose counts (sample_counts) sum to n - sample_token_count[j] (see decoding.sampled_targets)."
    );
    v["manifest"]["fields"]["settings"] = json!(
        "every dump setting; must contain top_k (0 when the cache holds sampled targets only) and samples when it holds sampled targets"
    );
    let cols = v["columns"].as_array_mut().expect("columns");
    cols[5] = json!({
        "name": "topk_logprob_gaps",
        "type": "list<uint32>",
        "nullable": false,
        "length": "n_pos * k",
        "description": "the teacher's top-k log-probabilities at T=1, aligned with topk_ids, as integer gaps: within a position, gap r is ceil(-log_prob[r] * S) - ceil(-log_prob[r-1] * S) (gap 0 is ceil(-log_prob[0] * S)); decoded log-probs are <= 0, non-increasing within a position, sum(exp) <= 1 (slack 1e-3)"
    });
    cols[6] = json!({
        "name": "token_logprob_q",
        "type": "list<uint32>",
        "nullable": false,
        "length": "n_pos",
        "description": "ceil(-log_prob * S) of the token that actually follows, input_ids[t+1]"
    });
    cols.push(json!({
        "name": "tail_logmass_q",
        "type": "list<uint32>",
        "nullable": false,
        "length": "n_pos",
        "description": "round(-ln(1 - sum(exp(exact top-k log-probs))) * T) per position, 4294967295 when the top k holds all the mass (0 when k is 0)"
    }));
    cols.push(json!({
        "name": "sample_ids",
        "type": "list<uint32>",
        "nullable": false,
        "length": "the row's distinct draws other than the next token's (at most n_pos * n)",
        "description": "sampled targets: n ids drawn per position from the teacher's distribution at T=1 (a stream seeded by the dump's seed, the row id and the position). Per position, in position order: the distinct drawn ids other than the next token input_ids[t+1] (whose draws sample_token_count counts), each once, by log-prob descending (ties by id ascending). The next token is among them only where its draws' log-prob differs from token_logprob_q, which a teacher never writes"
    }));
    cols.push(json!({
        "name": "sample_logprob_gaps",
        "type": "list<uint32>",
        "nullable": false,
        "length": "as sample_ids",
        "description": "the teacher's log-probabilities at T=1 of sample_ids as integer gaps within a position: gap r is ceil(-log_prob[r] * S) - ceil(-log_prob[r-1] * S), the first of a position ceil(-log_prob[0] * S)"
    }));
    cols.push(json!({
        "name": "sample_counts",
        "type": "list<uint32>",
        "nullable": false,
        "length": "as sample_ids",
        "description": "how many of its position's n draws each id of sample_ids is (at least 1); a position's counts and its sample_token_count sum to n"
    }));
    cols.push(json!({
        "name": "sample_token_count",
        "type": "list<uint32>",
        "nullable": false,
        "length": "n_pos",
        "description": "how many of position j's n draws are the next token input_ids[t+1] (0 to n); their log-prob is -token_logprob_q[j] / S, without the top-k shift"
    }));
    v
}

fn schema_json_v1() -> Value {
    json!({
        "$comment": "Generated from kd_shard::schema_json_of(1); edit the code, then run `KD_BLESS=1 cargo test -p kd-shard schema_file` to rewrite this file.",
        "format": "kd-shard",
        "format_version": 1,
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

    /// `schema_json_of(v)` and `schemas/shard-v{v}.json` stay equal; `KD_BLESS=1` rewrites
    /// the files.
    #[test]
    fn schema_file_matches_code() {
        for version in 1..=FORMAT_VERSION {
            schema_file_matches(version);
        }
    }

    fn schema_file_matches(version: u32) {
        let path = repo_schemas_dir().join(format!("shard-v{version}.json"));
        let code = schema_json_of(version);
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
        for version in 1..=FORMAT_VERSION {
            schema_json_lists_columns_of(version);
        }
    }

    fn schema_json_lists_columns_of(version: u32) {
        let v = schema_json_of(version);
        assert_eq!(v["format_version"], version);
        let names: Vec<&str> = v["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        let want = columns_of(version);
        assert_eq!(names, want);
        let schema = arrow_schema_of(version);
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
        check_arrow_schema(p, &arrow_schema(), 1).unwrap();
        check_arrow_schema(p, &arrow_schema_v2(), 2).unwrap();
        assert!(check_arrow_schema(p, &arrow_schema(), 2).is_err());
        assert!(check_arrow_schema(p, &arrow_schema_v2(), 1).is_err());
        let mut fields: Vec<Field> = arrow_schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields[5] = Field::new("topk_logprobs", list_of(DataType::Float64), false);
        let r = check_arrow_schema(p, &Schema::new(fields.clone()), 1);
        assert!(matches!(r, Err(Error::Schema { .. })));
        fields.pop();
        let r = check_arrow_schema(p, &Schema::new(fields), 1);
        assert!(matches!(r, Err(Error::Schema { .. })));
    }
}
