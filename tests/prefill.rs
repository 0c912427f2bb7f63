//! Chunked prefill and the prefix cache across rank processes: sessions whose long prompts are
//! prefilled in chunks beside a running sequence, and whose prompts start with blocks kept from
//! earlier sequences, decode exactly what a model without either decodes; single-prompt
//! generation (what `chat` runs each turn) reuses the conversation so far; a small budget
//! evicts the least recently used blocks.

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;

use common::{fixture, options};
use parallelformers::api::{SequenceEnd, SessionDriver, SessionSequence};
use parallelformers::generation::prefix_cache::{PrefixCacheReport, BLOCK_TOKENS};
use parallelformers::parallel::Plan;
use parallelformers::{
    parallelize, GenerationConfig, Options, ParallelModel, PrefillChunk, PrefillOptions,
};

/// Options of `ranks` ranks with chunks of `chunk_tokens` and a prefix cache of `cache_bytes`.
fn prefill_options(ranks: usize, chunk_tokens: usize, cache_bytes: u64) -> Options {
    Options {
        prefill: PrefillOptions {
            chunk: PrefillChunk::Tokens(chunk_tokens),
            prefix_cache_bytes: cache_bytes,
        },
        ..options(ranks)
    }
}

fn greedy(new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: new_tokens,
        eos_token_id: Some(vec![]),
        ..GenerationConfig::default()
    }
}

/// `len` token ids below `vocab`, starting from `salt`.
fn prompt(len: usize, salt: u32, vocab: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 31 + salt) % vocab).collect()
}

/// A driver that runs an anchor sequence (id 0) throughout and lets the others join one at a
/// time, each once the one before has ended; it finishes the anchor when they all have.
struct OneByOne {
    waiting: Vec<SessionSequence>,
    running: Option<u32>,
    anchor_started: bool,
    anchor: SessionSequence,
    tokens: HashMap<u32, Vec<u32>>,
    ends: HashMap<u32, SequenceEnd>,
    reports: Vec<PrefixCacheReport>,
}

impl OneByOne {
    fn new(anchor: SessionSequence, mut others: Vec<SessionSequence>) -> Self {
        others.reverse();
        OneByOne {
            waiting: others,
            running: None,
            anchor_started: false,
            anchor,
            tokens: HashMap::new(),
            ends: HashMap::new(),
            reports: Vec::new(),
        }
    }
}

impl SessionDriver for OneByOne {
    fn join(&mut self) -> Vec<SessionSequence> {
        if !self.anchor_started {
            self.anchor_started = true;
            return vec![self.anchor.clone()];
        }
        // Joins beside the anchor once it streams.
        if self.running.is_some() || !self.tokens.contains_key(&0) {
            return Vec::new();
        }
        let next = self.waiting.pop();
        self.running = next.as_ref().map(|s| s.id);
        next.into_iter().collect()
    }

    fn token(&mut self, id: u32, token: u32) -> ControlFlow<()> {
        self.tokens.entry(id).or_default().push(token);
        let done = self.waiting.is_empty() && self.running.is_none();
        match id == 0 && done {
            true => ControlFlow::Break(()),
            false => ControlFlow::Continue(()),
        }
    }

    fn ended(&mut self, id: u32, end: parallelformers::Result<SequenceEnd>) {
        self.ends.insert(id, end.unwrap());
        if self.running == Some(id) {
            self.running = None;
        }
    }

    fn prefix_cache(&mut self, report: &PrefixCacheReport) {
        self.reports.push(*report);
    }
}

fn sequence(id: u32, prompt: Vec<u32>, config: &GenerationConfig) -> SessionSequence {
    SessionSequence {
        id,
        prompt,
        config: config.clone(),
    }
}

#[test]
fn chunked_and_cached_sessions_decode_what_a_model_without_either_decodes() {
    // GPT-2 has learned positions, Mistral a sliding window of 4, BLOOM ALiBi.
    for family in ["llama", "gpt2", "mistral", "bloom"] {
        let mut reference =
            parallelize(fixture(family), prefill_options(2, usize::MAX, 0)).unwrap();
        let vocab = reference.config().vocab_size as u32;
        let config = greedy(6);
        let first = prompt(40, 3, vocab);
        let shared = [&first[..36], &prompt(3, 11, vocab)].concat();
        let long = prompt(50, 7, vocab);
        let prompts = [first, shared, long];
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| reference.generate(p, &config).unwrap().ids)
            .collect();
        let anchor_config = greedy(reference.config().max_positions - 4);
        let anchor_alone = reference.generate(&[1, 2, 3], &anchor_config).unwrap().ids;
        reference.deparallelize();

        let mut model = parallelize(fixture(family), prefill_options(2, 8, 1 << 20)).unwrap();
        let others = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| sequence(i as u32 + 1, p.clone(), &config))
            .collect();
        let mut driver = OneByOne::new(sequence(0, vec![1, 2, 3], &anchor_config), others);
        let stats = model.generate_session(&mut driver).unwrap();
        for (i, want) in want.iter().enumerate() {
            let id = i as u32 + 1;
            assert_eq!(driver.tokens[&id], *want, "{family}, sequence {id}");
            assert_eq!(driver.ends[&id], SequenceEnd::Length);
        }
        let anchored = &driver.tokens[&0];
        assert_eq!(anchored[..], anchor_alone[..anchored.len()], "{family}");
        // The second prompt starts with the first's two whole blocks.
        assert_eq!(stats.cached_prompt_tokens, 2 * BLOCK_TOKENS, "{family}");
        let hits: u64 = driver.reports.iter().map(|r| r.hit_tokens).sum();
        assert_eq!(hits, 2 * BLOCK_TOKENS as u64, "{family}");
        // 40, 7 and 50 prompt tokens take 5, 1 and 7 chunks of 8.
        assert_eq!(stats.prefill_chunks, 1 + 5 + 1 + 7, "{family}");
        model.deparallelize();
    }
}

#[test]
fn each_turn_of_a_conversation_starts_from_the_turns_before() {
    let mut model = parallelize(fixture("llama"), prefill_options(2, 512, 1 << 20)).unwrap();
    let mut uncached = parallelize(fixture("llama"), prefill_options(2, 512, 0)).unwrap();
    let config = greedy(6);
    let first = prompt(40, 5, 103);
    let reply = model.generate(&first, &config).unwrap();
    assert_eq!(reply.cached_prompt_tokens, 0);
    assert_eq!(reply.ids, uncached.generate(&first, &config).unwrap().ids);
    // The next turn: the history, the reply, a new message. The ranks kept the prompt and the
    // fed reply tokens, 45 positions: two whole blocks.
    let next = [&first[..], &reply.ids, &prompt(9, 2, 103)].concat();
    let answer = model.generate(&next, &config).unwrap();
    assert_eq!(answer.cached_prompt_tokens, 2 * BLOCK_TOKENS);
    let recomputed = uncached.generate(&next, &config).unwrap();
    assert_eq!(recomputed.cached_prompt_tokens, 0, "no prefix cache");
    assert_eq!(answer.ids, recomputed.ids);
    model.deparallelize();
    uncached.deparallelize();
}

#[test]
fn a_small_prefix_cache_evicts_the_least_recently_used_blocks() {
    let config = parallelformers::checkpoint::source::ResolvedModel::resolve(
        &fixture("llama").as_path().into(),
    )
    .unwrap()
    .config;
    let block_bytes = BLOCK_TOKENS as u64
        * Plan::new(&config, 2)
            .unwrap()
            .kv_bytes_per_position(&config);
    // Room for two blocks.
    let mut model: ParallelModel =
        parallelize(fixture("llama"), prefill_options(2, 512, 2 * block_bytes)).unwrap();
    let once = greedy(1);
    let (a, b) = (prompt(48, 1, 103), prompt(48, 2, 103));
    let cached = |model: &mut ParallelModel, p: &[u32]| {
        model.generate(p, &once).unwrap().cached_prompt_tokens
    };
    assert_eq!(cached(&mut model, &a), 0);
    assert_eq!(cached(&mut model, &b), 0, "a's blocks are not b's");
    assert_eq!(
        cached(&mut model, &b),
        2 * BLOCK_TOKENS,
        "b's two blocks fit"
    );
    assert_eq!(cached(&mut model, &a), 0, "b evicted a");
    model.deparallelize();
}

/// An encoder–decoder's caches hold decoder positions, not the prompt's: it generates for one
/// prompt without the prefix cache, whatever its budget.
#[test]
fn an_encoder_decoder_generates_for_one_prompt_as_without_a_prefix_cache() {
    for family in ["bart", "t5"] {
        let mut cached = parallelize(fixture(family), prefill_options(2, 512, 1 << 20)).unwrap();
        let mut uncached = parallelize(fixture(family), prefill_options(2, 512, 0)).unwrap();
        let vocab = cached.config().vocab_size as u32;
        let ids = prompt(40, 9, vocab);
        let config = greedy(5);
        let want = uncached.generate(&ids, &config).unwrap().ids;
        for _ in 0..2 {
            let generated = cached.generate(&ids, &config).unwrap();
            assert_eq!(generated.ids, want, "{family}");
            assert_eq!(generated.cached_prompt_tokens, 0, "{family}");
        }
        cached.deparallelize();
        uncached.deparallelize();
    }
}

/// A driver that hands over one sequence and asks for it to be finished at the next tick,
/// while its long prompt is still being prefilled.
struct CancelAtOnce {
    sequence: Option<SessionSequence>,
    handed: bool,
    tokens: usize,
    end: Option<SequenceEnd>,
}

impl SessionDriver for CancelAtOnce {
    fn join(&mut self) -> Vec<SessionSequence> {
        self.handed |= self.sequence.is_some();
        self.sequence.take().into_iter().collect()
    }

    fn token(&mut self, _: u32, _: u32) -> ControlFlow<()> {
        self.tokens += 1;
        ControlFlow::Continue(())
    }

    fn ended(&mut self, _: u32, end: parallelformers::Result<SequenceEnd>) {
        self.end = Some(end.unwrap());
    }

    fn finished(&mut self) -> Vec<u32> {
        match self.handed && self.end.is_none() {
            true => vec![7],
            false => Vec::new(),
        }
    }
}

/// A sequence finished through [`SessionDriver::finished`] while its prompt is prefilled, 16
/// tokens at a time (2000 tokens of the default model take seconds), ends at once, unprefilled.
#[test]
fn a_driver_finishes_a_sequence_whose_long_prompt_is_being_prefilled() {
    let mut model = parallelize(
        parallelformers::ModelSource::Default,
        prefill_options(2, 16, 0),
    )
    .unwrap();
    let vocab = model.config().vocab_size as u32;
    let mut driver = CancelAtOnce {
        sequence: Some(sequence(7, prompt(2000, 1, vocab), &greedy(4))),
        handed: false,
        tokens: 0,
        end: None,
    };
    let stats = model.generate_session(&mut driver).unwrap();
    assert_eq!(driver.end, Some(SequenceEnd::Stopped));
    assert_eq!(driver.tokens, 0);
    assert!(
        stats.prefill_chunks < 2000 / 16,
        "{} passes",
        stats.prefill_chunks
    );
    model.deparallelize();
}
