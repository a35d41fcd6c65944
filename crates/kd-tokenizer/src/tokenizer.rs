//! The [`Tokenizer`]: vocabulary, merges, special tokens and pre-tokenizer.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::bpe::Bpe;
use crate::byte_level::{byte_to_char, vocab_form_to_bytes};
use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::pretokenize::PreTokenizer;

/// What a vocabulary entry is, which decides how it is matched and decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// An ordinary BPE token, stored in GPT-2 byte-to-character form.
    Normal,
    /// A control token (`<|im_start|>`; GGUF type 3, or a `special` added
    /// token): matched in text only when `parse_special`, dropped by
    /// `decode(.., skip_special = true)`.
    Control,
    /// A user-defined token (GGUF type 4, or a non-special added token):
    /// always matched in text, always decoded, like llama.cpp and `tokenizers`.
    UserDefined,
}

/// End-of-turn markers that [`Tokenizer::stop_ids`] adds when the vocabulary has them.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"];

/// A byte-level BPE tokenizer (GPT-2 style), loaded from GGUF metadata or a
/// Hugging Face `tokenizer.json`. Cloning is cheap (the tables are shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    /// Vocabulary strings as stored (GGUF / `tokenizer.json` form).
    tokens: Vec<String>,
    /// The raw bytes each token stands for.
    bytes: Vec<Vec<u8>>,
    kinds: Vec<TokenKind>,
    stored_to_id: HashMap<String, u32>,
    bytes_to_id: HashMap<Vec<u8>, u32>,
    /// Merge rules in rank order, as token ids.
    merges: Vec<(u32, u32)>,
    bpe: Bpe,
    specials: SpecialMatcher,
    pre: PreTokenizer,
    /// Take a whole word from the vocabulary before merging (Llama 3).
    ignore_merges: bool,
    /// NFC-normalise text between special tokens before pre-tokenization.
    nfc: bool,
    /// SentencePiece-style BPE: text prepared with `▁`, merges over characters, bytes as
    /// fallback.
    sp: Option<crate::sentencepiece::SpForm>,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    chat_template: Option<ChatTemplate>,
    fingerprint: String,
}

/// Everything needed to build a tokenizer; loaders fill it from their source.
pub(crate) struct Parts {
    pub(crate) tokens: Vec<String>,
    pub(crate) kinds: Vec<TokenKind>,
    pub(crate) merges: Vec<(String, String)>,
    /// Field the merges came from, for error messages.
    pub(crate) merges_field: &'static str,
    pub(crate) pre: PreTokenizer,
    pub(crate) ignore_merges: bool,
    pub(crate) bos: Option<u32>,
    pub(crate) eos: Option<u32>,
    pub(crate) pad: Option<u32>,
    pub(crate) add_bos: bool,
    pub(crate) chat_template: Option<String>,
    /// Unicode NFC normalisation of text before pre-tokenization (Qwen's `tokenizer.json`).
    pub(crate) nfc: bool,
    /// SentencePiece-style BPE (`None`: byte-level BPE).
    pub(crate) sp: Option<crate::sentencepiece::SpForm>,
}

impl Tokenizer {
    /// Builds a tokenizer from its parts; what [`Tokenizer::tiny_for_tests`]
    /// and other crates' fixtures use.
    ///
    /// * `tokens`: the vocabulary in id order, in GGUF / `tokenizer.json` form:
    ///   ordinary tokens in GPT-2 byte-to-character form (`"Ġthe"`, see
    ///   [`crate::bytes_to_vocab_form`]), special tokens as their literal text.
    /// * `merges`: merge rules in rank order, as pairs of vocabulary strings;
    ///   both halves and their concatenation must be in the vocabulary.
    /// * `special_ids`: the ids of control tokens (matched in text when
    ///   `parse_special`, skipped by `decode(.., true)`).
    /// * `pre`: a `tokenizer.ggml.pre` preset name such as `"smollm"` or `"gpt2"`.
    ///
    /// BOS, EOS, padding and the chat template start unset; see
    /// [`Tokenizer::with_bos`] and friends.
    pub fn from_parts(
        tokens: Vec<String>,
        merges: Vec<(String, String)>,
        special_ids: &[u32],
        pre: &str,
    ) -> Result<Tokenizer> {
        let mut kinds = vec![TokenKind::Normal; tokens.len()];
        for &id in special_ids {
            let kind = kinds.get_mut(id as usize).ok_or_else(|| {
                Error::invalid(
                    "special_ids",
                    format!("id {id} is outside the vocabulary of {}", tokens.len()),
                )
            })?;
            *kind = TokenKind::Control;
        }
        let pre = PreTokenizer::from_preset(pre)?;
        let ignore_merges = pre.name == "llama3";
        Tokenizer::build(Parts {
            tokens,
            kinds,
            merges,
            merges_field: "merges",
            pre,
            ignore_merges,
            bos: None,
            eos: None,
            pad: None,
            add_bos: false,
            chat_template: None,
            nfc: false,
            sp: None,
        })
    }

    pub(crate) fn build(parts: Parts) -> Result<Tokenizer> {
        let Parts {
            tokens,
            kinds,
            merges: merge_strings,
            merges_field,
            pre,
            ignore_merges,
            bos,
            eos,
            pad,
            add_bos,
            chat_template,
            nfc,
            sp,
        } = parts;
        if tokens.is_empty() {
            return Err(Error::invalid("tokens", "the vocabulary is empty"));
        }
        if tokens.len() > u32::MAX as usize {
            return Err(Error::invalid("tokens", "more than 2^32 tokens"));
        }
        debug_assert_eq!(tokens.len(), kinds.len());
        for (name, id) in [("bos", bos), ("eos", eos), ("pad", pad)] {
            if let Some(id) = id
                && id as usize >= tokens.len()
            {
                return Err(Error::invalid(
                    format!("{name}_token_id"),
                    format!("id {id} is outside the vocabulary of {}", tokens.len()),
                ));
            }
        }

        let bytes: Vec<Vec<u8>> = tokens
            .iter()
            .zip(&kinds)
            .map(|(t, k)| match k {
                TokenKind::Normal if sp.is_some() => crate::sentencepiece::token_bytes(t),
                TokenKind::Normal => vocab_form_to_bytes(t),
                TokenKind::Control | TokenKind::UserDefined => t.as_bytes().to_vec(),
            })
            .collect();

        // First occurrence wins for duplicated strings, as in llama.cpp.
        let mut stored_to_id = HashMap::with_capacity(tokens.len());
        let mut bytes_to_id = HashMap::with_capacity(tokens.len());
        for (id, (t, b)) in tokens.iter().zip(&bytes).enumerate() {
            stored_to_id.entry(t.clone()).or_insert(id as u32);
            if kinds[id] == TokenKind::Normal {
                bytes_to_id.entry(b.clone()).or_insert(id as u32);
            }
        }

        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let form = if sp.is_some() {
                format!("<0x{b:02X}>")
            } else {
                byte_to_char(b as u8).to_string()
            };
            *slot = stored_to_id
                .get(&form)
                .copied()
                .filter(|&id| kinds[id as usize] == TokenKind::Normal);
        }

        let mut merges = Vec::with_capacity(merge_strings.len());
        let mut merge_map = HashMap::with_capacity(merge_strings.len());
        for (index, (left, right)) in merge_strings.into_iter().enumerate() {
            let lookup = |s: &str| stored_to_id.get(s).copied();
            let bad = |message: String| Error::BadMerge {
                field: merges_field.to_string(),
                index,
                left: left.clone(),
                right: right.clone(),
                message,
            };
            let l =
                lookup(&left).ok_or_else(|| bad(format!("`{left}` is not in the vocabulary")))?;
            let r =
                lookup(&right).ok_or_else(|| bad(format!("`{right}` is not in the vocabulary")))?;
            let joined = format!("{left}{right}");
            let m = lookup(&joined)
                .ok_or_else(|| bad(format!("the result `{joined}` is not in the vocabulary")))?;
            merges.push((l, r));
            merge_map.entry((l, r)).or_insert((index as u32, m));
        }

        let specials = SpecialMatcher::new(&tokens, &kinds);
        let fingerprint = fingerprint(&bytes, &kinds, &merges, nfc, sp.as_ref());
        let bos_text = bos
            .map(|id| tokens[id as usize].clone())
            .unwrap_or_default();
        let eos_text = eos
            .map(|id| tokens[id as usize].clone())
            .unwrap_or_default();
        let chat_template = chat_template.map(|src| ChatTemplate::new(src, bos_text, eos_text));

        Ok(Tokenizer {
            inner: Arc::new(Inner {
                tokens,
                bytes,
                kinds,
                stored_to_id,
                bytes_to_id,
                merges,
                bpe: Bpe::new(merge_map, byte_ids),
                specials,
                pre,
                ignore_merges,
                nfc,
                sp,
                bos,
                eos,
                pad,
                add_bos,
                chat_template,
                fingerprint,
            }),
        })
    }

    /// Sets the BOS token (and the chat template's `bos_token`).
    pub fn with_bos(mut self, id: Option<u32>) -> Result<Tokenizer> {
        self.check_id("bos_token_id", id)?;
        let inner = Arc::make_mut(&mut self.inner);
        inner.bos = id;
        self.refresh_template_tokens();
        Ok(self)
    }

    /// Sets the EOS token (and the chat template's `eos_token`).
    pub fn with_eos(mut self, id: Option<u32>) -> Result<Tokenizer> {
        self.check_id("eos_token_id", id)?;
        Arc::make_mut(&mut self.inner).eos = id;
        self.refresh_template_tokens();
        Ok(self)
    }

    /// Sets whether prompts should start with BOS (see [`Tokenizer::add_bos_token`]).
    pub fn with_add_bos(mut self, add_bos: bool) -> Tokenizer {
        Arc::make_mut(&mut self.inner).add_bos = add_bos;
        self
    }

    /// Sets the padding token.
    pub fn with_pad(mut self, id: Option<u32>) -> Result<Tokenizer> {
        self.check_id("padding_token_id", id)?;
        Arc::make_mut(&mut self.inner).pad = id;
        Ok(self)
    }

    /// Sets (or removes) the Jinja chat template; its `bos_token` / `eos_token`
    /// come from this tokenizer's BOS / EOS.
    pub fn with_chat_template(mut self, source: Option<String>) -> Tokenizer {
        let (bos, eos) = self.special_texts();
        Arc::make_mut(&mut self.inner).chat_template =
            source.map(|src| ChatTemplate::new(src, bos, eos));
        self
    }

    fn check_id(&self, field: &str, id: Option<u32>) -> Result<()> {
        match id {
            Some(id) if id as usize >= self.vocab_size() => Err(Error::invalid(
                field,
                format!("id {id} is outside the vocabulary of {}", self.vocab_size()),
            )),
            _ => Ok(()),
        }
    }

    fn special_texts(&self) -> (String, String) {
        let text = |id: Option<u32>| {
            id.map(|id| self.inner.tokens[id as usize].clone())
                .unwrap_or_default()
        };
        (text(self.inner.bos), text(self.inner.eos))
    }

    fn refresh_template_tokens(&mut self) {
        let (bos, eos) = self.special_texts();
        let inner = Arc::make_mut(&mut self.inner);
        if let Some(t) = inner.chat_template.take() {
            inner.chat_template = Some(ChatTemplate::new(t.source().to_string(), bos, eos));
        }
    }

    /// Token ids of `text`. With `parse_special`, control tokens written in the
    /// text (`"<|im_start|>"`) become their ids; otherwise they are tokenized as
    /// plain text. User-defined tokens are always matched. No BOS is added; see
    /// [`Tokenizer::add_bos_token`].
    ///
    /// Bytes the vocabulary has no token for (see [`Tokenizer::unencodable_bytes`])
    /// are dropped, as `tokenizers` and llama.cpp do.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let inner = &*self.inner;
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let bytes = text.as_bytes();
        let mut start = 0;
        let mut i = 0;
        while i < bytes.len() {
            match inner.specials.match_at(bytes, i, parse_special) {
                Some((len, id)) => {
                    // A match starts on a lead byte and spans whole characters,
                    // so both ends are char boundaries.
                    self.encode_segment(&text[start..i], start == 0, &mut out);
                    out.push(id);
                    i += len;
                    start = i;
                }
                None => i += 1,
            }
        }
        self.encode_segment(&text[start..], start == 0, &mut out);
        out
    }

    /// Text between special tokens (`starts_text`: it begins the input).
    fn encode_segment(&self, text: &str, starts_text: bool, out: &mut Vec<u32>) {
        let inner = &*self.inner;
        let Some(sp) = &inner.sp else {
            return self.encode_ordinary(text, out);
        };
        if text.is_empty() {
            return;
        }
        let prepared = sp.prepare(text, starts_text);
        let unk = sp
            .unk
            .as_deref()
            .and_then(|u| inner.stored_to_id.get(u).copied());
        for word in sp.words(&prepared) {
            let mut ids = Vec::with_capacity(word.len());
            let mut buf = [0u8; 4];
            for c in word.chars() {
                let s = c.encode_utf8(&mut buf);
                match inner.stored_to_id.get(&*s) {
                    Some(&id) if inner.kinds[id as usize] == TokenKind::Normal => ids.push(id),
                    _ => {
                        for b in s.bytes() {
                            match (inner.bpe.byte_id(b), unk) {
                                (Some(id), _) => ids.push(id),
                                // `fuse_unk`: a run of unknowns is one token.
                                (None, Some(u)) if ids.last() != Some(&u) => ids.push(u),
                                _ => {}
                            }
                        }
                    }
                }
            }
            inner.bpe.merge(ids, out);
        }
    }

    /// Pre-tokenization and BPE for text without special tokens.
    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let inner = &*self.inner;
        let normalized;
        let text = if inner.nfc {
            use unicode_normalization::UnicodeNormalization;
            normalized = text.nfc().collect::<String>();
            normalized.as_str()
        } else {
            text
        };
        for word in inner.pre.split(text) {
            let word = word.as_bytes();
            if inner.ignore_merges
                && let Some(&id) = inner.bytes_to_id.get(word)
            {
                out.push(id);
                continue;
            }
            inner.bpe.encode_word(word, out);
        }
    }

    /// Text of `ids`. Lossless: `decode(&encode(s, false), false) == s` for any
    /// string whose bytes all have tokens. Control tokens are rendered as their
    /// text unless `skip_special`; ids outside the vocabulary are skipped.
    /// Invalid UTF-8 (a sequence cut mid-character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, skip_special)).into_owned()
    }

    /// Raw bytes of `ids`, for callers that stream text and must join
    /// characters split across tokens themselves.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        let inner = &*self.inner;
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let Some(bytes) = inner.bytes.get(id as usize) else {
                continue;
            };
            if skip_special && inner.kinds[id as usize] == TokenKind::Control {
                continue;
            }
            out.extend_from_slice(bytes);
        }
        out
    }

    /// Human-readable text of one token (`" Paris"`, `"\n"`, `"<|im_end|>"`);
    /// bytes that are not valid UTF-8 on their own show as U+FFFD. For display only.
    pub fn token_text(&self, id: u32) -> String {
        match self.inner.bytes.get(id as usize) {
            Some(b) => String::from_utf8_lossy(b).into_owned(),
            None => format!("<invalid token {id}>"),
        }
    }

    /// The token's vocabulary string as stored (`"ĠParis"`), if `id` is in range.
    pub fn vocab_string(&self, id: u32) -> Option<&str> {
        self.inner.tokens.get(id as usize).map(String::as_str)
    }

    /// Number of tokens (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.inner.tokens.len()
    }

    /// Beginning-of-sequence token, if the source names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos
    }

    /// End-of-sequence token, if the source names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.inner.eos
    }

    /// Padding token, if the source names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.inner.pad
    }

    /// Whether the model expects BOS before a prompt (GGUF `add_bos_token`);
    /// [`Tokenizer::encode`] never adds it itself.
    pub fn add_bos_token(&self) -> bool {
        self.inner.add_bos
    }

    /// Exact vocabulary lookup: a special token's text (`"<|im_end|>"`) or an
    /// ordinary token's stored form (`"ĠParis"`); failing that, an ordinary
    /// token whose bytes are exactly `text` (`" Paris"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        let inner = &*self.inner;
        inner
            .stored_to_id
            .get(text)
            .or_else(|| inner.bytes_to_id.get(text.as_bytes()))
            .copied()
    }

    /// What kind of token `id` is, if it is in range.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.inner.kinds.get(id as usize).copied()
    }

    /// Whether `id` is a control token (skipped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.token_kind(id) == Some(TokenKind::Control)
    }

    /// Ids that end generation: EOS first, then whichever of `<|im_end|>`,
    /// `<|eot_id|>`, `<|endoftext|>` and `</s>` the vocabulary holds as special
    /// tokens; no duplicates.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.inner.eos.into_iter().collect();
        for text in END_OF_TURN {
            if let Some(&id) = self.inner.stored_to_id.get(text)
                && self.inner.kinds[id as usize] != TokenKind::Normal
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        ids
    }

    /// The chat template from the source, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.inner.chat_template.as_ref()
    }

    /// Name of the pre-tokenizer: a llama.cpp preset (`smollm`, `gpt2`,
    /// `llama3`, `qwen2`, `default`) or `custom`.
    pub fn pre_tokenizer(&self) -> &str {
        &self.inner.pre.name
    }

    /// Bytes with no single-byte token. Text containing them cannot round-trip;
    /// SmolLM2's vocabulary, for instance, lacks 21 (control characters such as
    /// `\x04`, and bytes that never occur in UTF-8 or only in planes 4–11).
    pub fn unencodable_bytes(&self) -> Vec<u8> {
        self.inner.bpe.missing_bytes()
    }

    /// Lowercase hex SHA-256 identifying the tokenizer: the bytes and kind
    /// (ordinary / control / user-defined) of every token in id order, and the
    /// merges in rank order. BOS/EOS/padding, the pre-tokenizer and the chat
    /// template are not included, so a GGUF and the `tokenizer.json` made from
    /// it give the same value.
    pub fn fingerprint(&self) -> String {
        self.inner.fingerprint.clone()
    }

    pub(crate) fn tokens(&self) -> &[String] {
        &self.inner.tokens
    }

    pub(crate) fn kinds(&self) -> &[TokenKind] {
        &self.inner.kinds
    }

    pub(crate) fn merge_ids(&self) -> &[(u32, u32)] {
        &self.inner.merges
    }

    pub(crate) fn pre(&self) -> &PreTokenizer {
        &self.inner.pre
    }

    pub(crate) fn ignore_merges(&self) -> bool {
        self.inner.ignore_merges
    }

    /// Whether text is NFC-normalised before pre-tokenization.
    pub(crate) fn nfc(&self) -> bool {
        self.inner.nfc
    }

    /// Whether this is byte-level BPE (GPT-2 style), not SentencePiece-style.
    pub fn is_byte_level(&self) -> bool {
        self.inner.sp.is_none()
    }

    /// The SentencePiece-style form, if this is not byte-level BPE.
    pub(crate) fn sentencepiece(&self) -> Option<&crate::sentencepiece::SpForm> {
        self.inner.sp.as_ref()
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("Tokenizer")
            .field("vocab_size", &inner.tokens.len())
            .field("merges", &inner.merges.len())
            .field("pre_tokenizer", &inner.pre.name)
            .field("bos", &inner.bos)
            .field("eos", &inner.eos)
            .field("pad", &inner.pad)
            .field("chat_template", &inner.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

fn fingerprint(
    bytes: &[Vec<u8>],
    kinds: &[TokenKind],
    merges: &[(u32, u32)],
    nfc: bool,
    sp: Option<&crate::sentencepiece::SpForm>,
) -> String {
    let mut h = Sha256::new();
    h.update(b"kd-tokenizer/bpe/v1\0");
    h.update((bytes.len() as u64).to_le_bytes());
    for (b, k) in bytes.iter().zip(kinds) {
        h.update([match k {
            TokenKind::Normal => 0u8,
            TokenKind::Control => 1,
            TokenKind::UserDefined => 2,
        }]);
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    }
    h.update((merges.len() as u64).to_le_bytes());
    for &(l, r) in merges {
        h.update(l.to_le_bytes());
        h.update(r.to_le_bytes());
    }
    // Only when set, so that tokenizers without it keep their fingerprints.
    if nfc {
        h.update(b"\0normalizer:NFC");
    }
    if let Some(sp) = sp {
        h.update(format!("\0sentencepiece:{:?}/{}", sp.prepend, sp.split).as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A special or user-defined token as the matcher sees it.
#[derive(Clone, Debug)]
struct Special {
    text: Box<[u8]>,
    id: u32,
    control: bool,
}

/// Finds special tokens in text: leftmost, then longest.
#[derive(Clone, Debug)]
struct SpecialMatcher {
    /// Candidates indexed by first byte (256 lists), longest first.
    by_first: Vec<Vec<Special>>,
}

impl SpecialMatcher {
    fn new(tokens: &[String], kinds: &[TokenKind]) -> SpecialMatcher {
        let mut by_first: Vec<Vec<Special>> = vec![Vec::new(); 256];
        for (id, (t, k)) in tokens.iter().zip(kinds).enumerate() {
            if *k == TokenKind::Normal || t.is_empty() {
                continue;
            }
            let entry = &mut by_first[t.as_bytes()[0] as usize];
            // First id wins for duplicated texts.
            if entry.iter().all(|s| *s.text != *t.as_bytes()) {
                entry.push(Special {
                    text: t.as_bytes().into(),
                    id: id as u32,
                    control: *k == TokenKind::Control,
                });
            }
        }
        for list in &mut by_first {
            list.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        }
        SpecialMatcher { by_first }
    }

    /// (length, id) of the longest special token starting at `at`.
    fn match_at(&self, text: &[u8], at: usize, parse_special: bool) -> Option<(usize, u32)> {
        self.by_first[text[at] as usize]
            .iter()
            .find(|s| (parse_special || !s.control) && text[at..].starts_with(&s.text))
            .map(|s| (s.text.len(), s.id))
    }
}
