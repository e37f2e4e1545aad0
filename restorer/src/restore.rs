//! (in progress)
pub fn run(_a: &crate::cli::RestoreArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
