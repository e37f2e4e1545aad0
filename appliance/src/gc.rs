//! (in progress)
pub fn run(_a: &crate::cli::GcArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
