//! The `ferry` binary: glue over the ferry libraries, never a library itself.
//!
//! Arguments are handled in two stages, as ripgrep does: [`args`] mirrors the command line with
//! clap structs (what the user typed), then each subcommand module builds a validated plan from
//! them (what to do) and runs it. This file only parses, sets up logging, dispatches, and maps
//! errors to exit codes.
//!
//! # Layout
//! * [`args`]: the command line.
//! * [`demo`]: `ferry demo`, synthetic EAGLE3 samples through each store, verified and timed.
//! * [`bench`]: `ferry bench store`, a store round trip against memcpy.
//! * [`liveness`]: rank 0's liveness link for consumer ranks in separate processes.
//! * [`inspect`]: `ferry inspect`, tensor files, SampleRef JSON lines and manifests.
//! * [`fault`]: the hidden `--fault` crash points of produce, consume and ingest (tests).
//! * [`ingest`]: `ferry ingest`, offline feature files into a store with a manifest.
//! * [`serve`]: `ferry serve`, the node daemon, and `ferry status`.
//! * [`transfer`]: `ferry bench transfer`, daemon put/get against memcpy and raw TCP.
//! * [`view_bench`]: `ferry bench view`, a tensor-parallel shard derived by the daemon against
//!   fetching the whole weight.
//! * [`strategy`]: which raw keys each draft strategy's offline files hold.
//! * [`sample`]: synthetic EAGLE3- and DFlash-shaped samples.
//! * [`synth`]: `ferry synth`, synthetic samples written as an offline feature dump.
//! * [`measure`]: timing helpers and the memcpy reference.
//! * [`table`]: plain-text tables.
//!
//! Exit codes: 0 on success (also when stdout is closed early, e.g. piped into `head`), 1 on any
//! error (the error and its causes are printed on stderr), 2 for a command line clap rejects.
//! Logs go to stderr; `RUST_LOG` sets the filter (default `warn`; `-v` gives `info`, `-vv`
//! `debug`).
#![forbid(unsafe_code)]

mod args;
mod bench;
mod consume;
mod control_bench;
mod demo;
mod demo_online;
mod fault;
mod ingest;
mod inspect;
mod liveness;
mod measure;
mod online;
mod sample;
mod serve;
mod stores;
mod strategy;
mod synth;
mod table;
mod train;
mod transfer;
mod view_bench;

use anyhow::Result;
use args::{BenchCommand, Cli, Command};
use clap::Parser;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match run(cli.command, &mut out).and_then(|()| Ok(out.flush()?)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Second stage: each subcommand builds its plan from the parsed arguments, then runs it.
fn run(command: Command, out: &mut dyn Write) -> Result<()> {
    match command {
        Command::Demo(a) if a.topology == args::DemoTopology::Online => demo_online::run(&a, out),
        Command::Demo(a) => demo::run(&demo::Plan::from_args(a)?, out),
        Command::Bench { what: BenchCommand::Store(a) } => bench::run(&bench::Plan::from_args(a)?, out),
        Command::Inspect(a) => inspect::run(&inspect::Plan::from_args(a), out),
        Command::Ingest(a) => ingest::run(&ingest::Plan::from_args(a)?, out),
        Command::Serve(a) => serve::run(a, out),
        Command::Status(a) => serve::status(a, out),
        Command::Produce(a) => online::produce(a, out),
        Command::Synth(a) => synth::run(&synth::Plan::from_args(a)?, out),
        Command::Consume(a) => consume::consume(a, out),
        Command::Bench { what: BenchCommand::Transfer(a) } => transfer::run(a, out),
        Command::Bench { what: BenchCommand::TransferClient(a) } => transfer::client(a, out),
        Command::Bench { what: BenchCommand::Control(a) } => control_bench::run(a, out),
        Command::Bench { what: BenchCommand::View(a) } => view_bench::run(a, out),
    }
}

/// Logs to stderr. `RUST_LOG` wins; otherwise `warn`, raised by `-v`.
fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// A closed stdout (`ferry inspect ref x | head`) is not a failure.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}
