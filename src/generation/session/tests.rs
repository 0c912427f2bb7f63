//! Sessions run in this process on one rank of the tiny Llama fixture, driven by a scripted
//! link that hands over its control messages at chosen points of the stream, so that what
//! happens between two steps is exactly reproducible.

use std::path::Path;

use super::*;
use crate::checkpoint::source::{ModelSource, ResolvedModel};
use crate::comm::SingleRank;
use crate::options::WeightDType;
use crate::parallel::engine::ShardLoader;
use crate::parallel::Plan;
use crate::policy::Policy;

/// The tiny Llama fixture on one rank.
fn tiny_model() -> Box<dyn ShardedModel> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let resolved = ResolvedModel::resolve(&ModelSource::Path(dir)).unwrap();
    let weights = resolved.location.open(&resolved.config).unwrap();
    let plan = Plan::new(&resolved.config, 1).unwrap();
    let policy = Policy::for_config(&resolved.config);
    let mut loader = ShardLoader::new(weights.as_ref(), &policy, &plan, 0, WeightDType::F32);
    crate::models::load(&mut loader, &resolved.config).unwrap()
}

/// What the link heard, in order.
#[derive(Debug, Clone, PartialEq)]
enum Heard {
    Token(u32, u32),
    Ended(u32, EndReason),
}

/// A link whose control messages come from `script`, which sees everything heard so far and
/// whether the batch is idle (it must then answer something).
struct Scripted<F> {
    script: F,
    heard: Vec<Heard>,
    idle: bool,
    reports: Vec<PrefixCacheReport>,
}

impl<F: FnMut(&[Heard], bool) -> Vec<Control>> Scripted<F> {
    fn new(script: F) -> Self {
        Scripted {
            script,
            heard: Vec::new(),
            idle: false,
            reports: Vec::new(),
        }
    }

    fn tokens(&self, id: u32) -> Vec<u32> {
        tokens_of(&self.heard, id)
    }
}

fn tokens_of(heard: &[Heard], id: u32) -> Vec<u32> {
    heard
        .iter()
        .filter_map(|h| match h {
            Heard::Token(of, token) if *of == id => Some(*token),
            _ => None,
        })
        .collect()
}

fn ended(heard: &[Heard], id: u32) -> bool {
    heard
        .iter()
        .any(|h| matches!(h, Heard::Ended(of, _) if *of == id))
}

impl<F: FnMut(&[Heard], bool) -> Vec<Control>> SessionLink for Scripted<F> {
    fn token(&mut self, id: u32, token: u32) -> Result<()> {
        self.heard.push(Heard::Token(id, token));
        Ok(())
    }

    fn ended(&mut self, id: u32, reason: &EndReason) -> Result<()> {
        self.heard.push(Heard::Ended(id, reason.clone()));
        Ok(())
    }

    fn idle(&mut self) -> Result<()> {
        self.idle = true;
        Ok(())
    }

    fn prefix_cache(&mut self, report: &PrefixCacheReport) -> Result<()> {
        self.reports.push(*report);
        Ok(())
    }

    fn controls(&mut self, _wait: bool) -> Result<Vec<Control>> {
        let idle = std::mem::take(&mut self.idle);
        let controls = (self.script)(&self.heard, idle);
        assert!(
            !idle || !controls.is_empty(),
            "an idle session needs an answer"
        );
        Ok(controls)
    }
}

fn greedy(id: u32, prompt: Vec<u32>, new_tokens: usize) -> SequenceRequest {
    SequenceRequest {
        id,
        prompt,
        config: GenerationConfig {
            max_new_tokens: new_tokens,
            eos_token_id: Some(Vec::new()),
            ..GenerationConfig::default()
        },
        eos_token_ids: Vec::new(),
        seed: 0,
    }
}

/// A 100-token prompt.
fn long_prompt() -> Vec<u32> {
    (0..100).map(|i| (i * 37 + 5) % 100).collect()
}

/// The anchor (id 0) runs from the start; the long prompt (id 1) joins once the anchor has
/// streamed two tokens, and is finished when `cancel_after` more anchor tokens have streamed
/// after it joined; the anchor is finished once the long one has ended.
fn interleaved_script(cancel_after: Option<usize>) -> impl FnMut(&[Heard], bool) -> Vec<Control> {
    let mut joined_at: Option<usize> = None;
    let mut cancelled = false;
    let mut anchor_finished = false;
    move |heard, idle| {
        if idle {
            return vec![Control::End];
        }
        let anchor = tokens_of(heard, 0).len();
        let Some(at) = joined_at else {
            if anchor < 2 {
                return Vec::new();
            }
            joined_at = Some(anchor);
            return vec![Control::Join(vec![greedy(1, long_prompt(), 5)])];
        };
        if !cancelled && cancel_after.is_some_and(|n| anchor >= at + n) {
            cancelled = true;
            return vec![Control::Finish(vec![1])];
        }
        if ended(heard, 1) && !anchor_finished {
            anchor_finished = true;
            return vec![Control::Finish(vec![0])];
        }
        Vec::new()
    }
}

/// Runs a session of the anchor with `script`, chunks of `chunk_tokens` (0: paced), and
/// `prefix`.
fn run_scripted<F: FnMut(&[Heard], bool) -> Vec<Control>>(
    model: &mut dyn ShardedModel,
    chunk_tokens: usize,
    prefix: &mut PrefixCache,
    script: F,
    initial: Vec<SequenceRequest>,
) -> (SessionSummary, Scripted<F>) {
    let mut link = Scripted::new(script);
    let summary = run(
        model,
        &SingleRank,
        initial,
        match chunk_tokens {
            0 => PrefillChunk::Paced,
            tokens => PrefillChunk::Tokens(tokens),
        },
        prefix,
        &Grammars::new(0, || Err(Error::InvalidInput("no tokenizer here".into()))),
        Some(&mut link),
    )
    .unwrap();
    (summary, link)
}

fn no_prefix_cache() -> PrefixCache {
    PrefixCache::new(0, 1)
}

/// An anchor sequence (60 tokens after a 3-token prompt) joined by the interleaved script's
/// 100-token prompt, prefilled in chunks of `chunk_tokens` (0: paced): the summary, and what
/// the main process heard.
fn anchor_and_long_prompt(
    model: &mut dyn ShardedModel,
    chunk_tokens: usize,
) -> (SessionSummary, Vec<Heard>) {
    let anchor = vec![greedy(0, vec![1, 2, 3], 60)];
    let script = interleaved_script(None);
    let (summary, link) = run_scripted(model, chunk_tokens, &mut no_prefix_cache(), script, anchor);
    (summary, link.heard)
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_between_decode_steps_and_decodes_as_if_prefilled_at_once() {
    let mut model = tiny_model();
    let (chunked, heard) = anchor_and_long_prompt(model.as_mut(), 8);
    // The anchor's prefill, then 100 tokens in 13 chunks of at most 8.
    assert_eq!(chunked.prefill_chunks, 1 + 13);
    let long_first = heard
        .iter()
        .position(|h| matches!(h, Heard::Token(1, _)))
        .unwrap();
    let anchor_before = tokens_of(&heard[..long_first], 0).len();
    // The join was handed over after the anchor's second token; every chunk shared its pass
    // with a decode step of the anchor.
    assert!(anchor_before >= 2 + 13, "{anchor_before} anchor tokens");
    assert_eq!(chunked.passes_beside_decode, 13);

    let (whole, whole_heard) = anchor_and_long_prompt(model.as_mut(), usize::MAX);
    assert_eq!(whole.prefill_chunks, 2, "one pass per joining prompt");
    assert_eq!(
        whole.passes_beside_decode, 1,
        "the long prompt's, beside the anchor"
    );
    assert_eq!(tokens_of(&heard, 1), tokens_of(&whole_heard, 1));
    assert_eq!(tokens_of(&heard, 1).len(), 5);
    let anchored = tokens_of(&heard, 0);
    let alone = tokens_of(&whole_heard, 0);
    let common = anchored.len().min(alone.len());
    assert_eq!(anchored[..common], alone[..common]);
}

#[test]
fn prompts_joining_at_different_steps_are_prefilled_in_one_pass_with_the_decode_step() {
    let mut model = tiny_model();
    // The long prompt joins after the anchor's second token, a 10-token prompt after its
    // fourth: while both are being prefilled, each step's 16 tokens go to the short one first.
    let mut joined = 0;
    let script = move |heard: &[Heard], idle: bool| {
        if idle {
            return vec![Control::End];
        }
        let anchor = tokens_of(heard, 0).len();
        let join = match (joined, anchor) {
            (0, 2..) => greedy(1, long_prompt(), 4),
            (1, 4..) => greedy(2, long_prompt()[50..60].to_vec(), 4),
            (2, _) if ended(heard, 1) && ended(heard, 2) => {
                joined = 3;
                return vec![Control::Finish(vec![0])];
            }
            _ => return Vec::new(),
        };
        joined += 1;
        vec![Control::Join(vec![join])]
    };
    let anchor = vec![greedy(0, vec![1, 2, 3], 60)];
    let (summary, link) = run_scripted(model.as_mut(), 16, &mut no_prefix_cache(), script, anchor);
    // Both prompts' chunks came in fewer passes than chunks, every pass beside the anchor.
    let chunks = summary.prefill_chunks - 1;
    assert!(
        summary.passes_beside_decode < chunks,
        "{} passes for {chunks} chunks",
        summary.passes_beside_decode
    );
    for (id, prompt) in [(1, long_prompt()), (2, long_prompt()[50..60].to_vec())] {
        let end_when_idle = |_: &[Heard], idle: bool| match idle {
            true => vec![Control::End],
            false => Vec::new(),
        };
        let (_, alone) = run_scripted(
            model.as_mut(),
            usize::MAX,
            &mut no_prefix_cache(),
            end_when_idle,
            vec![greedy(id, prompt, 4)],
        );
        assert_eq!(link.tokens(id), alone.tokens(id), "sequence {id}");
    }
}

#[test]
fn paced_chunks_interleave_with_decode_steps_and_decode_as_if_prefilled_at_once() {
    let mut model = tiny_model();
    let (paced, heard) = anchor_and_long_prompt(model.as_mut(), 0);
    // The first paced chunk beside a running sequence is at most 64 tokens, and later ones at
    // most double: the 100-token prompt takes at least two passes, and at most thirteen of at
    // least 8 tokens.
    let passes = paced.prefill_chunks - 1;
    assert!((2..=13).contains(&passes), "{passes} passes");
    let (whole, whole_heard) = anchor_and_long_prompt(model.as_mut(), usize::MAX);
    assert_eq!(whole.prefill_chunks, 2);
    assert_eq!(tokens_of(&heard, 1), tokens_of(&whole_heard, 1));
}

#[test]
fn a_sequence_finished_while_its_prompt_is_prefilled_ends_at_once_and_the_batch_goes_on() {
    let mut model = tiny_model();
    let (summary, link) = run_scripted(
        model.as_mut(),
        4,
        &mut no_prefix_cache(),
        interleaved_script(Some(5)),
        vec![greedy(0, vec![1, 2, 3], 60)],
    );
    assert!(link.tokens(1).is_empty(), "it never decoded");
    assert!(link.heard.contains(&Heard::Ended(1, EndReason::Finished)));
    // Cut well before its 25 chunks.
    assert!(
        summary.prefill_chunks < 1 + 25,
        "{}",
        summary.prefill_chunks
    );
    assert!(summary.sequences.contains(&(1, Vec::new())));
    // The anchor streamed past the cancellation and ended when finished.
    assert!(link.tokens(0).len() > 2 + 5);
    assert!(link.heard.contains(&Heard::Ended(0, EndReason::Finished)));

    // Finished in the same breath as it joins: it never starts.
    let mut sent = false;
    let script = move |heard: &[Heard], idle: bool| {
        if idle {
            return vec![Control::End];
        }
        if !sent && tokens_of(heard, 0).len() == 1 {
            sent = true;
            return vec![
                Control::Join(vec![greedy(1, long_prompt(), 5)]),
                Control::Finish(vec![1]),
            ];
        }
        Vec::new()
    };
    let (summary, link) = run_scripted(
        model.as_mut(),
        4,
        &mut no_prefix_cache(),
        script,
        vec![greedy(0, vec![1, 2, 3], 10)],
    );
    assert_eq!(summary.prefill_chunks, 1, "only the anchor was prefilled");
    assert!(link.heard.contains(&Heard::Ended(1, EndReason::Finished)));
    assert_eq!(link.tokens(0).len(), 10);
}

#[test]
fn a_prompt_sharing_blocks_with_an_earlier_sequence_is_seeded_and_decodes_the_same() {
    let mut model = tiny_model();
    let bytes_per_position = 2 * 2 * 4 * 8 * 4;
    let mut prefix = PrefixCache::new(1 << 20, bytes_per_position);
    let prompt = long_prompt()[..40].to_vec();
    // The second sequence joins once the first has ended.
    let mut sent = false;
    let script = move |_: &[Heard], idle: bool| {
        if idle && !sent {
            sent = true;
            let shared = [&prompt[..36], &[7, 8, 9]].concat();
            return vec![Control::Join(vec![greedy(1, shared, 6)])];
        }
        match idle {
            true => vec![Control::End],
            false => Vec::new(),
        }
    };
    let first = greedy(0, long_prompt()[..40].to_vec(), 6);
    let (summary, link) = run_scripted(model.as_mut(), 8, &mut prefix, script, vec![first]);
    // 40 prompt tokens (and 5 fed ones) make two whole blocks; the second prompt shares them.
    assert_eq!(summary.cached_prompt_tokens, 32);
    let hits: u64 = link.reports.iter().map(|r| r.hit_tokens).sum();
    let misses: u64 = link.reports.iter().map(|r| r.miss_tokens).sum();
    assert_eq!((hits, misses), (32, 40 + 39 - 32));
    assert_eq!(link.reports.last().unwrap().blocks, 2, "both shared");

    let mut fresh = no_prefix_cache();
    let alone = |model: &mut dyn ShardedModel, prefix: &mut PrefixCache, sequence| {
        let script = |_: &[Heard], idle: bool| match idle {
            true => vec![Control::End],
            false => Vec::new(),
        };
        run_scripted(model, 8, prefix, script, vec![sequence]).1
    };
    let shared = [&long_prompt()[..36], &[7, 8, 9]].concat();
    let recomputed = alone(model.as_mut(), &mut fresh, greedy(1, shared, 6));
    assert_eq!(link.tokens(1), recomputed.tokens(1));
}

#[test]
fn prompts_prefilled_in_chunks_give_the_logits_of_one_pass_within_rounding() {
    let mut model = tiny_model();
    // Two prompts of different lengths: the shorter is padded on the left.
    let sequences = [
        greedy(0, long_prompt(), 1),
        greedy(1, long_prompt()[30..].to_vec(), 1),
    ];
    let prefill = |model: &mut dyn ShardedModel, budget: usize| {
        let mut joining = Joining::default();
        joining
            .add(&sequences, &mut no_prefix_cache(), None)
            .unwrap();
        let mut passes = 0;
        loop {
            let mut advanced = joining.advance(model, &SingleRank, budget, None).unwrap();
            passes += advanced.chunks;
            if let Some((_, logits)) = advanced.complete.pop() {
                let values: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
                return (passes, values);
            }
        }
    };
    let (one, whole) = prefill(model.as_mut(), usize::MAX);
    let (chunks, chunked) = prefill(model.as_mut(), 2 * 7);
    assert_eq!((one, chunks), (1, 15), "100 columns in chunks of 7");
    assert_eq!(whole.len(), chunked.len());
    let worst = whole
        .iter()
        .zip(&chunked)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "logits differ by {worst}");
}
