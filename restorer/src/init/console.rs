//! Messages of the boot image, on every console the kernel was given (screen and serial: a BMC's
//! serial-over-LAN and a person at the screen both see them) and in /run/bmr/init.log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, OnceLock};

static CONSOLES: OnceLock<Mutex<Vec<File>>> = OnceLock::new();

/// Names of the active consoles (`tty0`, `ttyS0`), the last one being /dev/console.
pub fn active() -> Vec<String> {
    let names: Vec<String> = std::fs::read_to_string("/sys/class/tty/console/active")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    if names.is_empty() {
        vec!["console".into()]
    } else {
        names
    }
}

/// Opens the consoles; before /dev is mounted only /dev/console (from the initramfs) exists.
pub fn open() {
    let mut files = Vec::new();
    for name in active() {
        if let Ok(f) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(format!("/dev/{name}"))
        {
            files.push(f);
        }
    }
    if files.is_empty() {
        if let Ok(f) = OpenOptions::new().write(true).open("/dev/console") {
            files.push(f);
        }
    }
    if let Some(log) = log_file() {
        files.push(log);
    }
    match CONSOLES.get() {
        Some(m) => *m.lock().unwrap_or_else(|e| e.into_inner()) = files,
        None => {
            let _ = CONSOLES.set(Mutex::new(files));
        }
    }
}

fn log_file() -> Option<File> {
    std::fs::create_dir_all("/run/bmr").ok()?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .open("/run/bmr/init.log")
        .ok()
}

/// Writes one line to every console.
pub fn say(line: &str) {
    let Some(m) = CONSOLES.get() else {
        eprintln!("{line}");
        return;
    };
    let mut files = m.lock().unwrap_or_else(|e| e.into_inner());
    for f in files.iter_mut() {
        let _ = writeln!(f, "{line}");
    }
}

/// `say` with format arguments.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::init::console::say(&format!($($arg)*)) };
}
