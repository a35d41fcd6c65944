//! Real tokenizers of three families (Llama 2: SentencePiece-style BPE with byte fallback;
//! Llama 3: byte-level BPE; Qwen3: byte-level BPE with NFC), fetched by
//! `scripts/fetch_tokenizers.sh` into `data/tokenizers/`, against Python `tokenizers` on
//! hard strings: whitespace runs, tabs, newlines, CJK, emoji, accents (composed and not),
//! digits, code, and special tokens inside text. Skipped with a message when the files or
//! Python `tokenizers` are missing, unless `KD_REQUIRE_TOKENIZERS=1` (CI sets it).

use std::path::{Path, PathBuf};
use std::process::Command;

use kd_tokenizer::Tokenizer;

fn hard_strings(specials: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "Hello world",
        " leading space",
        "  two leading spaces and trailing  ",
        "tabs\tand\t\ttabs",
        "new\nlines\n\n\nand\r\ncrlf",
        "    indented code\n        deeper",
        "東京は日本の首都です。中文测试，标点！",
        "emoji 🚀🙂👍🏽 and family 👨‍👩‍👧",
        "naïve café déjà vu — Ångström",
        "cafe\u{301} de\u{301}ja\u{300} (decomposed)",
        "digits 1234567890 3.14159 1,000,000 2026-11-30",
        "def f(x):\n    return x**2  # square\n\nprint(f(12))",
        "fn main() { let v: Vec<u8> = vec![0xFF; 3]; }",
        "mixed   spaces\u{a0}nbsp\u{2009}thin",
        "",
        " ",
        "\n",
        "a",
        "ÀÉÎÕÜ àéîõü ß ø œ",
        "Привет, мир! Γειά σου κόσμε",
        "مرحبا بالعالم",
        "▁already▁has▁metaspace",
        "<0x41> looks like a byte token",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in specials {
        v.push(format!("before{s}after"));
        v.push(format!("{s} spaced {s}"));
        v.push(format!("{s}{s}text"));
    }
    v
}

fn python_ids(path: &Path, texts: &[String]) -> Option<Vec<Vec<u32>>> {
    python_encode(path, texts, false)
}

/// Python `tokenizers`' ids; `special`: with the post-processor (`tokenizer(text)`).
fn python_encode(path: &Path, texts: &[String], special: bool) -> Option<Vec<Vec<u32>>> {
    let script = r#"
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = json.load(sys.stdin)
special = sys.argv[2] == "1"
print(json.dumps([tok.encode(t, add_special_tokens=special).ids for t in texts]))
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .arg(if special { "1" } else { "0" })
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(texts).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        eprintln!(
            "python tokenizers: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizers")
}

fn required() -> bool {
    std::env::var("KD_REQUIRE_TOKENIZERS").is_ok_and(|v| v == "1")
}

/// The fetched `tokenizer.json` of `family`; `None` (after saying so) when it is missing and
/// not required.
fn real_tokenizer(family: &str) -> Option<PathBuf> {
    let path = dir().join(family).join("tokenizer.json");
    if !path.exists() {
        assert!(
            !required(),
            "{} missing: run scripts/fetch_tokenizers.sh",
            path.display()
        );
        eprintln!(
            "skipped: {} missing (scripts/fetch_tokenizers.sh)",
            path.display()
        );
        return None;
    }
    Some(path)
}

fn check_family(family: &str, specials: &[&str]) {
    let Some(path) = real_tokenizer(family) else {
        return;
    };
    let tok = Tokenizer::from_tokenizer_json(&path).unwrap_or_else(|e| panic!("{family}: {e}"));
    let texts = hard_strings(specials);
    let Some(want) = python_ids(&path, &texts) else {
        assert!(
            !required(),
            "Python `tokenizers` is needed (pip install tokenizers)"
        );
        eprintln!("skipped: Python `tokenizers` not available");
        return;
    };
    let mut bad = Vec::new();
    for (t, w) in texts.iter().zip(&want) {
        let got = tok.encode(t, true);
        if &got != w {
            bad.push(format!("{t:?}:\n  ours   {got:?}\n  theirs {w:?}"));
        }
    }
    eprintln!(
        "{family}: {} of {} strings equal",
        texts.len() - bad.len(),
        texts.len()
    );
    assert!(
        bad.is_empty(),
        "{family}: {} strings differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
    // A prompt as `tokenizer(text)` gives it: BOS first where the post-processor adds one
    // (Llama 2 and 3, not Qwen).
    let with_special = python_encode(&path, &texts, true).unwrap();
    for (t, w) in texts.iter().zip(&with_special) {
        let mut got = tok.encode(t, true);
        if tok.add_bos_token() {
            got.insert(0, tok.bos_id().unwrap());
        }
        assert_eq!(&got, w, "{family}: {t:?} with the post-processor");
    }
    // The tokenizer.json we write back (beside shards, in exports) encodes the same.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tokenizer.json");
    std::fs::write(&p, tok.to_tokenizer_json().to_string()).unwrap();
    let back = Tokenizer::from_tokenizer_json(&p).unwrap();
    assert_eq!(
        back.fingerprint(),
        tok.fingerprint(),
        "{family}: written back"
    );
    let again = python_ids(&p, &texts).expect("python reads what we write");
    assert_eq!(
        again, want,
        "{family}: Python reads our tokenizer.json differently"
    );
    let again = python_encode(&p, &texts, true).unwrap();
    assert_eq!(again, with_special, "{family}: our post-processor differs");
    assert_eq!(back.add_bos_token(), tok.add_bos_token(), "{family}");
}

#[test]
fn llama2_sentencepiece_byte_fallback() {
    check_family("llama2", &["<s>", "</s>"]);
}

#[test]
fn llama3_byte_level() {
    check_family(
        "llama3",
        &["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"],
    );
}

/// An exported GGUF names the pre-tokenizer (`tokenizer.ggml.pre`) and readers look it up by
/// that name: Llama 3's own file, whose pattern has a case-insensitive group, is `llama3`.
#[test]
fn llama3_pre_tokenizer_has_its_gguf_name() {
    let Some(path) = real_tokenizer("llama3") else {
        return;
    };
    let tok = Tokenizer::from_tokenizer_json(&path).unwrap();
    assert_eq!(tok.pre_tokenizer(), "llama3");
}

#[test]
fn qwen3_byte_level_nfc() {
    check_family("qwen3", &["<|im_start|>", "<|im_end|>", "<think>"]);
}

/// Chat templates of Llama 2 Chat (`raise_exception`), Llama 3 Instruct, Llama 3.1 Instruct
/// (`strftime_now` unless `date_string` is given) and Qwen3 (namespaces, loop controls, string
/// methods) render as `transformers` rendered them (`tests/data/chat_reference.json`, from
/// `scripts/chat_reference.py`), with and without the generation prompt; a conversation a
/// template refuses is refused with its message.
#[test]
fn chat_templates_render_as_transformers_does() {
    use kd_tokenizer::{ChatTemplate, Message};
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat_reference.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut n = 0;
    for fam in doc["families"].as_array().unwrap() {
        let name = fam["name"].as_str().unwrap();
        let t = ChatTemplate::new(
            fam["template"].as_str().unwrap().to_string(),
            fam["bos_token"].as_str().unwrap().to_string(),
            fam["eos_token"].as_str().unwrap().to_string(),
        );
        let vars = fam["variables"].as_object().unwrap();
        for case in fam["cases"].as_array().unwrap() {
            let messages: Vec<Message> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let got = t.render_with(&messages, agp, vars);
            match (&case["rendered"], &case["error"]) {
                (serde_json::Value::String(want), _) => {
                    let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(&got, want, "{name}, generation prompt {agp}");
                }
                (_, serde_json::Value::String(msg)) => {
                    let e = got.expect_err(name).to_string();
                    assert!(e.contains(msg.as_str()), "{name}: {e} lacks {msg}");
                }
                _ => panic!("{name}: case without result"),
            }
            n += 1;
        }
    }
    assert!(n >= 40, "{n} renderings");
}

/// llama.cpp's form of the same Llama 2 tokenizer (`tokenizer.ggml.model` = `llama`: pieces,
/// scores and types, no merges; the scores those the merge list was made from)
/// encodes every hard string as the `tokenizer.json` does, and so as Python `tokenizers`.
#[test]
fn llama2_gguf_sentencepiece_equals_tokenizer_json() {
    use candle_core::quantized::gguf_file::{self, Value as V};
    let Some(path) = real_tokenizer("llama2") else {
        return;
    };
    let json = Tokenizer::from_tokenizer_json(&path).unwrap();
    let n = json.vocab_size() as u32;
    let pieces: Vec<String> = (0..n)
        .map(|i| json.vocab_string(i).unwrap().to_string())
        .collect();
    // SentencePiece scores as the merge list encodes them: a piece scores minus the rank of
    // the first merge that makes it; pieces no merge makes score lowest.
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut scores = vec![-1e9f32; n as usize];
    for (rank, m) in tj["model"]["merges"].as_array().unwrap().iter().enumerate() {
        let joined = match m {
            serde_json::Value::String(s) => s.replacen(' ', "", 1),
            serde_json::Value::Array(p) => {
                format!("{}{}", p[0].as_str().unwrap(), p[1].as_str().unwrap())
            }
            _ => panic!("merge form"),
        };
        let id = json.token_id(&joined).unwrap() as usize;
        scores[id] = scores[id].max(-(rank as f32));
    }
    let types: Vec<V> = pieces
        .iter()
        .map(|p| {
            V::I32(match p.as_str() {
                "<unk>" => 2,
                "<s>" | "</s>" => 3,
                p if p.starts_with("<0x") && p.len() == 6 => 6,
                _ => 1,
            })
        })
        .collect();
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("tokenizer.ggml.model", V::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            V::Array(pieces.iter().map(|p| V::String(p.clone())).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            V::Array(scores.iter().map(|&x| V::F32(x)).collect()),
        ),
        ("tokenizer.ggml.token_type", V::Array(types)),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
    ];
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("tok.gguf");
    let refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(&gguf).unwrap(), &refs, &[]).unwrap();
    let content = gguf_file::Content::read(&mut std::fs::File::open(&gguf).unwrap()).unwrap();
    let from_gguf = Tokenizer::from_gguf(&content).unwrap();
    let texts = hard_strings(&["<s>", "</s>"]);
    let mut bad = Vec::new();
    for t in &texts {
        let (a, b) = (from_gguf.encode(t, true), json.encode(t, true));
        if a != b {
            bad.push(format!("{t:?}:\n  gguf {a:?}\n  json {b:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} strings differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert_eq!(from_gguf.bos_id(), Some(1));
}
