//! Progress while a model loads: each rank reports how far it has got, a few times a second at
//! most, to a library caller that asks; the command draws it as bars on a terminal only.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::{binary, fixture, generate_reference_args, options, run};
use parallelformers::{parallelize, Options, Progress, ProgressSink};

/// What a sink heard, in order.
#[derive(Debug, Clone, PartialEq)]
enum Heard {
    Loading { rank: usize, done: u64, total: u64 },
    Loaded,
    Other(String),
}

/// A sink that records every event, and what it recorded.
fn recorder() -> (ProgressSink, Arc<Mutex<Vec<Heard>>>) {
    let heard = Arc::new(Mutex::new(Vec::new()));
    let record = heard.clone();
    let sink = ProgressSink::new(move |event| {
        let event = match *event {
            Progress::Loading { rank, done, total } => Heard::Loading { rank, done, total },
            Progress::Loaded => Heard::Loaded,
            other => Heard::Other(format!("{other:?}")),
        };
        record.lock().unwrap().push(event);
    });
    (sink, heard)
}

#[test]
fn each_rank_reports_its_load_from_zero_to_the_total_and_the_end_comes_last() {
    let (sink, heard) = recorder();
    let started = Instant::now();
    let model = parallelize(
        fixture("llama"),
        Options {
            progress: Some(sink),
            ..options(2)
        },
    )
    .unwrap();
    let elapsed = started.elapsed();
    model.deparallelize();
    let heard = heard.lock().unwrap().clone();
    assert_eq!(heard.last(), Some(&Heard::Loaded), "{heard:?}");
    assert_eq!(heard.iter().filter(|h| **h == Heard::Loaded).count(), 1);
    assert!(
        !heard.iter().any(|h| matches!(h, Heard::Other(_))),
        "a local model is not fetched: {heard:?}"
    );
    for rank in 0..2 {
        let reports: Vec<(u64, u64)> = heard
            .iter()
            .filter_map(|h| match *h {
                Heard::Loading {
                    rank: r,
                    done,
                    total,
                } if r == rank => Some((done, total)),
                _ => None,
            })
            .collect();
        let total = reports.first().map(|r| r.1).unwrap_or_default();
        assert!(total > 0, "rank {rank}: {reports:?}");
        assert!(
            reports.iter().all(|r| r.1 == total),
            "rank {rank}: {reports:?}"
        );
        assert_eq!(reports.first().map(|r| r.0), Some(0), "rank {rank}");
        assert_eq!(reports.last().map(|r| r.0), Some(total), "rank {rank}");
        assert!(
            reports.windows(2).all(|w| w[0].0 < w[1].0),
            "rank {rank} goes forward: {reports:?}"
        );
        // One report per 100 ms at most, besides the first and the last.
        let allowed = 2 + (elapsed.as_millis() / 100) as usize;
        assert!(
            reports.len() <= allowed,
            "rank {rank}: {} reports in {elapsed:?}",
            reports.len()
        );
    }
}

#[test]
fn without_a_sink_the_command_prints_nothing_on_a_pipe() {
    let mut args = generate_reference_args("llama");
    args.extend(["--ranks", "2", "--max-new-tokens", "2"].map(String::from));
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "standard error is a pipe"
    );
}

/// Runs the command with `args` under a pseudo-terminal (util-linux `script`); its terminal
/// output, or `None` where `script` is missing.
fn run_on_a_terminal(args: &[String]) -> Option<String> {
    let quoted: Vec<String> = std::iter::once(binary().to_string_lossy().into_owned())
        .chain(args.iter().cloned())
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let child = std::process::Command::new("script")
        .args(["-qec", &quoted.join(" "), "/dev/null"])
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .output();
    match child {
        Ok(out) => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run script: {e}"),
    }
}

#[test]
fn on_a_terminal_the_command_draws_a_bar_per_loading_rank() {
    let mut args = generate_reference_args("llama");
    args.extend(["--ranks", "2", "--max-new-tokens", "2"].map(String::from));
    let Some(screen) = run_on_a_terminal(&args) else {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    };
    for rank in 0..2 {
        assert!(
            screen.contains(&format!("loading rank {rank}")),
            "rank {rank}'s bar: {screen:?}"
        );
    }
    assert!(screen.contains("generated_ids"), "the answer: {screen:?}");
}
