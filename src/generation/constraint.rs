//! Structured outputs: a JSON schema, any JSON object, a regular expression or a Lark grammar
//! that the generated text must match, enforced with `llguidance`.
//!
//! [`Grammars`] compiles a [`Constraint`] against the model's vocabulary into a
//! [`ConstraintState`], one per sequence, which rank 0 consults beside the other logits
//! processors: before them it bans every token the grammar does not allow next (so that the
//! sampling warpers see only allowed tokens), after them it bans them again (so that a forced
//! token cannot escape the grammar), and once the chosen token is broadcast it advances. Every
//! rank gets the chosen token as before, so no rank but 0 holds a grammar.
//!
//! The end of a sequence: the vocabulary given to `llguidance` has one token more than the
//! model's logits, which stands for "the grammar may end here". Where the grammar allows it,
//! the request's end-of-sequence ids keep their scores; elsewhere they are banned; once the
//! grammar is complete they are all that is left, so a sequence ends as soon as its text does.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::checkpoint::source::WeightsLocation;
use crate::error::{Error, Result};
use crate::text::TextSide;
use crate::tokenizer::token_bytes::{token_bytes, SPECIAL_TOKEN_MARKER};

/// What the generated text must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `response_format` `json_object`).
    JsonObject,
    /// A JSON document valid against this JSON schema (its text).
    JsonSchema(String),
    /// Text matched as a whole by this regular expression (Rust `regex` syntax).
    Regex(String),
    /// Text of this Lark grammar (`llguidance`'s dialect, whose `start` rule is the whole text).
    Lark(String),
}

impl Constraint {
    /// The option's name, as errors name it.
    pub fn name(&self) -> &'static str {
        match self {
            Constraint::JsonObject => "json_object",
            Constraint::JsonSchema(_) => "json_schema",
            Constraint::Regex(_) => "regex",
            Constraint::Lark(_) => "grammar",
        }
    }

    /// The grammar `llguidance` compiles. JSON is written compactly (no whitespace between
    /// tokens) unless the schema says otherwise in its `x-guidance` options: a model free to
    /// add whitespace can add it forever.
    fn grammar(&self) -> Result<TopLevelGrammar> {
        let compact = || json!({"whitespace_flexible": false});
        Ok(match self {
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(
                json!({"type": "object", "x-guidance": compact()}),
            ),
            Constraint::JsonSchema(text) => {
                let mut schema: Value = serde_json::from_str(text).map_err(|e| {
                    Error::InvalidInput(format!("json_schema is not valid JSON: {e}"))
                })?;
                if let Some(object) = schema.as_object_mut() {
                    object.entry("x-guidance").or_insert_with(compact);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::Regex(pattern) => TopLevelGrammar::from_regex(pattern),
            Constraint::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
        })
    }
}

/// The model's vocabulary as `llguidance` reads it: a trie of every token's bytes, with one
/// extra token that ends the text.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false)
                .map(|encoding| encoding.get_ids().to_vec())
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}

/// Where [`Grammars`] gets the model's tokenizer, the first time it needs it.
type TokenizerSource = Box<dyn Fn() -> Result<Tokenizer> + Send + Sync>;

/// Compiles constraints for one model. The vocabulary's trie is built the first time a
/// constraint is compiled (tens of milliseconds for a vocabulary of 50 000 tokens), then
/// shared by every compilation.
pub struct Grammars {
    /// The model's logits width (the id of the end token of [`Vocabulary`]).
    vocab_size: usize,
    source: TokenizerSource,
    factory: OnceLock<std::result::Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab_size", &self.vocab_size)
            .field("built", &self.factory.get().is_some())
            .finish()
    }
}

impl Grammars {
    /// Grammars over the vocabulary of the tokenizer `source` gives (asked once, when the
    /// first constraint is compiled), for logits `vocab_size` wide.
    pub fn new(
        vocab_size: usize,
        source: impl Fn() -> Result<Tokenizer> + Send + Sync + 'static,
    ) -> Self {
        Grammars {
            vocab_size,
            source: Box::new(source),
            factory: OnceLock::new(),
        }
    }

    /// Grammars over the vocabulary of the tokenizer beside the weights at `location` (read
    /// the first time a constraint is compiled), for logits `vocab_size` wide.
    pub fn of_model(location: &WeightsLocation, vocab_size: usize) -> Self {
        let location = location.clone();
        Grammars::new(vocab_size, move || {
            TextSide::load_from(&location)?
                .map(|text| text.tokenizer)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "constraints need the model's tokenizer, and {} has none",
                        location.path().display()
                    ))
                })
        })
    }

    /// Grammars over `tokenizer`'s vocabulary, for logits `vocab_size` wide.
    pub fn from_tokenizer(tokenizer: Tokenizer, vocab_size: usize) -> Self {
        Grammars::new(vocab_size, move || Ok(tokenizer.clone()))
    }

    /// The parser factory, built on first use.
    fn factory(&self) -> Result<&Arc<ParserFactory>> {
        self.factory
            .get_or_init(|| self.build().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::InvalidInput(format!("structured outputs are unavailable: {e}")))
    }

    fn build(&self) -> Result<Arc<ParserFactory>> {
        let tokenizer = (self.source)()?;
        let mut words = token_bytes(&tokenizer, self.vocab_size)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        // The end token: special, so that no text produces it.
        words.push([&[SPECIAL_TOKEN_MARKER], &b"<|end of constrained text|>"[..]].concat());
        let info = TokRxInfo::new(words.len() as u32, self.vocab_size as u32);
        let trie = TokTrie::from(&info, &words);
        let vocabulary: toktrie::TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&vocabulary)
            .map_err(|e| Error::Tokenizer(format!("cannot prepare the vocabulary: {e}")))?;
        factory.quiet();
        Ok(Arc::new(factory))
    }

    /// Compiles `constraint` into the state of one sequence at its start; an error names the
    /// option and gives `llguidance`'s reason.
    pub fn compile(&self, constraint: &Constraint) -> Result<ConstraintState> {
        let grammar = constraint.grammar()?;
        let parser = self.factory()?.create_parser(grammar).map_err(|e| {
            Error::InvalidInput(format!("{} does not compile: {e}", constraint.name()))
        })?;
        Ok(ConstraintState {
            matcher: Matcher::new(Ok(parser)),
            end: self.vocab_size as u32,
            mask: None,
        })
    }

    /// Refuses a constraint that does not compile, naming the option and the reason.
    pub fn check(&self, constraint: &Constraint) -> Result<()> {
        self.compile(constraint).map(drop)
    }
}

/// Where one sequence is in its constraint's grammar.
#[derive(Clone)]
pub struct ConstraintState {
    matcher: Matcher,
    /// The id of the token that ends the text.
    end: u32,
    /// The tokens allowed at this step, once computed.
    mask: Option<SimpleVob>,
}

impl ConstraintState {
    /// Bans in `scores` (one row of logits) every token the grammar does not allow next; the
    /// end-of-sequence ids `eos` keep their scores only where the grammar may end (and are all
    /// that is left once it must).
    pub fn restrict(&mut self, scores: &mut [f32], eos: &[u32]) -> Result<()> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| Error::InvalidInput(format!("the constraint failed: {e}")))?;
        self.mask = Some(mask);
        self.enforce(scores, eos);
        Ok(())
    }

    /// Bans again, after the other processors, what [`ConstraintState::restrict`] banned (a
    /// forced token may have lifted a ban).
    pub fn enforce(&self, scores: &mut [f32], eos: &[u32]) {
        let Some(mask) = &self.mask else {
            return;
        };
        let may_end = mask.is_allowed(self.end);
        let kept: Vec<(usize, f32)> = eos
            .iter()
            .map(|&id| id as usize)
            .filter(|&id| may_end && id < scores.len())
            .map(|id| (id, scores[id]))
            .collect();
        let width = scores.len();
        mask.iter_unset_entries(|id| {
            if id < width {
                scores[id] = f32::NEG_INFINITY;
            }
        });
        for &id in eos {
            if let Some(score) = scores.get_mut(id as usize) {
                *score = f32::NEG_INFINITY;
            }
        }
        for (id, score) in kept {
            scores[id] = score;
        }
    }

    /// Advances past the chosen `token` (an end-of-sequence id ends the text instead).
    pub fn advance(&mut self, token: u32, eos: &[u32]) -> Result<()> {
        self.mask = None;
        if eos.contains(&token) {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| Error::InvalidInput(format!("the constraint failed: {e}")))
    }
}

/// Rank 0's constraint states of a generation's rows, each made from the compiled one on the
/// row's first step.
pub(crate) struct RowConstraints {
    compiled: std::result::Result<ConstraintState, String>,
    rows: Vec<Option<ConstraintState>>,
}

impl RowConstraints {
    /// The rows' states of `constraint`, compiled by `grammars` (a failure is reported at each
    /// row's first step, so that it reaches every rank the way a choice that fails does).
    pub(crate) fn new(constraint: &Constraint, grammars: &Grammars) -> Self {
        RowConstraints {
            compiled: grammars.compile(constraint).map_err(|e| e.to_string()),
            rows: Vec::new(),
        }
    }

    /// The state of `row`.
    pub(crate) fn row(&mut self, row: usize) -> Result<&mut ConstraintState> {
        let compiled = self
            .compiled
            .as_ref()
            .map_err(|e| Error::InvalidInput(e.clone()))?;
        if self.rows.len() <= row {
            self.rows.resize_with(row + 1, || None);
        }
        Ok(self.rows[row].get_or_insert_with(|| compiled.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn gpt2() -> Grammars {
        let tokenizer = crate::tokenizer::token_bytes::gpt2_fixture_tokenizer();
        Grammars::from_tokenizer(tokenizer, 300)
    }

    /// Text a constrained "model" of random scores writes: each step the best allowed token
    /// (or, with `sample`, a random allowed one), until it chooses the end-of-sequence id 186.
    fn write(grammars: &Grammars, constraint: &Constraint, seed: u64, sample: bool) -> String {
        let tokenizer = Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gpt2/tokenizer.json"
        ))
        .unwrap();
        let mut state = grammars.compile(constraint).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let eos = [186];
        let mut ids = Vec::new();
        for _ in 0..200 {
            let mut scores: Vec<f32> = (0..300).map(|_| rng.random::<f32>()).collect();
            state.restrict(&mut scores, &eos).unwrap();
            let allowed: Vec<usize> = (0..300).filter(|&i| scores[i].is_finite()).collect();
            let token = match sample {
                true => allowed[rng.random_range(0..allowed.len())],
                false => (0..300)
                    .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                    .unwrap(),
            } as u32;
            state.advance(token, &eos).unwrap();
            if token == 186 {
                return tokenizer.decode(&ids, false).unwrap();
            }
            ids.push(token);
        }
        panic!(
            "no end after 200 tokens: {:?}",
            tokenizer.decode(&ids, false)
        );
    }

    #[test]
    fn random_scores_under_a_schema_always_write_valid_json() {
        let grammars = gpt2();
        let schema = json!({
            "type": "object",
            "properties": {
                "kind": {"enum": ["cat", "dog"]},
                "age": {"type": "integer", "minimum": 0, "maximum": 20},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                         "minItems": 1, "maxItems": 2},
            },
            "required": ["kind", "age", "tags"],
            "additionalProperties": false,
        });
        let constraint = Constraint::JsonSchema(schema.to_string());
        for seed in 0..8 {
            for sample in [false, true] {
                let text = write(&grammars, &constraint, seed, sample);
                let value: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
                assert!(
                    ["cat", "dog"].contains(&value["kind"].as_str().unwrap()),
                    "{text}"
                );
                let age = value["age"].as_i64().unwrap();
                assert!((0..=20).contains(&age), "{text}");
                let tags = value["tags"].as_array().unwrap();
                assert!((1..=2).contains(&tags.len()), "{text}");
                assert!(tags
                    .iter()
                    .all(|t| t.as_str().unwrap().chars().count() <= 3));
                assert_eq!(value.as_object().unwrap().len(), 3, "{text}");
            }
        }
    }

    #[test]
    fn regexes_and_lark_grammars_match_whole_texts() {
        let grammars = gpt2();
        let regex = Constraint::Regex("[a-c]{2,4}-[0-9]{1,3}".into());
        let lark =
            Constraint::Lark("start: \"yes\" | \"no\" | \"maybe \" NUM\nNUM: /[0-9]{1,2}/".into());
        for seed in 0..6 {
            let text = write(&grammars, &regex, seed, seed % 2 == 1);
            let (letters, digits) = text.split_once('-').unwrap();
            assert!(
                (2..=4).contains(&letters.len()) && letters.chars().all(|c| "abc".contains(c)),
                "{text}"
            );
            assert!(
                (1..=3).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit()),
                "{text}"
            );
            let text = write(&grammars, &lark, seed, seed % 2 == 0);
            let number = text.strip_prefix("maybe ");
            assert!(
                text == "yes"
                    || text == "no"
                    || number.is_some_and(
                        |n| (1..=2).contains(&n.len()) && n.chars().all(|c| c.is_ascii_digit())
                    ),
                "{text}"
            );
        }
    }

    #[test]
    fn the_end_of_sequence_id_is_banned_until_the_grammar_may_end_and_forced_once_it_must() {
        let grammars = gpt2();
        let mut state = grammars.compile(&Constraint::Regex("ab".into())).unwrap();
        let tokenizer = Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gpt2/tokenizer.json"
        ))
        .unwrap();
        let ids = tokenizer.encode("ab", false).unwrap().get_ids().to_vec();
        let mut scores = vec![1.0; 300];
        state.restrict(&mut scores, &[186]).unwrap();
        assert_eq!(scores[186], f32::NEG_INFINITY);
        for &id in &ids {
            let mut scores = vec![1.0; 300];
            state.restrict(&mut scores, &[186]).unwrap();
            assert!(scores[id as usize].is_finite());
            state.advance(id, &[186]).unwrap();
        }
        let mut scores = vec![1.0; 300];
        state.restrict(&mut scores, &[186]).unwrap();
        let left: Vec<usize> = (0..300).filter(|&i| scores[i].is_finite()).collect();
        assert_eq!(left, [186]);
        // A forced token cannot escape the grammar.
        scores[5] = 0.0;
        state.enforce(&mut scores, &[186]);
        assert_eq!(scores[5], f32::NEG_INFINITY);
    }

    #[test]
    fn bad_schemas_and_grammars_are_refused_with_llguidances_reason() {
        let grammars = gpt2();
        let refusal = |c: Constraint| grammars.check(&c).unwrap_err().to_string();
        let not_json = refusal(Constraint::JsonSchema("{\"type\": ".into()));
        assert!(
            not_json.contains("json_schema is not valid JSON"),
            "{not_json}"
        );
        let bad_type = refusal(Constraint::JsonSchema(r#"{"type": "integr"}"#.into()));
        assert!(
            bad_type.contains("json_schema does not compile"),
            "{bad_type}"
        );
        let lark = refusal(Constraint::Lark("start: foo".into()));
        assert!(lark.contains("grammar does not compile"), "{lark}");
        assert!(lark.contains("foo"), "{lark}");
        let regex = refusal(Constraint::Regex("a(b".into()));
        assert!(regex.contains("regex does not compile"), "{regex}");
        assert!(grammars.check(&Constraint::JsonObject).is_ok());
    }
}
