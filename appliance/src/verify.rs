//! (in progress)
pub fn run(_a: &crate::cli::VerifyArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
