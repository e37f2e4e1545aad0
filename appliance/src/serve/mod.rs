//! `appliance serve`: store files, the JSON API and boot files over HTTP. (In progress.)
pub fn run(_a: &crate::cli::ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
