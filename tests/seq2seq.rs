//! Encoder–decoders (BART, T5) beyond the padded forward pass and greedy continuation of
//! `tests/conformance.rs`: beam search, which reorders the decoder's self- and cross-attention
//! caches and the encoder's padding mask with the beams, and a batch of prompts of different
//! lengths, against transformers (`scripts/make_fixtures.py`); and what an encoder–decoder
//! refuses.

mod common;

use std::ops::ControlFlow;

use common::{fixture, options, reference};
use parallelformers::{parallelize, ForwardInput, GenerationConfig};

const FIXTURES: [&str; 3] = ["bart", "t5", "t5_gated"];

/// A row of transformers' generated ids: up to and including the first end of sequence (the
/// rest is padding).
fn until_eos(row: &[u32], eos: u32) -> Vec<u32> {
    match row.iter().position(|&t| t == eos) {
        Some(end) => row[..=end].to_vec(),
        None => row.to_vec(),
    }
}

#[test]
fn beam_search_and_padded_batches_match_transformers() {
    for name in FIXTURES {
        let refs = reference(name);
        let eos = refs["generate_output_ids"].ids().last().copied().unwrap();
        let prompt = refs["generate_input_ids"].ids();
        let batch = &refs["generate_batch_input_ids"];
        let width = batch.shape[1];
        let mask = refs["generate_batch_attention_mask"].ids();
        let prompts: Vec<Vec<u32>> = batch
            .ids()
            .chunks(width)
            .zip(mask.chunks(width))
            .map(|(ids, mask)| {
                ids.iter()
                    .zip(mask)
                    .filter(|(_, &m)| m == 1)
                    .map(|(&id, _)| id)
                    .collect()
            })
            .collect();
        let expected = &refs["generate_batch_output_ids"];
        let expected: Vec<Vec<u32>> = expected
            .ids()
            .chunks(expected.shape[1])
            .map(|row| until_eos(row, eos))
            .collect();
        for ranks in [1, 3] {
            let mut model = parallelize(fixture(name), options(ranks)).unwrap();
            let beams = GenerationConfig {
                num_beams: 3,
                max_new_tokens: 12,
                ..GenerationConfig::default()
            };
            let beam = model.generate(&prompt, &beams).unwrap();
            assert_eq!(
                beam.ids,
                refs["generate_beam_output_ids"].ids(),
                "{name} at {ranks} ranks: 3 beams"
            );
            let greedy = GenerationConfig {
                max_new_tokens: 12,
                ..GenerationConfig::default()
            };
            let out = model
                .generate_batch(&prompts, &greedy, |_, _| ControlFlow::Continue(()))
                .unwrap();
            assert_eq!(out.sequences, expected, "{name} at {ranks} ranks: batch");
            model.deparallelize();
        }
    }
}

#[test]
fn bart_shifts_its_input_right_when_no_decoder_input_is_given_and_t5_asks_for_one() {
    for (name, start) in [("bart", 2), ("t5", 0)] {
        let mut model = parallelize(fixture(name), options(2)).unwrap();
        let input = |decoder_input_ids| ForwardInput {
            input_ids: vec![5, 6, 7, 8],
            batch: 1,
            seq_len: 4,
            attention_mask: None,
            decoder_input_ids,
        };
        let shifted = model.forward(&input(Some(vec![start, 5, 6, 7])));
        match (name, model.forward(&input(None))) {
            ("bart", Ok(implicit)) => assert_eq!(implicit, shifted.unwrap()),
            ("t5", Err(e)) => assert!(e.to_string().contains("decoder_input_ids"), "{e}"),
            (_, other) => panic!("{name}: {other:?}"),
        }
        // Two sequences cannot share 3 decoder ids.
        let two_rows = ForwardInput {
            batch: 2,
            seq_len: 2,
            ..input(Some(vec![start, 5, 6]))
        };
        let e = model.forward(&two_rows).unwrap_err().to_string();
        assert!(e.contains("decoder_input_ids holds 3 ids"), "{e}");
        model.deparallelize();
    }
}

#[test]
fn an_encoder_decoder_cannot_join_a_continuous_batching_session() {
    let model = parallelize(fixture("t5"), options(1)).unwrap();
    let e = model.check_sessions().unwrap_err().to_string();
    assert!(e.contains("encoder–decoder") && e.contains("serve"), "{e}");
    model.deparallelize();
}
