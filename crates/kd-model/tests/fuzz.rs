//! Bounded fuzzing of the model loaders: mutated tiny GGUF files (bytes flipped, truncated,
//! overwritten, huge integers spliced in, mostly inside the header) and mutated Hugging Face
//! directories go through `kd_model::load` and `Student::from_teacher` / `from_hf_dir`, which
//! must return `Ok` or an error naming the file, never panic, abort or allocate what the file
//! does not hold.
//!
//! Each property runs 64 cases; `PROPTEST_CASES=20000 cargo test -p kd-model --test fuzz`
//! runs a long session.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use kd_model::testing::{random_weights, tiny_config, write_gguf_with, write_tiny_teacher};
use kd_model::{Error, Precision, Student, load};
use kd_tokenizer::Tokenizer;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// 64 cases per property unless `PROPTEST_CASES` says otherwise.
fn config() -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 64;
    }
    c.failure_persistence = None;
    c
}

/// Integers that break naive readers: counts and lengths of 2^32, 2^40, 2^63, 2^64-1.
fn huge() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(1 << 63),
        Just(1 << 40),
        Just(1 << 32),
        Just(u64::from(u32::MAX)),
        Just(0),
        Just(5),
        any::<u64>(),
    ]
}

/// One edit of a valid file. `hot` places it in the first `hot` bytes (the header) rather
/// than anywhere; positions are taken modulo the range.
#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        hot: bool,
        at: usize,
        mask: u8,
    },
    Truncate {
        hot: bool,
        at: usize,
    },
    Overwrite {
        hot: bool,
        at: usize,
        bytes: Vec<u8>,
    },
    Splice {
        hot: bool,
        at: usize,
        value: u64,
        width: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let hot = prop::bool::weighted(0.8);
    prop_oneof![
        4 => (hot, any::<usize>(), 1..=255u8)
            .prop_map(|(hot, at, mask)| Mutation::Flip { hot, at, mask }),
        1 => (hot, any::<usize>()).prop_map(|(hot, at)| Mutation::Truncate { hot, at }),
        2 => (hot, any::<usize>(), prop::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(hot, at, bytes)| Mutation::Overwrite { hot, at, bytes }),
        3 => (hot, any::<usize>(), huge(), prop::sample::select(vec![1usize, 2, 4, 8]))
            .prop_map(|(hot, at, value, width)| Mutation::Splice { hot, at, value, width }),
    ]
}

fn apply(good: &[u8], hot_len: usize, muts: &[Mutation]) -> Vec<u8> {
    let mut v = good.to_vec();
    for m in muts {
        if v.is_empty() {
            break;
        }
        let pos = |hot: bool, at: usize, len: usize| {
            if hot {
                at % hot_len.min(len).max(1)
            } else {
                at % len
            }
        };
        match m {
            Mutation::Flip { hot, at, mask } => {
                let i = pos(*hot, *at, v.len());
                v[i] ^= mask;
            }
            Mutation::Truncate { hot, at } => {
                let i = pos(*hot, *at, v.len());
                v.truncate(i);
            }
            Mutation::Overwrite { hot, at, bytes } => {
                let i = pos(*hot, *at, v.len());
                let n = bytes.len().min(v.len() - i);
                v[i..i + n].copy_from_slice(&bytes[..n]);
            }
            Mutation::Splice {
                hot,
                at,
                value,
                width,
            } => {
                let i = pos(*hot, *at, v.len());
                let n = (*width).min(v.len() - i);
                v[i..i + n].copy_from_slice(&value.to_le_bytes()[..n]);
            }
        }
    }
    v
}

/// What a case feeds the loader.
#[derive(Clone, Debug)]
enum Input {
    /// The valid file with edits.
    Mutated(Vec<Mutation>),
    /// Random bytes.
    Random(Vec<u8>),
    /// A GGUF v3 magic and version followed by random bytes, to get past the first check.
    RandomAfterMagic(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        8 => prop::collection::vec(mutation(), 1..6).prop_map(Input::Mutated),
        1 => prop::collection::vec(any::<u8>(), 0..2048).prop_map(Input::Random),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Input::RandomAfterMagic),
    ]
}

/// Tiny models as GGUF (Q8_0 matrices; BF16; Q4_K and Q6_K on a model wide enough for
/// their 256-column super-blocks), their bytes, and the length of their headers.
struct Fixture {
    dir: tempfile::TempDir,
    files: Vec<(Vec<u8>, usize)>,
    next: AtomicUsize,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::tiny_for_tests();
        let cfg = tiny_config(tok.vocab_size());
        let wide = kd_model::LlamaConfig {
            hidden_size: 256,
            intermediate_size: 256,
            ..cfg.clone()
        };
        let w = random_weights(&cfg, 5).unwrap();
        let ww = random_weights(&wide, 5).unwrap();
        let mut files = Vec::new();
        for (i, (dtype, c, w)) in [
            (GgmlDType::Q8_0, &cfg, &w),
            (GgmlDType::BF16, &cfg, &w),
            (GgmlDType::Q4K, &wide, &ww),
            (GgmlDType::Q6K, &wide, &ww),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("tiny-{i}.gguf"));
            write_gguf_with(&path, &tok, w, dtype, c, &[]);
            let layout = kd_model::gguf_check::check(&path).unwrap();
            files.push((std::fs::read(&path).unwrap(), layout.data_offset as usize));
        }
        Fixture {
            dir,
            files,
            next: AtomicUsize::new(0),
        }
    }

    /// Writes `bytes` under a new name: creating files (rather than truncating one) keeps
    /// ext4 from flushing on every close.
    fn write(&self, bytes: &[u8]) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let p = self.dir.path().join(format!("case-{n}.gguf"));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// The Q8_0 model's bytes.
    fn good(&self) -> &Vec<u8> {
        &self.files[0].0
    }

    fn bytes(&self, input: &Input, which: usize) -> Vec<u8> {
        let (good, header_len) = &self.files[which % self.files.len()];
        match input {
            Input::Mutated(m) => apply(good, *header_len, m),
            Input::Random(b) => b.clone(),
            Input::RandomAfterMagic(b) => {
                let mut v = b"GGUF\x03\0\0\0".to_vec();
                v.extend(b);
                v
            }
        }
    }
}

fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(Fixture::new)
}

/// `Err` must name `path`.
fn check_names(path: &Path, r: Result<(), Error>) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        let msg = e.to_string();
        prop_assert!(
            msg.contains(&path.display().to_string()),
            "error does not name {}: {msg}",
            path.display()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// `load` and `read_gguf_header` on a mutated tiny GGUF return without panicking; every
    /// error names the file.
    #[test]
    fn mutated_gguf_never_panics(input in input(), which in 0..4usize) {
        let f = fixture();
        let p = f.write(&f.bytes(&input, which));
        let header = kd_model::loader::read_gguf_header(&p).map(|_| ());
        check_names(&p, header)?;
        let r = load(&p, Precision::Exact, &Device::Cpu).map(|_| ());
        check_names(&p, r)?;
        let r = Student::from_teacher(&p, &[1, 0], DType::F32, &Device::Cpu).map(|_| ());
        check_names(&p, r)?;
        std::fs::remove_file(&p).unwrap();
    }
}

/// A valid tiny teacher directory whose `config.json`, `model.safetensors` and
/// `tokenizer.json` cases rewrite.
struct HfFixture {
    dir: tempfile::TempDir,
    config: serde_json::Value,
    weights: Vec<u8>,
    tokenizer: Vec<u8>,
}

fn hf_fixture() -> &'static std::sync::Mutex<HfFixture> {
    static F: std::sync::OnceLock<std::sync::Mutex<HfFixture>> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_teacher(dir.path(), 9).unwrap();
        let config =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        let weights = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let tokenizer = std::fs::read(dir.path().join("tokenizer.json")).unwrap();
        std::sync::Mutex::new(HfFixture {
            dir,
            config,
            weights,
            tokenizer,
        })
    })
}

/// A change to a Hugging Face directory.
#[derive(Clone, Debug)]
enum HfEdit {
    /// Sets a `config.json` field to a JSON value (huge, negative, wrong type, null).
    ConfigField(String, serde_json::Value),
    /// Removes a `config.json` field.
    ConfigRemove(String),
    /// Replaces `config.json` with random bytes.
    ConfigGarbage(Vec<u8>),
    /// Edits `model.safetensors` (its 8-byte header length and JSON header are the hot part).
    Weights(Vec<Mutation>),
    /// Edits `tokenizer.json`.
    Tokenizer(Vec<Mutation>),
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        huge().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(1e300)),
        Just(json!(0.5)),
        Just(json!("32")),
        Just(json!(null)),
        Just(json!([1, 2])),
        Just(json!({"a": 1})),
        Just(json!(true)),
    ]
}

fn hf_edit() -> impl Strategy<Value = HfEdit> {
    let field = prop::sample::select(vec![
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "model_type",
    ])
    .prop_map(str::to_string);
    prop_oneof![
        4 => (field.clone(), json_value()).prop_map(|(f, v)| HfEdit::ConfigField(f, v)),
        1 => field.prop_map(HfEdit::ConfigRemove),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(HfEdit::ConfigGarbage),
        4 => prop::collection::vec(mutation(), 1..4).prop_map(HfEdit::Weights),
        1 => prop::collection::vec(mutation(), 1..4).prop_map(HfEdit::Tokenizer),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// `load` and `Student::from_hf_dir` on a Hugging Face directory with a mutated
    /// `config.json`, `model.safetensors` or `tokenizer.json` return without panicking; every
    /// error names a path inside the directory.
    #[test]
    fn mutated_hf_dir_never_panics(edit in hf_edit()) {
        let f = hf_fixture().lock().unwrap_or_else(|e| e.into_inner());
        let dir = f.dir.path();
        let cfg_path = dir.join("config.json");
        let w_path = dir.join("model.safetensors");
        let tok_path = dir.join("tokenizer.json");
        match &edit {
            HfEdit::ConfigField(k, v) => {
                let mut c = f.config.clone();
                c[k.as_str()] = v.clone();
                std::fs::write(&cfg_path, c.to_string()).unwrap();
            }
            HfEdit::ConfigRemove(k) => {
                let mut c = f.config.clone();
                c.as_object_mut().unwrap().remove(k);
                std::fs::write(&cfg_path, c.to_string()).unwrap();
            }
            HfEdit::ConfigGarbage(b) => std::fs::write(&cfg_path, b).unwrap(),
            HfEdit::Weights(m) => {
                // The safetensors header: 8-byte length, then JSON.
                let hot = 8 + u64::from_le_bytes(f.weights[..8].try_into().unwrap()) as usize;
                std::fs::write(&w_path, apply(&f.weights, hot, m)).unwrap();
            }
            HfEdit::Tokenizer(m) => {
                let all = f.tokenizer.len();
                std::fs::write(&tok_path, apply(&f.tokenizer, all, m)).unwrap();
            }
        }
        let r = load(dir, Precision::Exact, &Device::Cpu).map(|_| ());
        let s = Student::from_hf_dir(dir, DType::F32, &Device::Cpu).map(|_| ());
        // Restore before asserting, so that one failure does not poison later cases.
        std::fs::write(&cfg_path, f.config.to_string()).unwrap();
        std::fs::write(&w_path, &f.weights).unwrap();
        std::fs::write(&tok_path, &f.tokenizer).unwrap();
        check_names(dir, r)?;
        check_names(dir, s)?;
    }
}

/// A GGUF v3 header: tensor count, metadata count, then `rest`.
fn gguf(tensors: u64, kvs: u64, rest: &[u8]) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend(3u32.to_le_bytes());
    v.extend(tensors.to_le_bytes());
    v.extend(kvs.to_le_bytes());
    v.extend(rest);
    v
}

fn kv_prefix(key: &str, ty: u32) -> Vec<u8> {
    let mut v = (key.len() as u64).to_le_bytes().to_vec();
    v.extend(key.as_bytes());
    v.extend(ty.to_le_bytes());
    v
}

/// Regression: candle sizes vectors and strings from header counts. A header that claims
/// 2^40 of something must be refused with `Error::BadGguf`, quickly (no allocation).
#[test]
fn huge_header_counts_are_refused_quickly() {
    let f = fixture();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    cases.push(("2^40 metadata entries".into(), gguf(0, 1 << 40, &[0; 64])));
    cases.push(("2^40 tensors".into(), gguf(1 << 40, 0, &[0; 64])));
    let mut s = kv_prefix("general.name", 8);
    s.extend((1u64 << 40).to_le_bytes());
    s.extend(b"tiny");
    cases.push(("string of 2^40 bytes".into(), gguf(0, 1, &s)));
    let mut k = (1u64 << 40).to_le_bytes().to_vec();
    k.extend(b"general.name");
    cases.push(("key of 2^40 bytes".into(), gguf(0, 1, &k)));
    for (ety, name) in [(0u32, "u8"), (8, "string"), (9, "array")] {
        let mut a = kv_prefix("tokenizer.ggml.tokens", 9);
        a.extend(ety.to_le_bytes());
        a.extend((1u64 << 40).to_le_bytes());
        a.extend([0; 64]);
        cases.push((format!("array of 2^40 {name} elements"), gguf(0, 1, &a)));
    }
    // The same claims spliced into the valid tiny model.
    let at = |key: &str| {
        let k = key.as_bytes();
        f.good().windows(k.len()).position(|w| w == k).unwrap() + k.len()
    };
    let mut v = f.good().clone();
    v[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("tiny model claiming 2^40 metadata entries".into(), v));
    let mut v = f.good().clone();
    let i = at("general.architecture") + 4;
    v[i..i + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("tiny model with a 2^40-byte architecture string".into(), v));
    let mut v = f.good().clone();
    let i = at("tokenizer.ggml.tokens") + 8;
    v[i..i + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("tiny model with 2^40 tokens".into(), v));
    let mut v = f.good().clone();
    let i = at("token_embd.weight") + 4;
    v[i..i + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("tiny model with a 2^40-column embedding".into(), v));

    for (what, bytes) in cases {
        let p = f.write(&bytes);
        let t = Instant::now();
        let r = load(&p, Precision::Exact, &Device::Cpu);
        let took = t.elapsed();
        match r {
            Err(e @ Error::BadGguf { .. }) => {
                assert!(e.to_string().contains(&p.display().to_string()), "{e}");
                eprintln!("{what}: refused in {took:?}: {e}");
            }
            Err(e) => panic!("{what}: expected BadGguf, got {e}"),
            Ok(_) => panic!("{what}: loaded"),
        }
        // Microseconds in practice; the bound leaves room for a loaded machine.
        assert!(took < Duration::from_millis(500), "{what}: took {took:?}");
    }
}

/// Regression: a valid GGUF whose `general.alignment` is 0 made candle divide by zero
/// (`div_ceil`), a panic inside `Content::read`.
#[test]
fn zero_alignment_is_refused() {
    let f = fixture();
    let mut a = kv_prefix("general.alignment", 4);
    a.extend(0u32.to_le_bytes());
    let p = f.write(&gguf(0, 1, &a));
    let r = load(&p, Precision::Exact, &Device::Cpu);
    assert!(matches!(r, Err(Error::BadGguf { .. })), "{:?}", r.err());
}

/// Regression: the layer count and the context length were used as allocation sizes
/// (`Vec::with_capacity(num_hidden_layers)` in `load` and `Student::from_hf_dir`, RoPE tables
/// of `max_position_embeddings × head_dim/2`), so a file claiming 2^32 or 2^40 of either
/// aborted the process (found by the properties above).
#[test]
fn huge_layer_count_and_context_are_errors() {
    let f = fixture();
    let at = |key: &str| {
        let k = key.as_bytes();
        f.good().windows(k.len()).position(|w| w == k).unwrap() + k.len()
    };
    for key in ["llama.block_count", "llama.context_length"] {
        // Both are u32 values: the type at +0, the value at +4.
        let mut v = f.good().clone();
        let i = at(key) + 4;
        v[i..i + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let p = f.write(&v);
        match load(&p, Precision::Exact, &Device::Cpu) {
            Err(Error::MissingTensor { .. } | Error::BadField { .. }) => {}
            Err(e) => panic!("{key}: unexpected error {e}"),
            Ok(_) => panic!("{key}: loaded"),
        }
    }
    // An HF directory claiming 2^40 layers / positions.
    let f = hf_fixture().lock().unwrap_or_else(|e| e.into_inner());
    let cfg_path = f.dir.path().join("config.json");
    for key in ["num_hidden_layers", "max_position_embeddings"] {
        let mut c = f.config.clone();
        c[key] = serde_json::json!(1u64 << 40);
        std::fs::write(&cfg_path, c.to_string()).unwrap();
        let r = load(f.dir.path(), Precision::Exact, &Device::Cpu).map(|_| ());
        let s = Student::from_hf_dir(f.dir.path(), DType::F32, &Device::Cpu).map(|_| ());
        std::fs::write(&cfg_path, f.config.to_string()).unwrap();
        for r in [r, s] {
            match r {
                Err(Error::MissingTensor { .. } | Error::BadField { .. }) => {}
                Err(e) => panic!("{key}: unexpected error {e}"),
                Ok(()) => panic!("{key}: loaded"),
            }
        }
    }
}

/// Regression: `Student::from_teacher` reshaped `attn_q` / `attn_k` by the head count before
/// checking their shapes, so a GGUF whose `blk.0.attn_q.weight` has 33 rows instead of 32
/// gave a candle "shape mismatch" error that did not name the file (found by
/// `mutated_gguf_never_panics`).
#[test]
fn wrong_qk_shape_is_a_tensor_shape_error() {
    let f = fixture();
    let k = b"blk.0.attn_q.weight";
    let at = f.good().windows(k.len()).position(|w| w == k).unwrap() + k.len();
    // n_dims (u32), then dims innermost first: columns, rows.
    let i = at + 4 + 8;
    let mut v = f.good().clone();
    assert_eq!(u64::from_le_bytes(v[i..i + 8].try_into().unwrap()), 32);
    v[i..i + 8].copy_from_slice(&33u64.to_le_bytes());
    let p = f.write(&v);
    let s = Student::from_teacher(&p, &[0], DType::F32, &Device::Cpu).map(|_| ());
    let l = load(&p, Precision::Exact, &Device::Cpu).map(|_| ());
    for r in [s, l] {
        match r {
            Err(e @ Error::TensorShape { .. }) => {
                assert!(e.to_string().contains(&p.display().to_string()), "{e}")
            }
            other => panic!("expected TensorShape, got {other:?}"),
        }
    }
}
