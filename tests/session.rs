//! Continuous batching (`ParallelModel::generate_session`) against transformers' `generate`
//! (tests/fixtures/generation/): sequences with different prompts and options join a running
//! batch at different steps and leave it when they end, and each must still produce exactly
//! transformers' tokens, at several rank counts. Also: a seeded sampled sequence draws what it
//! draws alone, and cancelled, refused and stopped sequences end on their own while the others
//! go on.

mod common;

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;

use common::{fixture, options};
use parallelformers::api::{SequenceEnd, SessionDriver, SessionSequence};
use parallelformers::{parallelize, GenerationConfig, ParallelModel, TokenLogprobs};
use serde_json::Value;

/// A driver that lets one more sequence join every `every` streamed tokens (or at once when
/// nothing runs), and records what each sequence streamed and how it ended.
struct Staggered {
    waiting: VecDeque<SessionSequence>,
    every: usize,
    received: usize,
    next_join_at: usize,
    running: usize,
    /// Finish a sequence after this many tokens.
    cancel_after: HashMap<u32, usize>,
    /// A sequence to finish once it is the only one left and no other waits.
    anchor: Option<u32>,
    tokens: HashMap<u32, Vec<u32>>,
    logprobs: HashMap<u32, Vec<TokenLogprobs>>,
    ends: HashMap<u32, Result<SequenceEnd, String>>,
    /// How many sequences were running when each joined.
    joined_beside: Vec<usize>,
}

impl Staggered {
    fn new(sequences: Vec<SessionSequence>, every: usize) -> Self {
        Staggered {
            waiting: sequences.into(),
            every,
            received: 0,
            next_join_at: 0,
            running: 0,
            cancel_after: HashMap::new(),
            anchor: None,
            tokens: HashMap::new(),
            logprobs: HashMap::new(),
            ends: HashMap::new(),
            joined_beside: Vec::new(),
        }
    }
}

impl SessionDriver for Staggered {
    fn join(&mut self) -> Vec<SessionSequence> {
        if self.running > 0 && self.received < self.next_join_at {
            return Vec::new();
        }
        let Some(sequence) = self.waiting.pop_front() else {
            return Vec::new();
        };
        self.joined_beside.push(self.running);
        self.running += 1;
        self.next_join_at = self.received + self.every;
        vec![sequence]
    }

    fn token(&mut self, id: u32, token: u32) -> ControlFlow<()> {
        self.received += 1;
        let tokens = self.tokens.entry(id).or_default();
        tokens.push(token);
        let alone = self.anchor == Some(id) && self.waiting.is_empty() && self.running == 1;
        match self.cancel_after.get(&id) {
            Some(&n) if tokens.len() >= n => ControlFlow::Break(()),
            _ if alone => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    }

    fn logprobs(&mut self, id: u32, logprobs: &TokenLogprobs) {
        self.logprobs.entry(id).or_default().push(logprobs.clone());
    }

    fn ended(&mut self, id: u32, end: parallelformers::Result<SequenceEnd>) {
        self.running -= 1;
        self.ends.insert(id, end.map_err(|e| e.to_string()));
    }
}

fn recorded(name: &str) -> Value {
    let path = fixture("generation").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn case_config(case: &Value) -> GenerationConfig {
    let mut options = case["options"].as_object().unwrap().clone();
    options.entry("max_new_tokens").or_insert(10.into());
    GenerationConfig::from_json(&Value::Object(options).to_string()).unwrap()
}

/// Every prompt of every case without beams, with its options and transformers' tokens.
fn greedy_cases(family: &str) -> Vec<(Vec<u32>, GenerationConfig, Vec<u32>)> {
    let reference = recorded(family);
    let mut cases = Vec::new();
    for case in reference["cases"].as_object().unwrap().values() {
        if case["options"].get("num_beams").is_some() {
            continue;
        }
        let prompts: Vec<Vec<u32>> = serde_json::from_value(case["prompts"].clone()).unwrap();
        let sequences: Vec<Vec<u32>> = serde_json::from_value(case["sequences"].clone()).unwrap();
        for (prompt, sequence) in prompts.into_iter().zip(sequences) {
            cases.push((prompt, case_config(case), sequence));
        }
    }
    cases
}

fn sequence(id: u32, prompt: &[u32], config: &GenerationConfig) -> SessionSequence {
    SessionSequence {
        id,
        prompt: prompt.to_vec(),
        config: config.clone(),
    }
}

#[test]
fn sequences_joining_and_leaving_a_running_batch_match_transformers() {
    let mut shared_runs = 0;
    // Gemma 2 (soft-capping, alternating windows), OLMo 2 (a q/k norm whose statistics are
    // all-reduced) and Cohere (a parallel block with per-head q/k norms) stand for today's
    // families. (Phi-3's longrope picks its factors by the longest position of each call, so a
    // short prompt prefilled alone is rotated otherwise than in transformers' padded batch.)
    for family in [
        "llama", "gpt2", "mistral", "qwen2", "gemma2", "olmo2", "cohere",
    ] {
        let cases = greedy_cases(family);
        for ranks in 1..=3 {
            let mut model = parallelize(fixture(family), options(ranks)).unwrap();
            // A long greedy sequence runs first, so that the others join a running batch, and
            // runs until they have all ended (the ranks of these tiny models decode faster than
            // the main process offers sequences, so a fixed length could end first).
            let long = GenerationConfig {
                max_new_tokens: model.config().max_positions - 4,
                eos_token_id: Some(vec![]),
                ..GenerationConfig::default()
            };
            let anchor = model.generate(&[1, 2, 3], &long).unwrap().ids;
            let anchor_id = cases.len() as u32;
            let sequences = std::iter::once(sequence(anchor_id, &[1, 2, 3], &long))
                .chain(
                    cases
                        .iter()
                        .enumerate()
                        .map(|(id, (prompt, config, _))| sequence(id as u32, prompt, config)),
                )
                .collect();
            let mut driver = Staggered::new(sequences, 3);
            driver.anchor = Some(anchor_id);
            let stats = model.generate_session(&mut driver).unwrap();
            assert_eq!(stats.sequences, cases.len() + 1);
            let anchored = &driver.tokens[&anchor_id];
            assert_eq!(
                anchored[..],
                anchor[..anchored.len()],
                "{family}, {ranks} ranks"
            );
            for (id, (_, _, want)) in cases.iter().enumerate() {
                let id = id as u32;
                assert_eq!(
                    driver.tokens[&id], *want,
                    "{family}, {ranks} ranks, sequence {id}"
                );
                assert!(driver.ends[&id].is_ok(), "{:?}", driver.ends[&id]);
            }
            // Whether the sequences shared the batch depends on scheduling: the ranks of these
            // tiny models decode a step in about 0.1 ms, and a main process that gets no CPU for
            // a few milliseconds (ranks outnumbering cores) receives a burst of tokens, ends
            // included, before its driver is asked again. So sharing is required of the runs
            // together, and where it happened the session took fewer steps than tokens.
            let beside = driver.joined_beside.iter().filter(|&&n| n > 0).count();
            if beside > 0 {
                shared_runs += 1;
                let tokens = anchored.len() + cases.iter().map(|c| c.2.len()).sum::<usize>();
                assert!(
                    stats.steps < tokens,
                    "{family}, {ranks} ranks: {} steps for {tokens} tokens",
                    stats.steps
                );
            }
            eprintln!(
                "{family}, {ranks} ranks: joined beside {:?}",
                driver.joined_beside
            );
            model.deparallelize();
        }
    }
    assert!(shared_runs >= 1, "no sequence ever joined a running batch");
}

fn sampling(seed: u64) -> GenerationConfig {
    GenerationConfig {
        do_sample: true,
        temperature: 1.5,
        top_k: 40,
        top_p: 0.95,
        max_new_tokens: 12,
        repetition_penalty: 1.2,
        eos_token_id: Some(vec![]),
        seed: Some(seed),
        ..GenerationConfig::default()
    }
}

fn run(model: &mut ParallelModel, driver: &mut Staggered) {
    model.generate_session(driver).unwrap();
}

#[test]
fn a_seeded_sampled_sequence_draws_in_a_batch_what_it_draws_alone() {
    let mut model = parallelize(fixture("llama"), options(2)).unwrap();
    let greedy = GenerationConfig {
        max_new_tokens: 15,
        eos_token_id: Some(vec![]),
        ..GenerationConfig::default()
    };
    let alone = model.generate(&[5, 17, 42], &sampling(7)).unwrap().ids;
    let other = model.generate(&[9, 8], &sampling(8)).unwrap().ids;
    let mut driver = Staggered::new(
        vec![
            sequence(0, &[1, 2, 3, 4, 5, 6, 7], &greedy),
            sequence(1, &[5, 17, 42], &sampling(7)),
            sequence(2, &[9, 8], &sampling(8)),
        ],
        2,
    );
    run(&mut model, &mut driver);
    assert_eq!(driver.tokens[&1], alone);
    assert_eq!(driver.tokens[&2], other);
    assert_ne!(alone, other);
    model.deparallelize();
}

#[test]
fn cancelled_refused_and_stopped_sequences_end_alone_and_the_rest_go_on() {
    let mut model = parallelize(fixture("gpt2"), options(2)).unwrap();
    let config = GenerationConfig {
        max_new_tokens: 10,
        eos_token_id: Some(vec![]),
        ..GenerationConfig::default()
    };
    let full = model.generate(&[10, 20, 30], &config).unwrap().ids;
    let other = model.generate(&[7, 7, 8, 9], &config).unwrap().ids;
    let tokenizer =
        tokenizers::Tokenizer::from_file(fixture("gpt2").join("tokenizer.json")).unwrap();
    let stop = tokenizer.decode(&full[3..5], false).unwrap();
    let stopping = GenerationConfig {
        stop: vec![stop.clone()],
        ..config.clone()
    };
    let refused = GenerationConfig {
        do_sample: true,
        temperature: 0.0,
        ..config.clone()
    };
    let beams = GenerationConfig {
        num_beams: 2,
        ..config.clone()
    };
    let nothing = GenerationConfig {
        max_new_tokens: 0,
        ..config.clone()
    };
    let mut driver = Staggered::new(
        vec![
            sequence(0, &[7, 7, 8, 9], &config),
            sequence(1, &[10, 20, 30], &config),
            sequence(2, &[10, 20, 30], &refused),
            sequence(3, &[10, 20, 30], &stopping),
            sequence(4, &[10, 20, 30], &beams),
            sequence(5, &[10, 20, 30], &nothing),
            sequence(6, &[], &config),
            sequence(7, &[10, 20, 999_999], &config),
        ],
        1,
    );
    driver.cancel_after.insert(1, 3);
    run(&mut model, &mut driver);
    assert_eq!(driver.tokens[&0], other);
    assert_eq!(driver.ends[&0], Ok(SequenceEnd::Length));
    assert_eq!(driver.tokens[&1], full[..3]);
    assert_eq!(driver.ends[&1], Ok(SequenceEnd::Stopped));
    let error = |id: u32| driver.ends[&id].clone().unwrap_err();
    assert!(error(2).contains("temperature"), "{}", error(2));
    let stopped_at = (1..=full.len())
        .find(|&n| tokenizer.decode(&full[..n], false).unwrap().contains(&stop))
        .unwrap();
    assert_eq!(driver.tokens[&3], full[..stopped_at], "stop {stop:?}");
    assert_eq!(driver.ends[&3], Ok(SequenceEnd::Stopped));
    assert!(error(4).contains("num_beams"), "{}", error(4));
    assert_eq!(driver.ends[&5], Ok(SequenceEnd::Length));
    assert!(!driver.tokens.contains_key(&5));
    assert!(error(6).contains("empty"), "{}", error(6));
    assert!(error(7).contains("999999"), "{}", error(7));
    // The model answers normally afterwards.
    assert_eq!(model.generate(&[10, 20, 30], &config).unwrap().ids, full);
    model.deparallelize();
}

/// Log-probabilities stream with each token of the sequences that ask for them, from a running
/// batch that sequences join at different steps: scores.json's Llama cases without beams
/// (greedy, a repetition penalty, a batch's prompts, sampling whose draw is certain) report
/// transformers' numbers within 1e-4; a sequence that does not ask streams none.
#[test]
fn log_probabilities_stream_per_sequence_from_a_running_batch_like_transformers() {
    let reference = recorded("scores");
    let mut sequences = Vec::new();
    let mut expected = Vec::new();
    for (name, case) in reference["families"]["llama"]["cases"].as_object().unwrap() {
        if case["options"].get("num_beams").is_some() {
            continue;
        }
        let config = GenerationConfig {
            logprobs: true,
            top_logprobs: case["top_logprobs"].as_u64().unwrap() as usize,
            seed: Some(5),
            ..case_config(case)
        };
        let prompts: Vec<Vec<u32>> = serde_json::from_value(case["prompts"].clone()).unwrap();
        for (row, prompt) in prompts.iter().enumerate() {
            sequences.push(sequence(sequences.len() as u32, prompt, &config));
            let want = (&case["sequences"][row], &case["logprobs"][row]);
            expected.push((format!("{name}, row {row}"), want));
        }
    }
    let silent = sequences.len() as u32;
    sequences.push(sequence(silent, &[5, 17, 42], &GenerationConfig::default()));
    let mut model = parallelize(fixture("llama"), options(2)).unwrap();
    let mut driver = Staggered::new(sequences, 3);
    model.generate_session(&mut driver).unwrap();
    model.deparallelize();
    for (id, (what, (tokens, logprobs))) in expected.iter().enumerate() {
        let id = id as u32;
        assert_eq!(&serde_json::json!(driver.tokens[&id]), *tokens, "{what}");
        let difference = common::logprob_difference(&driver.logprobs[&id], logprobs, what);
        assert!(difference < 1e-4, "{what}: {difference}");
    }
    assert!(driver.tokens.contains_key(&silent));
    assert!(!driver.logprobs.contains_key(&silent), "asked for none");
}
