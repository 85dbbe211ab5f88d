//! The `hearth` binary.

fn main() -> anyhow::Result<()> {
    hearth_node::cli::main()
}
