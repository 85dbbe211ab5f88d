//! `hearth-chat`: the line-based terminal chat client for a Hearth node.
//!
//! `hearth-chat --server http://127.0.0.1:8080 --user alice [--register]`, with the
//! password in `HEARTH_PASSWORD` (or `--password`). `/help` lists the commands.

use std::process::ExitCode;

use clap::Parser;
use hearth_client_api::chat::{self, ChatArgs};

/// Terminal chat client for a Hearth node.
#[derive(Debug, Parser)]
#[command(name = "hearth-chat", version, about)]
struct Cli {
    #[command(flatten)]
    chat: ChatArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    match chat::run(Cli::parse().chat).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the causes; a person reads this, not a developer's backtrace.
            eprintln!("hearth-chat: {e:#}");
            ExitCode::FAILURE
        }
    }
}
