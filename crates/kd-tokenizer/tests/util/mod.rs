//! Shared helpers for the integration tests: locating the real teacher and the
//! reference data, temp dirs, a tiny seeded RNG.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kd_tokenizer::Tokenizer;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The teacher GGUF: `$KD_TEACHER_GGUF`, else
/// `<workspace>/data/models/SmolLM2-135M-Instruct.Q4_1.gguf`. CI always has it.
pub fn teacher_gguf_path() -> Option<PathBuf> {
    let path = match std::env::var_os("KD_TEACHER_GGUF") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    path.is_file().then_some(path)
}

/// The teacher's tokenizer, loaded once; `None` (with a note on stderr) when
/// the GGUF is absent, in which case the calling test returns early.
pub fn teacher(test: &str) -> Option<&'static Tokenizer> {
    static TEACHER: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let tok = TEACHER.get_or_init(|| {
        let path = teacher_gguf_path()?;
        let mut file = std::fs::File::open(&path).expect("open teacher GGUF");
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .expect("read teacher GGUF metadata");
        Some(Tokenizer::from_gguf(&content).expect("teacher tokenizer loads"))
    });
    if tok.is_none() {
        eprintln!(
            "SKIPPED {test}: teacher GGUF not found (set KD_TEACHER_GGUF or put it in data/models/)"
        );
    }
    tok.as_ref()
}

/// Reference data for the teacher: `<workspace>/tests/reference/smollm2-135m-instruct-q4_1`
/// (see the README there), or that folder under `$KD_REFERENCE_DIR`.
pub fn reference_dir() -> PathBuf {
    std::env::var_os("KD_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("tests/reference"))
        .join("smollm2-135m-instruct-q4_1")
}

/// Every line of a reference JSONL file.
pub fn read_jsonl(name: &str) -> Vec<serde_json::Value> {
    let path = reference_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reference file {} is required: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("reference line is JSON"))
        .collect()
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Fresh temporary directory, removed when dropped.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create temp dir")
}

/// Strings that stress pre-tokenization and byte handling.
pub const TRICKY: &[&str] = &[
    "",
    " ",
    "\n",
    "   \n\n\t  \r\n ",
    "Hello, world!",
    "trailing spaces   ",
    "   leading spaces",
    "Ünïcödé naïve café Straße Ελληνικά русский 日本語のテキスト 한국어",
    "emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽",
    "combining e\u{301} a\u{308}\u{301} zero\u{200b}width",
    "fn main() {\n    println!(\"{:?}\", vec![1, 2, 3]);\n}\n",
    "def f(x):\n\treturn x**2  # square\n\n\n",
    "x = 3.14159e-10; y = 1,000,000; z = ٣٤٥ ² ½",
    "don't won't it's we'll they're I'M YOU'RE",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|<|im_end|>>< |im_start|> <|im_end",
    "<repo_name>kd<file_sep>x<|endoftext|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "URL: https://example.com/path?q=1&r=two#frag",
    "tabs\tand\u{a0}nbsp\u{3000}ideographic\u{2028}sep",
    "mixed CASE and camelCaseWords snake_case_words SCREAMING_CASE",
];

/// A tiny xorshift64* generator: deterministic, no dependencies.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A random char drawn from a mix of ranges that matter to tokenizers.
    pub fn char(&mut self) -> char {
        const RANGES: &[(u32, u32)] = &[
            (0x20, 0x7e),        // ASCII printable
            (0x20, 0x20),        // space (extra weight)
            (0x09, 0x0d),        // \t \n \v \f \r
            (0x00, 0x1f),        // C0 controls
            (0x30, 0x39),        // digits
            (0xa0, 0xff),        // Latin-1
            (0x300, 0x36f),      // combining marks
            (0x370, 0x3ff),      // Greek
            (0x400, 0x4ff),      // Cyrillic
            (0x660, 0x669),      // Arabic-Indic digits
            (0x2000, 0x206f),    // general punctuation, odd spaces
            (0x3000, 0x30ff),    // CJK punctuation, kana
            (0x4e00, 0x9fff),    // CJK ideographs
            (0xac00, 0xd7a3),    // Hangul
            (0x1f300, 0x1faff),  // emoji
            (0x10000, 0x10ffff), // anything astral
        ];
        loop {
            let (lo, hi) = RANGES[self.below(RANGES.len() as u64) as usize];
            let c = lo + self.below(u64::from(hi - lo + 1)) as u32;
            if let Some(c) = char::from_u32(c) {
                return c;
            }
        }
    }

    /// A random string of up to `max_chars` characters, sometimes with
    /// special-token text mixed in.
    pub fn string(&mut self, max_chars: u64) -> String {
        let n = self.below(max_chars + 1);
        let mut s = String::new();
        for _ in 0..n {
            match self.below(40) {
                0 => s.push_str("<|im_start|>"),
                1 => s.push_str("<|im_end|>"),
                2 => s.push_str("<|im_"),
                3 => s.push_str("   "),
                _ => s.push(self.char()),
            }
        }
        s
    }
}
