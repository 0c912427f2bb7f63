//! The `parallelformers` command: a thin shell over the library. Worker processes are this same
//! binary re-executed, so the first thing `main` does is serve as a worker when asked to.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    parallelformers::run_worker_if_requested();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): the command's work is done, as far as
        // anyone can see. The ranks were stopped as the error left the command.
        Err(e) if output_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Nothing is left to tell if standard error is closed too.
            let _ = writeln!(std::io::stderr(), "error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Whether `error` comes from writing to an output whose reader is gone (a broken pipe). Only
/// the commands' own output can fail so: the library describes a broken connection to a rank
/// in words, never as the operating system's error.
fn output_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes, skipping causes whose text the message already contains.
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}
