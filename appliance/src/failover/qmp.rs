//! A QMP client: JSON lines over the VM's unix socket. Just enough for our commands; events
//! arriving between a command and its answer are skipped.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    what: String,
}

impl Qmp {
    /// Connect, read the greeting and leave capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let what = format!("QMP socket {}", path.display());
        let s = UnixStream::connect(path).with_context(|| format!("connecting to {what}"))?;
        s.set_read_timeout(Some(timeout))
            .and_then(|_| s.set_write_timeout(Some(timeout)))
            .with_context(|| format!("configuring {what}"))?;
        let writer = s.try_clone().context("cloning a unix socket")?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            what,
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("{}: unexpected greeting {greeting}", q.what);
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .with_context(|| format!("reading from {}", self.what))?;
        if n == 0 {
            bail!("{}: QEMU closed the connection", self.what);
        }
        serde_json::from_str(&line).with_context(|| format!("{}: malformed reply", self.what))
    }

    /// Run one command and return its `return` value; a QMP error becomes an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&msg).expect("serialises");
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .with_context(|| format!("sending {command} to {}", self.what))?;
        loop {
            let m = self.read_message()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                bail!(
                    "QMP {command}: {} ({})",
                    e.get("desc").and_then(|d| d.as_str()).unwrap_or("failed"),
                    e.get("class").and_then(|d| d.as_str()).unwrap_or("?")
                );
            }
            // An event: keep reading.
        }
    }

    /// `query-status`: `running`, `paused`, `shutdown` (guest powered off, kept by
    /// `-no-shutdown`), `internal-error`...
    pub fn status(&mut self) -> Result<String> {
        let r = self.execute("query-status", json!({}))?;
        Ok(r.get("status")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string())
    }
}
