//! GPT-2's reversible byte ↔ character mapping.
//!
//! Byte-level BPE vocabularies store every token as a string in which each raw
//! byte is replaced by one printable character: printable Latin-1 bytes map to
//! themselves, the other 68 bytes to U+0100..U+0143 in byte order (so a space
//! is `Ġ`, a newline `Ċ`). This module converts between the two forms.

/// Byte → vocabulary character, built at compile time exactly as GPT-2's
/// `bytes_to_unicode()` does.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
        let code = if printable {
            b as u32
        } else {
            shifted += 1;
            255 + shifted
        };
        table[b] = match char::from_u32(code) {
            Some(c) => c,
            None => panic!("byte table holds only valid scalar values"),
        };
        b += 1;
    }
    table
};

/// Vocabulary character (U+0000..U+0143) → byte; `u16::MAX` where no byte maps.
const CHAR_TO_BYTE: [u16; 0x144] = {
    let mut table = [u16::MAX; 0x144];
    let mut b = 0usize;
    while b < 256 {
        table[BYTE_TO_CHAR[b] as usize] = b as u16;
        b += 1;
    }
    table
};

/// The vocabulary character that stands for `byte` (e.g. `b' '` → `'Ġ'`).
pub fn byte_to_char(byte: u8) -> char {
    BYTE_TO_CHAR[byte as usize]
}

/// The byte a vocabulary character stands for, or `None` for characters
/// outside the mapping.
pub fn char_to_byte(c: char) -> Option<u8> {
    CHAR_TO_BYTE
        .get(c as usize)
        .and_then(|&b| u8::try_from(b).ok())
}

/// Writes raw bytes in vocabulary form (e.g. `b" Paris"` → `"ĠParis"`).
pub fn bytes_to_vocab_form(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_to_char(b)).collect()
}

/// Raw bytes of a token stored in vocabulary form. Characters outside the
/// mapping (which a well-formed byte-level vocabulary never holds) keep their
/// UTF-8 encoding, as llama.cpp does.
pub fn vocab_form_to_bytes(token: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_gpt2_table() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(b'!'), '!');
        assert_eq!(byte_to_char(0x00), 'Ā');
        assert_eq!(byte_to_char(0xad), 'Ń');
        assert_eq!(byte_to_char(0xff), 'ÿ');
    }

    #[test]
    fn mapping_is_a_bijection() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(char_to_byte('€'), None);
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(vocab_form_to_bytes(&bytes_to_vocab_form(&all)), all);
    }
}
