//! `hearth-bench`: see the library's documentation, or `hearth-bench --help`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = hearth_bench::Cli::parse();
    let runtime = match cli.threads {
        // One thread: no hand-offs between the tool's own threads.
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.into())
            .enable_all()
            .build()?,
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(hearth_bench::run(cli)).map(drop)
}
