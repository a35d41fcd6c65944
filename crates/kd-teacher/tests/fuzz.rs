//! Bounded fuzzing of the prompt reader and the encoder: random bytes, invalid UTF-8, huge
//! numbers, deep nesting, wrong field types and mutated valid files go through
//! `input::read_jsonl`, which must return `Ok` or an error naming `file:line` (or the file),
//! never panic; arbitrary Unicode prompts go through `input::encode` with the tiny byte-level
//! test tokenizer, and decoding gives the text back.
//!
//! Each property runs 64 cases; `PROPTEST_CASES=20000 cargo test -p kd-teacher --test fuzz`
//! runs a long session.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use kd_teacher::Error;
use kd_teacher::input::{Content, EncodeOptions, Record, encode, read_jsonl};
use kd_tokenizer::{Message, Tokenizer};
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

fn dir() -> &'static Path {
    static D: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// Writes `bytes` under a new name (creating files rather than truncating one keeps ext4
/// from flushing on every close).
fn write_case(bytes: &[u8]) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = dir().join(format!("case-{}.jsonl", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// One line of a prompt file, valid or not.
fn line() -> impl Strategy<Value = Vec<u8>> {
    // Arbitrary Unicode without control characters (what `any::<String>()` draws).
    let text = "\\PC*";
    let huge = prop::sample::select(vec![
        "1e400",
        "-1e400",
        "123456789012345678901234567890",
        "18446744073709551616",
        "-9223372036854775809",
        "1.7976931348623157e308",
        "0.000000000000000000000000000001e-400",
    ]);
    prop_oneof![
        // Valid records of the three kinds.
        (text, any::<u32>()).prop_map(|(p, id)| {
            serde_json::json!({"id": format!("r{id}"), "prompt": p})
                .to_string()
                .into_bytes()
        }),
        (text, text).prop_map(|(u, a)| {
            serde_json::json!({"messages": [{"role": "user", "content": u},
                                            {"role": "assistant", "content": a}]})
            .to_string()
            .into_bytes()
        }),
        (text, text).prop_map(|(i, x)| {
            serde_json::json!({"instruction": i, "instances": [{"input": x}]})
                .to_string()
                .into_bytes()
        }),
        // Wrong types, missing fields, huge numbers.
        prop::sample::select(vec![
            r#"{"id": 5, "prompt": 7}"#,
            r#"{"id": [], "prompt": "x"}"#,
            r#"{"id": "", "prompt": "x"}"#,
            r#"{"prompt": null, "messages": "x"}"#,
            r#"{"messages": []}"#,
            r#"{"messages": [{"role": 1, "content": "x"}]}"#,
            r#"{"messages": [{"content": "x"}]}"#,
            r#"{"messages": [null]}"#,
            r#"{"instruction": {"a": 1}}"#,
            r#"{"instruction": "x", "input": 3}"#,
            r#"{"instruction": "x", "instances": 3}"#,
            r#"{"prompt": "x", "response": false}"#,
            r#"{}"#,
            r#"[]"#,
            r#""prompt""#,
            r#"null"#,
            r#"{"id": "dup", "prompt": "x"}"#,
            r#"{"prompt": "\ud800"}"#,
            r#"{"prompt": "x""#,
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        huge.prop_map(|n| format!(r#"{{"id": {n}, "prompt": "x"}}"#).into_bytes()),
        (1usize..2000).prop_map(|d| {
            format!(
                r#"{{"prompt": "x", "extra": {}1{}}}"#,
                "[".repeat(d),
                "]".repeat(d)
            )
            .into_bytes()
        }),
        // Raw bytes, invalid UTF-8 included.
        prop::collection::vec(any::<u8>(), 0..200),
        Just(b"\xEF\xBB\xBF{\"prompt\": \"bom\"}".to_vec()),
        Just(b"{\"prompt\": \"\xff\xfe\"}".to_vec()),
        Just(b"   \r".to_vec()),
    ]
}

#[derive(Clone, Debug)]
enum Input {
    Lines(Vec<Vec<u8>>),
    /// A valid file with bytes flipped, truncated or overwritten.
    Mutated {
        lines: Vec<Vec<u8>>,
        edits: Vec<(usize, u8)>,
        cut: Option<usize>,
    },
    Random(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    let lines = || prop::collection::vec(line(), 0..12);
    prop_oneof![
        5 => lines().prop_map(Input::Lines),
        3 => (
            lines(),
            prop::collection::vec((any::<usize>(), 1..=255u8), 0..8),
            prop::option::of(any::<usize>())
        )
            .prop_map(|(lines, edits, cut)| Input::Mutated { lines, edits, cut }),
        1 => prop::collection::vec(any::<u8>(), 0..4096).prop_map(Input::Random),
    ]
}

fn bytes(input: &Input) -> Vec<u8> {
    let join = |lines: &[Vec<u8>]| lines.join(&b'\n');
    match input {
        Input::Lines(l) => join(l),
        Input::Mutated { lines, edits, cut } => {
            let mut v = join(lines);
            if !v.is_empty() {
                for (at, mask) in edits {
                    let i = at % v.len();
                    v[i] ^= mask;
                }
                if let Some(c) = cut {
                    v.truncate(c % v.len());
                }
            }
            v
        }
        Input::Random(b) => b.clone(),
    }
}

/// `Err` names the file, and `file:line` for a bad line.
fn names(path: &Path, n_lines: usize, e: &Error) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    let shown = path.display().to_string();
    prop_assert!(msg.contains(&shown), "error does not name {shown}: {msg}");
    if let Error::BadLine { line, .. } = e {
        prop_assert!(*line >= 1 && *line <= n_lines, "line {line} of {n_lines}");
        let at = format!("{shown}:{line}: ");
        prop_assert!(msg.starts_with(&at), "{msg:?} does not start with {at:?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// `read_jsonl` returns records or an error naming `file:line`; with `skip_bad_lines`
    /// only an empty result or an I/O error remains an error.
    #[test]
    fn read_jsonl_never_panics(input in input()) {
        let b = bytes(&input);
        let n_lines = b.split(|&c| c == b'\n').count();
        let p = write_case(&b);
        for skip in [false, true] {
            match read_jsonl(&p, skip) {
                Ok(inp) => {
                    prop_assert!(!inp.records.is_empty());
                    for r in &inp.records {
                        prop_assert!(r.line >= 1 && r.line <= n_lines);
                    }
                    for (line, _) in &inp.skipped {
                        prop_assert!(*line >= 1 && *line <= n_lines);
                    }
                    if !skip {
                        prop_assert!(inp.skipped.is_empty());
                    }
                }
                Err(e) => {
                    names(&p, n_lines, &e)?;
                    if skip {
                        prop_assert!(matches!(e, Error::EmptyInput { .. }), "{e}");
                    }
                }
            }
        }
        std::fs::remove_file(&p).unwrap();
    }
}

fn tokenizer() -> &'static Tokenizer {
    static T: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    T.get_or_init(Tokenizer::tiny_for_tests)
}

/// Text with the characters that stress a byte-level BPE: control tokens' text, combining
/// marks, emoji, CJK, NUL, long runs of spaces and digits, plus arbitrary Unicode.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        any::<String>(),
        "\\PC{0,40}",
        prop::sample::select(vec![
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
            "<|im_start",
            "e\u{301}",
            "👩‍👩‍👧",
            "漢字かな",
            "\0",
            "\r\n",
            "      ",
            "1234567890",
            "'s 'll",
            "\u{feff}",
            "\u{10ffff}",
        ])
        .prop_map(str::to_string),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config())]

    /// Without a chat template, any prompt (and scored response) encodes, and decoding the ids
    /// gives the text back: the tiny tokenizer has a token for every byte.
    #[test]
    fn encode_round_trips_any_text(prompt in text(), response in text(), chat in any::<bool>()) {
        let tok = tokenizer();
        let content = if chat {
            Content::Chat { messages: vec![
                Message { role: "user".into(), content: prompt.clone() },
                Message { role: "assistant".into(), content: response.clone() },
            ] }
        } else {
            Content::Text { prompt: prompt.clone(), response: Some(response.clone()) }
        };
        let rec = Record { id: "r".into(), line: 1, content };
        for score in [false, true] {
            let opts = EncodeOptions { chat_template: false, score };
            match encode(&rec, tok, opts) {
                Ok(enc) => {
                    let want_prompt = if chat {
                        // Joined as "role: content" lines; the response is the last turn.
                        format!("user: {prompt}\n")
                    } else {
                        prompt.clone()
                    };
                    prop_assert_eq!(tok.decode(&enc.prompt, false), want_prompt);
                    match (&enc.response, score) {
                        (Some(r), true) => prop_assert_eq!(tok.decode(r, false), response.clone()),
                        (None, false) => {}
                        (r, s) => prop_assert!(false, "score={} but response {:?}", s, r),
                    }
                }
                // Generating from a chat that ends with the assistant's turn is refused.
                Err(e) => prop_assert!(chat && !score, "{e}"),
            }
        }
    }
}

/// serde_json stops at 128 levels of nesting: 100000 `[` is a bad line, not a stack overflow.
#[test]
fn deeply_nested_line_is_a_bad_line() {
    let mut b = br#"{"prompt": "ok"}"#.to_vec();
    b.push(b'\n');
    b.extend(std::iter::repeat_n(b'[', 100_000));
    let p = write_case(&b);
    match read_jsonl(&p, false) {
        Err(e @ Error::BadLine { line: 2, .. }) => {
            assert!(
                e.to_string().starts_with(&format!("{}:2: ", p.display())),
                "{e}"
            )
        }
        other => panic!("expected BadLine at line 2, got {other:?}"),
    }
    let inp = read_jsonl(&p, true).unwrap();
    assert_eq!((inp.records.len(), inp.skipped.len()), (1, 1));
}

/// A 10 MB line is read (a prompt) or refused (garbage) in well under a second per MB.
#[test]
fn ten_megabyte_lines() {
    let big = "x".repeat(10 << 20);
    let p = write_case(format!(r#"{{"id": "big", "prompt": "{big}"}}"#).as_bytes());
    let t = Instant::now();
    let inp = read_jsonl(&p, false).unwrap();
    match &inp.records[0].content {
        Content::Text { prompt, .. } => assert_eq!(prompt.len(), 10 << 20),
        other => panic!("{other:?}"),
    }
    let p = write_case(format!(r#"{{"id": "big", "prompt": {big}}}"#).as_bytes());
    assert!(matches!(
        read_jsonl(&p, false),
        Err(Error::BadLine { line: 1, .. })
    ));
    let mut garbage = vec![0xffu8; 10 << 20];
    garbage.extend(b"\n{\"prompt\": \"ok\"}");
    let p = write_case(&garbage);
    assert!(matches!(
        read_jsonl(&p, false),
        Err(Error::BadLine { line: 1, .. })
    ));
    assert_eq!(read_jsonl(&p, true).unwrap().records.len(), 1);
    eprintln!("three 10 MB files read in {:?}", t.elapsed());
}
