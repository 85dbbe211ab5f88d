//! The `hearth` command line, built inside the test package so tests can start it as a child process.

fn main() -> anyhow::Result<()> {
    hearth_node::cli::main()
}
