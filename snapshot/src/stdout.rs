//! Standard output closed by its reader (`appliance list | head`): Rust ignores SIGPIPE, so
//! `println!` gets EPIPE and panics. The restorer runs as PID 1 and pipes into child tools, so
//! SIGPIPE is not given back its default action; instead a panic hook ends the program quietly
//! on exactly that panic, with the status a SIGPIPE death gives a shell (141).

/// Installs the hook (once, first thing in `main`); every other panic is reported as before.
pub fn exit_quietly_when_closed() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info)
    }));
}
