//! `hearth-bench`: see the library's documentation, or `hearth-bench --help`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = hearth_bench::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(hearth_bench::run(cli)).map(drop)
}
