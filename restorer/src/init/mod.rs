//! PID 1 mode in the boot image. (In progress.)
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
