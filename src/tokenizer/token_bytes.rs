//! The bytes each token id stands for, read from a tokenizer's vocabulary and its decoder: what
//! a constrained decoder needs to know which tokens can extend a text.
//!
//! Two families of vocabularies are understood: byte-level BPE (GPT-2's, Llama 3's, SmolLM2's:
//! each character of a piece stands for one byte) and SentencePiece-style pieces (Llama 2's,
//! Gemma's: `▁` stands for a space and `<0xHH>` pieces for raw bytes). Special added tokens are
//! marked with a leading `0xFF` byte (a byte no UTF-8 text holds), as `toktrie` expects, so
//! that no text ever produces them.

use serde_json::Value;
use tokenizers::Tokenizer;

use super::TokenizerError;

/// The byte that starts the bytes of a special token (`toktrie`'s marker).
pub const SPECIAL_TOKEN_MARKER: u8 = 0xFF;

/// How a vocabulary's pieces spell bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// GPT-2's byte-level alphabet: one character per byte.
    ByteLevel,
    /// SentencePiece pieces: `space` stands for a space, `<0xHH>` for one byte.
    Pieces { space: char },
}

/// The bytes of every id below `vocab_size` (the model's logits width, which may exceed the
/// tokenizer's vocabulary: ids it lacks get no bytes, and so are never allowed). Special added
/// tokens start with [`SPECIAL_TOKEN_MARKER`].
pub fn token_bytes(
    tokenizer: &Tokenizer,
    vocab_size: usize,
) -> Result<Vec<Vec<u8>>, TokenizerError> {
    let spelling = spelling(tokenizer)?;
    let added = tokenizer.get_added_tokens_decoder();
    let alphabet = byte_level_alphabet();
    Ok((0..vocab_size as u32)
        .map(|id| match added.get(&id) {
            Some(token) if token.special => {
                [&[SPECIAL_TOKEN_MARKER], token.content.as_bytes()].concat()
            }
            Some(token) => token.content.as_bytes().to_vec(),
            None => tokenizer
                .id_to_token(id)
                .map(|piece| piece_bytes(&piece, spelling, &alphabet))
                .unwrap_or_default(),
        })
        .collect())
}

/// How `tokenizer`'s decoder turns pieces into text; an error for decoders that are neither
/// byte-level nor SentencePiece-style (WordPiece, CTC).
fn spelling(tokenizer: &Tokenizer) -> Result<Spelling, TokenizerError> {
    let unsupported = |what: String| TokenizerError::Build {
        component: "token bytes",
        message: format!(
            "{what}: only byte-level BPE and SentencePiece-style vocabularies can be constrained"
        ),
    };
    let decoder = tokenizer
        .get_decoder()
        .ok_or_else(|| unsupported("the tokenizer has no decoder".into()))?;
    let decoder = serde_json::to_value(decoder)
        .map_err(|e| unsupported(format!("its decoder cannot be read: {e}")))?;
    let steps: Vec<&Value> = match decoder["type"].as_str() {
        Some("Sequence") => decoder["decoders"]
            .as_array()
            .map(|steps| steps.iter().collect())
            .unwrap_or_default(),
        _ => vec![&decoder],
    };
    let kind = |name: &str| steps.iter().find(|s| s["type"].as_str() == Some(name));
    if kind("ByteLevel").is_some() {
        return Ok(Spelling::ByteLevel);
    }
    let single = |s: Option<&str>| {
        let mut chars = s?.chars();
        chars.next().filter(|_| chars.next().is_none())
    };
    if let Some(replace) = kind("Replace").filter(|r| r["content"].as_str() == Some(" ")) {
        if let Some(space) = single(replace["pattern"]["String"].as_str()) {
            return Ok(Spelling::Pieces { space });
        }
    }
    if let Some(metaspace) = kind("Metaspace") {
        let space = single(metaspace["replacement"].as_str()).unwrap_or('▁');
        return Ok(Spelling::Pieces { space });
    }
    if kind("ByteFallback").is_some() {
        return Ok(Spelling::Pieces { space: '▁' });
    }
    Err(unsupported(format!("decoder {}", decoder["type"])))
}

/// The bytes of one vocabulary piece (a piece outside the byte-level alphabet gets none).
fn piece_bytes(piece: &str, spelling: Spelling, alphabet: &[Option<u8>]) -> Vec<u8> {
    match spelling {
        Spelling::ByteLevel => piece
            .chars()
            .map(|c| alphabet.get(c as usize).copied().flatten())
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_default(),
        Spelling::Pieces { space } => match byte_piece(piece) {
            Some(byte) => vec![byte],
            None => piece.replace(space, " ").into_bytes(),
        },
    }
}

/// The byte of a `<0xHH>` piece.
fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// GPT-2's byte-level alphabet, indexed by character: the byte each character stands for.
/// Printable bytes stand for themselves; the others (control characters, space, DEL, NBSP, the
/// soft hyphen) are spelled by the characters from U+0100 on, in byte order.
fn byte_level_alphabet() -> Vec<Option<u8>> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut alphabet = vec![None; 0x100 + 0x100];
    let mut next = 0x100;
    for byte in 0..=255u8 {
        let index = match printable(byte) {
            true => byte as usize,
            false => {
                next += 1;
                next - 1
            }
        };
        alphabet[index] = Some(byte);
    }
    alphabet
}

/// The byte-level BPE tokenizer of the `gpt2` test fixture.
#[cfg(test)]
pub(crate) fn gpt2_fixture_tokenizer() -> Tokenizer {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gpt2/tokenizer.json"
    );
    Tokenizer::from_file(path).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2() -> Tokenizer {
        gpt2_fixture_tokenizer()
    }

    #[test]
    fn byte_level_pieces_decode_to_the_bytes_the_tokenizer_decodes() {
        let tokenizer = gpt2();
        let bytes = token_bytes(&tokenizer, 300).unwrap();
        // id 0 is the special <|endoftext|>, marked.
        assert_eq!(bytes[0], b"\xFF<|endoftext|>");
        for id in 1..300u32 {
            let decoded = tokenizer.decode(&[id], false).unwrap();
            // Pieces that are whole characters decode to the same text.
            if let Ok(text) = std::str::from_utf8(&bytes[id as usize]) {
                assert_eq!(text, decoded, "token {id}");
            }
        }
        assert_eq!(bytes.iter().filter(|b| b.is_empty()).count(), 0);
        // Ids past the tokenizer's vocabulary (a padded logits width) have no bytes.
        let padded = token_bytes(&tokenizer, 304).unwrap();
        assert!(padded[300..].iter().all(Vec::is_empty));
    }

    #[test]
    fn the_alphabet_spells_every_byte_once() {
        let alphabet = byte_level_alphabet();
        let mut seen: Vec<u8> = alphabet.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..=255).collect::<Vec<u8>>());
        assert_eq!(alphabet['Ġ' as usize], Some(b' '));
        assert_eq!(alphabet['Ċ' as usize], Some(b'\n'));
        assert_eq!(alphabet['a' as usize], Some(b'a'));
    }

    #[test]
    fn sentencepiece_pieces_spell_spaces_and_raw_bytes() {
        let spelling = Spelling::Pieces { space: '▁' };
        let none = [];
        assert_eq!(piece_bytes("▁Hello", spelling, &none), b" Hello");
        assert_eq!(piece_bytes("<0x0A>", spelling, &none), b"\n");
        assert_eq!(piece_bytes("<0xZZ>", spelling, &none), b"<0xZZ>");
        assert_eq!(piece_bytes("<0x0A0>", spelling, &none), b"<0x0A0>");
    }
}
