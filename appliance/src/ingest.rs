//! (in progress)
pub fn run(_a: &crate::cli::IngestArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
