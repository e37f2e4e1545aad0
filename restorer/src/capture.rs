//! (in progress)
pub fn run(_a: &crate::cli::CaptureArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
