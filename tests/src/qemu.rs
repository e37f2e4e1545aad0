//! A QEMU harness for end-to-end tests: firmware (SeaBIOS, OVMF, OVMF with Secure Boot enforced
//! and Microsoft keys enrolled), disks on NVMe / virtio / virtio-scsi / AHCI / USB / CD-ROM, user
//! networking with TFTP, a boot file for PXE, chosen MACs and PCI slots and port forwards, and
//! the serial console as a log file plus a way to wait for a pattern and to type lines.
//!
//! TCG is used unless `BMR_QEMU_ACCEL=kvm` (KVM exists on our machines but its guests hang).
//! The serial log stays in the VM's directory (a test's `target/e2e/<test>/`).

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
pub const OVMF_CODE_SECBOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
/// Variables with Microsoft's keys enrolled and Secure Boot on: what servers ship with.
pub const OVMF_VARS_MS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Firmware {
    /// SeaBIOS (legacy BIOS).
    Bios,
    Uefi,
    /// OVMF with Secure Boot enforced (SMM, secure flash, Microsoft keys).
    UefiSecureBoot,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bus {
    Nvme,
    Virtio,
    Ahci,
    /// USB mass storage on an xHCI controller.
    Usb,
    /// A CD-ROM on the AHCI (q35) or IDE (pc) controller.
    Cdrom,
    /// A `scsi-hd` on a `virtio-scsi-pci` controller (one controller for all such disks).
    VirtioScsi,
}

#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub bus: Bus,
    /// Guest writes are discarded (a throwaway overlay; CD-ROMs are simply read-only).
    pub readonly: bool,
    /// Firmware boot priority (lower first).
    pub bootindex: Option<u32>,
}

impl Disk {
    pub fn new(path: impl Into<PathBuf>, bus: Bus) -> Disk {
        Disk {
            path: path.into(),
            bus,
            readonly: false,
            bootindex: None,
        }
    }
    pub fn readonly(mut self) -> Disk {
        self.readonly = true;
        self
    }
    pub fn boot(mut self, index: u32) -> Disk {
        self.bootindex = Some(index);
        self
    }
}

#[derive(Debug, Clone)]
pub struct Nic {
    /// `virtio-net-pci`, `e1000`, `e1000e`...
    pub model: String,
    /// TFTP root of QEMU's user network (`tftp=`).
    pub tftp: Option<PathBuf>,
    /// DHCP boot file (`bootfile=`): a TFTP path or, for iPXE, an http:// URL.
    pub bootfile: Option<String>,
    pub bootindex: Option<u32>,
    /// Without QEMU's iPXE option ROM: UEFI then uses OVMF's own driver and PXE client.
    pub no_rom: bool,
    /// The NIC's MAC (`mac=`); QEMU's default otherwise (52:54:00:12:34:56 and up).
    pub mac: Option<String>,
    /// PCI slot on q35's `pcie.0` (`addr=0xN`); QEMU's next free slot otherwise.
    pub addr: Option<u8>,
    /// User-network port forwards `(host port, guest port)`: `hostfwd=tcp:127.0.0.1:H-:G`
    /// (to the guest's 10.0.2.15).
    pub hostfwd: Vec<(u16, u16)>,
}

impl Nic {
    /// A NIC that boots first by PXE: `bootfile` (a TFTP path under `tftp`, or an http:// URL
    /// that the NIC's iPXE fetches) from QEMU's user network.
    pub fn pxe(model: &str, tftp: &Path, bootfile: &str) -> Nic {
        Nic {
            tftp: Some(tftp.to_path_buf()),
            bootfile: Some(bootfile.to_string()),
            bootindex: Some(1),
            ..Nic::new(model)
        }
    }

    pub fn new(model: &str) -> Nic {
        Nic {
            model: model.into(),
            tftp: None,
            bootfile: None,
            bootindex: None,
            no_rom: false,
            mac: None,
            addr: None,
            hostfwd: vec![],
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub firmware: Firmware,
    pub memory_mib: u32,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// Direct kernel boot: vmlinuz, initrd, command line.
    pub kernel: Option<(PathBuf, PathBuf, String)>,
    /// Let the guest reboot instead of QEMU exiting on reset.
    pub allow_reboot: bool,
    /// OVMF variables to use (a copy is made on first start and kept for later boots of the
    /// same VM directory, like NVRAM).
    pub vars: Option<PathBuf>,
}

impl VmSpec {
    pub fn new(name: &str, firmware: Firmware) -> VmSpec {
        VmSpec {
            name: name.into(),
            firmware,
            memory_mib: 1024,
            disks: vec![],
            nics: vec![],
            kernel: None,
            allow_reboot: false,
            vars: None,
        }
    }
}

/// Serial output shared between the reader thread and waiters.
type Serial = Arc<(Mutex<Vec<u8>>, Condvar)>;

pub struct Vm {
    pub spec: VmSpec,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub started: Instant,
    child: Child,
    stdin: Option<ChildStdin>,
    serial: Serial,
    /// Serial bytes already consumed by `wait_for` (so repeated waits move forward).
    cursor: usize,
}

pub fn accel() -> &'static str {
    match std::env::var("BMR_QEMU_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        _ => "tcg",
    }
}

/// Whether QEMU and the firmware this harness needs are installed (tests skip, loudly, if not).
pub fn available(fw: Firmware) -> bool {
    let q = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    q && match fw {
        Firmware::Bios => true,
        Firmware::Uefi => Path::new(OVMF_CODE).exists(),
        Firmware::UefiSecureBoot => {
            Path::new(OVMF_CODE_SECBOOT).exists() && Path::new(OVMF_VARS_MS).exists()
        }
    }
}

impl Vm {
    /// Starts the VM; `dir` keeps its serial log and NVRAM.
    pub fn start(spec: VmSpec, dir: &Path) -> Result<Vm> {
        std::fs::create_dir_all(dir)?;
        let log = dir.join(format!("{}.serial.log", spec.name));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            accel(),
            "-m",
            &spec.memory_mib.to_string(),
            "-smp",
            "1",
        ])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-nodefaults",
        ])
        .args(["-vga", "std"]);
        if !spec.allow_reboot {
            cmd.arg("-no-reboot");
        }
        match spec.firmware {
            Firmware::Bios => {
                cmd.args(["-machine", "q35"]);
            }
            Firmware::Uefi | Firmware::UefiSecureBoot => {
                let sb = spec.firmware == Firmware::UefiSecureBoot;
                let vars = dir.join(format!("{}.vars.fd", spec.name));
                if !vars.exists() {
                    let src = spec.vars.clone().unwrap_or_else(|| {
                        PathBuf::from(if sb { OVMF_VARS_MS } else { OVMF_VARS })
                    });
                    std::fs::copy(&src, &vars)
                        .with_context(|| format!("copying {}", src.display()))?;
                }
                let code = if sb { OVMF_CODE_SECBOOT } else { OVMF_CODE };
                if sb {
                    cmd.args(["-machine", "q35,smm=on"])
                        .args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
                } else {
                    cmd.args(["-machine", "q35"]);
                }
                cmd.arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={code}"
                    ))
                    .arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=1,file={}",
                        vars.display()
                    ));
            }
        }
        let mut usb = false;
        let mut scsi = false;
        for (i, d) in spec.disks.iter().enumerate() {
            // IDE/AHCI disks cannot be read-only: writes go to a throwaway overlay instead.
            let ro = match (d.readonly, d.bus) {
                (false, _) => "",
                (true, Bus::Cdrom) => ",readonly=on",
                (true, _) => ",snapshot=on",
            };
            let media = if d.bus == Bus::Cdrom {
                ",media=cdrom"
            } else {
                ""
            };
            cmd.arg("-drive").arg(format!(
                "if=none,id=d{i},format=raw,file={}{ro}{media}",
                d.path.display()
            ));
            let bi = d
                .bootindex
                .map(|b| format!(",bootindex={b}"))
                .unwrap_or_default();
            let dev = match d.bus {
                Bus::Nvme => format!("nvme,drive=d{i},serial=bmr{i}{bi}"),
                Bus::Virtio => format!("virtio-blk-pci,drive=d{i}{bi}"),
                Bus::Ahci => format!("ide-hd,drive=d{i},bus=ide.{i}{bi}"),
                Bus::Cdrom => format!("ide-cd,drive=d{i},bus=ide.{i}{bi}"),
                Bus::VirtioScsi => {
                    if !scsi {
                        cmd.args(["-device", "virtio-scsi-pci,id=scsi0"]);
                        scsi = true;
                    }
                    format!("scsi-hd,drive=d{i},bus=scsi0.0{bi}")
                }
                Bus::Usb => {
                    if !usb {
                        cmd.args(["-device", "qemu-xhci,id=xhci"]);
                        usb = true;
                    }
                    format!("usb-storage,bus=xhci.0,drive=d{i},removable=on{bi}")
                }
            };
            cmd.arg("-device").arg(dev);
        }
        for (i, n) in spec.nics.iter().enumerate() {
            let mut net = format!("user,id=n{i}");
            if let Some(t) = &n.tftp {
                net.push_str(&format!(",tftp={}", t.display()));
            }
            if let Some(b) = &n.bootfile {
                net.push_str(&format!(",bootfile={b}"));
            }
            for (host, guest) in &n.hostfwd {
                net.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
            }
            cmd.arg("-netdev").arg(net);
            let bi = n
                .bootindex
                .map(|b| format!(",bootindex={b}"))
                .unwrap_or_default();
            let rom = if n.no_rom { ",romfile=" } else { "" };
            let mac = n
                .mac
                .as_ref()
                .map(|m| format!(",mac={m}"))
                .unwrap_or_default();
            let addr = n.addr.map(|a| format!(",addr={a:#x}")).unwrap_or_default();
            cmd.arg("-device")
                .arg(format!("{},netdev=n{i}{bi}{rom}{mac}{addr}", n.model));
        }
        if let Some((k, i, append)) = &spec.kernel {
            cmd.arg("-kernel")
                .arg(k)
                .arg("-initrd")
                .arg(i)
                .arg("-append")
                .arg(append);
        }
        std::fs::write(
            dir.join(format!("{}.cmdline", spec.name)),
            format!("{cmd:?}\n"),
        )?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
        let started = Instant::now();
        let serial: Serial = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let mut out = child.stdout.take().expect("piped");
        let mut file = std::fs::File::create(&log)?;
        let s = serial.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = file.write_all(&buf[..n]);
                let (m, cv) = &*s;
                m.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
                cv.notify_all();
            }
            let (_, cv) = &*s;
            cv.notify_all();
        });
        let mut err = child.stderr.take().expect("piped");
        let errlog = dir.join(format!("{}.qemu.log", spec.name));
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            let _ = std::fs::write(errlog, v);
        });
        let stdin = child.stdin.take();
        Ok(Vm {
            spec,
            dir: dir.to_path_buf(),
            log,
            started,
            child,
            stdin,
            serial,
            cursor: 0,
        })
    }

    /// Everything the serial console printed so far (escape sequences stripped).
    pub fn output(&self) -> String {
        let (m, _) = &*self.serial;
        strip_ansi(&String::from_utf8_lossy(
            &m.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// Waits until `pattern` appears on the serial console after what earlier waits consumed;
    /// returns the time since power-on. Fails on timeout or if QEMU exits, quoting the log's end.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> Result<Duration> {
        self.wait_for_any(&[pattern], timeout).map(|(_, t)| t)
    }

    /// Like `wait_for` with several patterns: returns which one came first.
    pub fn wait_for_any(
        &mut self,
        patterns: &[&str],
        timeout: Duration,
    ) -> Result<(usize, Duration)> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.serial;
        let mut buf = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let rest = &buf[self.cursor.min(buf.len())..];
            let hit = patterns
                .iter()
                .enumerate()
                .filter_map(|(i, p)| find(rest, p.as_bytes()).map(|at| (at, i, p.len())))
                .min();
            if let Some((at, i, len)) = hit {
                self.cursor += at + len;
                return Ok((i, self.started.elapsed()));
            }
            let now = Instant::now();
            let exited = self.child.try_wait().ok().flatten();
            if now >= deadline || exited.is_some() {
                let tail: String = strip_ansi(&String::from_utf8_lossy(&buf))
                    .lines()
                    .rev()
                    .take(25)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                let why = match exited {
                    Some(st) => format!("QEMU exited ({st})"),
                    None => format!("timed out after {timeout:?}"),
                };
                bail!(
                    "VM {}: {why} waiting for {patterns:?}; serial log {}; last lines:\n{tail}",
                    self.spec.name,
                    self.log.display()
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(500));
            buf = cv
                .wait_timeout(buf, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Types a line on the serial console.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let s = self.stdin.as_mut().context("serial input closed")?;
        s.write_all(line.as_bytes())?;
        s.write_all(b"\n")?;
        s.flush()?;
        Ok(())
    }

    /// Waits for QEMU to exit (the guest powered off or, without `allow_reboot`, rebooted).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!(
                    "VM {} still running after {timeout:?}; serial log {}",
                    self.spec.name,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Removes terminal escape sequences (firmware and GRUB draw with them).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                for c in it.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ansi_is_stripped() {
        assert_eq!(
            super::strip_ansi("\u{1b}[2J\u{1b}[01;01HBOOT-OK\r\n"),
            "BOOT-OK\n"
        );
    }
}
